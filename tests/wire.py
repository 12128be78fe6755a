"""Wire sequences from the providers' public sources, replayed over a real socket.

The simulators are our own model of each provider; a test that passes only because the
simulator agrees with the client proves little. These tests instead serve the bytes the
providers' documentation, source code or captured traces show (restated in our own words and
values, under tests/fixtures/), from a plain HTTP server on loopback, and drive the unchanged
client at it.

`Replay` answers each request with the next scripted `Answer` for its method and path, and
records every request it received (method, path, headers, body) for the test to inspect.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runs.providers.base import Event, Finished

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture(name: str) -> bytes:
    """A fixture's bytes (e.g. "dify/chat_stream.sse"), with `\\n` line ends kept exactly."""
    return (FIXTURES / name).read_bytes()


@dataclass
class Answer:
    """One scripted response. `chunks` are written in order, `pause` seconds apart; with
    `hold`, the connection stays open after them until the server closes (a stream that never
    ends by itself)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    pause: float = 0.0
    hold: bool = False

    @classmethod
    def sse(cls, body: bytes, *, pause: float = 0.0, hold: bool = False, **headers: str) -> Answer:
        """An event stream, written one event (blank-line separated block) at a time."""
        events = [part + b"\n\n" for part in re.split(rb"\n\n", body) if part.strip()]
        return cls(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache", **headers},
            chunks=events,
            pause=pause,
            hold=hold,
        )

    @classmethod
    def json(cls, payload: Any, status: int = 200, **headers: str) -> Answer:
        return cls(
            status=status,
            headers={"content-type": "application/json", **headers},
            chunks=[json.dumps(payload).encode()],
        )


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many"}


class Replay:
    """A loopback HTTP/1.1 server that plays scripted answers; one per test."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], list[Answer]]] = []
        self.received: list[Received] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)
        self.port: int = self._listening_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _listening_port(self) -> int:
        assert self._server is not None, "the replay server did not start"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def on(self, method: str, path: str, *answers: Answer) -> Replay:
        """Answer `method path` (a regex matched against the whole path and query) with
        these answers in turn; the last one repeats."""
        self.routes.append((method, re.compile(path), list(answers)))
        return self

    def requests_to(self, method: str, path: str) -> list[Received]:
        pattern = re.compile(path)
        return [r for r in self.received if r.method == method and pattern.fullmatch(r.path)]

    def release(self) -> None:
        """Close every held stream (as a provider ending the connection would)."""
        self._loop.call_soon_threadsafe(self._close_held)

    def close(self) -> None:
        self.release()
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # --- The server ---------------------------------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    def _close_held(self) -> None:
        for writer in self._held:
            writer.close()
        self._held.clear()

    def _answer_for(self, method: str, path: str) -> Answer:
        for route_method, pattern, answers in self.routes:
            if route_method == method and pattern.fullmatch(path):
                return answers.pop(0) if len(answers) > 1 else answers[0]
        return Answer.json({"error": f"no scripted answer for {method} {path}"}, status=404)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        self.received.append(Received(method, path, headers, body))
        answer = self._answer_for(method, path)
        reason = REASONS.get(answer.status, "Status")
        out = [f"HTTP/1.1 {answer.status} {reason}", "connection: close"]
        out += [f"{name}: {value}" for name, value in answer.headers.items()]
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        try:
            for index, chunk in enumerate(answer.chunks):
                if index and answer.pause:
                    await asyncio.sleep(answer.pause)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            writer.close()
            return
        if answer.hold:
            self._held.append(writer)
            return
        writer.close()


def replay() -> Iterator[Replay]:
    """Body of the `replay` fixture (tests/conftest.py)."""
    server = Replay()
    try:
        yield server
    finally:
        server.close()


def finished(events: list[Event]) -> Finished:
    """The run's one Finished, which must be its last event."""
    ends = [e for e in events if isinstance(e, Finished)]
    assert len(ends) == 1, events
    assert events[-1] is ends[0], "nothing may follow the run's end"
    return ends[0]


def event_of[E](kind: type[E], event: object) -> E:
    """The event, checked to be of this kind (and typed as it)."""
    assert isinstance(event, kind), event
    return event
