"""One simulator in a process of its own, for the chaos soak (bench/chaos.py): it can be
killed and restarted without touching the product or the other providers.

    DJANGO_SETTINGS_MODULE=webapp.settings RUNBRAKE_SIMULATORS=true \
    RUNBRAKE_SIM_LOG_FILE=/tmp/fay.jsonl uvicorn simulators.standalone:app --port 9101

The in-memory request log (`/sim/requests`) dies with the process, so a checker that must
see every request across restarts reads `RUNBRAKE_SIM_LOG_FILE` instead: one JSON line per
request when it arrives (`event: "request"`) and one when its answer starts (`event:
"answer"`, with the HTTP status), appended and flushed at once. `POST /chaos/latency?ms=N`
delays every later answer by N ms (latency added by the network, not the provider's logic);
it is answered by this wrapper only, never by Django.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

Scope = dict[str, Any]
Message = dict[str, Any]

_django = get_asgi_application()
_log_path = os.environ.get("RUNBRAKE_SIM_LOG_FILE", "")
_log = open(_log_path, "a", buffering=1) if _log_path else None  # noqa: SIM115
_serial = itertools.count(1)
_latency_seconds = 0.0


def _write(entry: dict[str, Any]) -> None:
    if _log is not None:
        _log.write(json.dumps(entry, separators=(",", ":")) + "\n")


async def _set_latency(scope: Scope, send: Any) -> None:
    global _latency_seconds
    query = parse_qs(scope.get("query_string", b"").decode())
    _latency_seconds = max(0.0, float(query.get("ms", ["0"])[0]) / 1000)
    body = json.dumps({"latency_ms": round(_latency_seconds * 1000)}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"json")]}
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await _django(scope, receive, send)
        return
    if scope["path"] == "/chaos/latency":
        await _set_latency(scope, send)
        return
    # The body is read whole first (the simulators' requests are small JSON) so the log line
    # holds it; Django then reads it again from the replay below.
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    serial = next(_serial)
    _write(
        {
            "event": "request",
            "pid": os.getpid(),
            "serial": serial,
            "t": time.time(),
            "method": scope["method"],
            "path": scope["path"],
            "body": body.decode(errors="replace")[:4000],
        }
    )
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: Message = await receive()
        return message

    async def answer(message: Mapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if _latency_seconds:
                await asyncio.sleep(_latency_seconds)
            _write(
                {
                    "event": "answer",
                    "pid": os.getpid(),
                    "serial": serial,
                    "t": time.time(),
                    "status": message["status"],
                }
            )
        await send(message)

    await _django(scope, replay, answer)
