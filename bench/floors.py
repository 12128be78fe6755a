"""The floors: what this machine costs with nothing of Runbrake in the way, so that a missed
row can be read against what is possible here.

    floors.py app <port> [daphne] a bare ASGI app on the product's uvicorn stack (uvicorn,
                                  websockets, uvloop, no compression), or on daphne as `serve`
                                  runs it (the embedded default's server): websockets that get
                                  a snapshot and then only listen, `POST /fanout?tag=` sends
                                  one pre-built frame to every socket in a plain loop and
                                  answers how long the loop took, `GET /health` answers "ok".
    floors.py sse '<json spec>'   a bare reader of N simulator streams (httpx + httpx-sse +
                                  json, as the IntelligenceBox client reads them; no Django,
                                  no database): CPU per chunk and the chunks' lag -> JSON

The functions below drive them (called by bench/run.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).resolve().parent))

# A frame the size of a run row push (~2 KiB of HTML).
FRAME = (
    '<tr id="run-row-0" data-version="7" data-status="stopped" hx-swap-oob="true">'
    + '<td class="cell">bench floor frame TAG</td>' * 45
    + "</tr>"
)


# --- the bare app -----------------------------------------------------------------------------

_sockets: dict[int, Any] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "<p>snapshot</p>"})
        key = id(send)
        _sockets[key] = send
        try:
            while (await receive())["type"] != "websocket.disconnect":
                pass
        finally:
            _sockets.pop(key, None)
        return
    if scope["type"] != "http":
        return
    body: dict[str, Any] = {"ok": True}
    if scope["path"] == "/fanout":
        tag = parse_qs(scope["query_string"].decode()).get("tag", ["x"])[0]
        frame = FRAME.replace("TAG", tag)
        started = time.perf_counter()
        for sock in list(_sockets.values()):
            await sock({"type": "websocket.send", "text": frame})
        body = {"sockets": len(_sockets), "ms": (time.perf_counter() - started) * 1000}
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def serve(port: int, server: str = "uvicorn") -> None:
    if server == "daphne":
        serve_daphne(port)
        return
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        ws_max_size=64 * 1024,
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


def serve_daphne(port: int) -> None:
    """The bare app on daphne with the message limits `manage.py serve` gives it."""
    import daphne.server  # noqa: F401 - installs the asyncio reactor before anything else
    from daphne.server import Server

    Server(
        application=app,
        endpoints=[f"tcp:port={port}:interface=127.0.0.1"],
        websocket_max_message_size=64 * 1024,
        websocket_max_frame_size=64 * 1024,
        verbosity=0,
    ).run()


# --- the bare SSE reader ----------------------------------------------------------------------


async def read_streams(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx
    from httpx_sse import aconnect_sse

    sims: list[str] = spec["sims"]
    n: int = spec["n"]
    duration: float = spec["duration"]
    chunks: int = spec["chunks"]
    sample: int = spec["sample"]
    interval = duration / chunks
    start_at = time.time() + spec["lead"]
    received = 0
    times: dict[int, list[float]] = {}
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(30, read=600),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )
    ids = [f"floor-{uuid.uuid4().hex}" for _ in range(n)]
    delays: dict[int, float] = {}

    async def one(i: int) -> None:
        nonlocal received
        delay = max(0.5, start_at - time.time()) + (i * 0.6180339887) % 1 * interval
        delays[i] = delay
        body = {
            "id": ids[i],
            "messages": [
                {
                    "role": "user",
                    "content": f"floor {i} sim:duration={duration} "
                    f"sim:chunks={chunks} sim:delay={delay:.3f}",
                }
            ],
            "boxAddress": "http://127.0.0.1",
        }
        sim = sims[i % len(sims)]
        mine = times.setdefault(i, []) if i < sample else None
        async with aconnect_sse(
            client,
            "POST",
            f"{sim}/sim/intelligencebox/api/ai/chat",
            json=body,
            headers={"x-api-key": "sim-bench-key", "Accept": "text/event-stream"},
        ) as source:
            async for event in source.aiter_sse():
                for line in event.data.splitlines():
                    part = json.loads(line.removeprefix("data:").strip())
                    if part.get("type") == "text-delta":
                        received += 1
                        if mine is not None:
                            mine.append(time.time())

    from common import CpuMark, summary

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    sims_cpu = CpuMark({"simulators": spec["sim_pids"]})
    cpu0, wall0, got0 = time.process_time(), time.time(), received
    await asyncio.gather(*tasks)
    cpu, wall, got = time.process_time() - cpu0, time.time() - wall0, received - got0
    sims_cores = sims_cpu.cores()["simulators"]
    lag: list[float] = []
    for i, stamps in times.items():
        sim = sims[i % len(sims)]
        st = (
            await client.get(
                f"{sim}/sim/intelligencebox/api/ai/chat/{ids[i]}/stream-status",
                headers={"x-api-key": "sim-bench-key"},
            )
        ).json()
        start = _ts(st["startTime"]) + delays[i]
        step = (_ts(st["lastActivity"]) - start) / chunks
        lag += [(t - (start + k * step)) * 1000 for k, t in enumerate(stamps)]
    await client.aclose()
    return {
        "streams": n,
        "chunks": got,
        "cpu_us_per_chunk": round(cpu / max(1, got) * 1e6, 1),
        "busy_cores": round(cpu / wall, 2) if wall else None,
        "chunks_per_s": round(got / wall, 1) if wall else None,
        # The simulators on the same cores: a reader cannot be faster than what feeds it.
        "simulators_busy_cores": sims_cores,
        "lag": summary(lag),
    }


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --- driving them (from bench/run.py) ------------------------------------------------------------


def bare_websockets(
    fanout: int, trials: int, capacity: int, reconnect_box: float, server: str = "uvicorn"
) -> Any:
    """Fan-out to `fanout` sockets of the bare app (P2's floor), then memory per socket and
    connect rate at `capacity` sockets (P3's), a mass reconnect of half of them, and
    sequential requests (P5's per-request floor). `capacity` 0: the fan-out only."""
    import httpx
    from common import PY, ROOT, Proc, free_port, rss_kib, summary
    from measure import Clients, connect_all, watch

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(
        "bare-app",
        [PY, str(ROOT / "bench" / "floors.py"), "app", str(port), server],
        dict(os.environ),
        cwd=ROOT,
    )
    gens: list[Clients] = []
    try:
        _wait(url + "/health", proc)
        ws = [url.replace("http://", "ws://") + "/ws"]
        time.sleep(0.5)
        rss0 = rss_kib(proc.pid)
        gens += [Clients(ws, ["bare"], fanout // 2) for _ in range(2)]
        connect_all(gens)
        lat: list[float] = []
        send_ms: list[float] = []
        with httpx.Client(timeout=60) as client:
            for trial in range(trials):
                tag = f"t{trial}x{uuid.uuid4().hex[:6]}"

                def fan(tag: str = tag) -> None:
                    send_ms.append(client.post(f"{url}/fanout?tag={tag}").json()["ms"])

                got, _lost = watch(gens, 10, tag, fan)
                lat += got
                time.sleep(0.2)
            fanned = {
                "server": server,
                "fanout_sockets": fanout,
                "fanout_latency": summary(lat),
                "send_us_per_socket": round(1000 * sum(send_ms) / max(1, len(send_ms)) / fanout, 1),
            }
            if not capacity:
                return fanned
            more = [Clients(ws, ["bare"], (capacity - fanout) // 2) for _ in range(2)]
            gens += more
            opened, _failed, seconds = connect_all(more)
            time.sleep(2)
            sockets = sum(g.ready()["ready"] for g in gens)
            rss1 = rss_kib(proc.pid)
            # Half of them drop and reconnect at once, as in P3.
            half = [gens[0], more[0]]
            for g in half:
                g.send(f"RECONNECT {reconnect_box} 250")
            done = [g.read(reconnect_box + 120) for g in half]
            reconnect = {
                k: max(d[k] for d in done) if k == "seconds" else sum(d[k] for d in done)
                for k in done[0]
            }
            requests: list[float] = []
            for _ in range(200):
                t0 = time.perf_counter()
                client.get(f"{url}/health")
                requests.append((time.perf_counter() - t0) * 1000)
    finally:
        for g in gens:
            g.close()
        proc.stop()
    return {
        **fanned,
        "sockets": sockets,
        "kib_per_socket": round((rss1 - rss0) / max(1, sockets), 1),
        "connect_per_second": round(opened / seconds, 1) if seconds else None,
        "reconnect": reconnect,
        "request": summary(requests),
    }


def bare_sse(sims: list[Any], n: int, duration: float, chunks: int, sample: int) -> Any:
    from common import script

    spec = {
        "sims": [s.url for s in sims],
        "sim_pids": [s.pid for s in sims],
        "n": n,
        "duration": duration,
        "chunks": chunks,
        "sample": sample,
        "lead": 4 + n / 400,
    }
    return script("sqlite", "bench/floors.py", "sse", json.dumps(spec), timeout=300)


def _wait(url: str, proc: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"bare app exited:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("bare app did not start")


if __name__ == "__main__":
    if sys.argv[1] == "app":
        serve(int(sys.argv[2]), *sys.argv[3:4])
    elif sys.argv[1] == "sse":
        print(json.dumps(asyncio.run(read_streams(json.loads(sys.argv[2])))))
    else:
        raise SystemExit(__doc__)
