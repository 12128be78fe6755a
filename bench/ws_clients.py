"""A websocket load generator (its own process): opens authenticated sockets, then obeys
commands on stdin and answers one JSON line on stdout per command.

    ws_clients.py '<json: {"urls": [...], "cookies": [...], "n": N}>'
    stdin: WATCH <seconds> <regex>   -> {"times": [first time.time() each socket matched]}
           RECORD                    -> start keeping (time, status, characters) per message
           DUMP                      -> {"records": {url: [[t, status, chars], ...]}}
           QUIT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

ORIGIN = "http://127.0.0.1"
STATUS = re.compile(r'id="run-status-\d+"[^>]*data-status="(\w+)"')
CHARS = re.compile(r"([\d,]+) characters")


class Sockets:
    def __init__(self) -> None:
        self.conns: list[tuple[str, ClientConnection]] = []
        self.marker: re.Pattern[str] | None = None
        self.seen: dict[int, float] = {}
        self.all_seen = asyncio.Event()
        self.recording = False
        self.records: dict[str, list[tuple[float, str, int]]] = {}
        self.failed = 0
        self.closed = 0
        self.readers: set[asyncio.Task[None]] = set()

    async def open(self, url: str, cookie: str, sem: asyncio.Semaphore) -> None:
        async with sem:
            try:
                ws = await connect(
                    url,
                    additional_headers={"Cookie": f"sessionid={cookie}", "Origin": ORIGIN},
                    compression=None,
                    max_size=2**22,
                    ping_interval=None,
                    open_timeout=120,
                )
                await asyncio.wait_for(ws.recv(), 120)  # the snapshot
            except Exception as exc:
                self.failed += 1
                if self.failed <= 3:
                    print(f"connect failed: {exc!r}", file=sys.stderr)
                return
        index = len(self.conns)
        self.conns.append((url, ws))
        self.readers.add(asyncio.create_task(self.read(index, url, ws)))

    async def read(self, index: int, url: str, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                now = time.time()
                text = message if isinstance(message, str) else message.decode()
                if self.marker is not None and index not in self.seen and self.marker.search(text):
                    self.seen[index] = now
                    if len(self.seen) >= len(self.conns) - self.closed:
                        self.all_seen.set()
                if self.recording:
                    status = STATUS.search(text)
                    chars = CHARS.search(text)
                    self.records.setdefault(url, []).append(
                        (
                            now,
                            status.group(1) if status else "",
                            int(chars.group(1).replace(",", "")) if chars else -1,
                        )
                    )
        except Exception:
            pass
        finally:
            self.closed += 1


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spec = json.loads(sys.argv[1])
    urls: list[str] = spec["urls"]
    cookies: list[str] = spec["cookies"]
    n: int = spec["n"]
    s = Sockets()
    sem = asyncio.Semaphore(spec.get("concurrency", 50))
    started = time.monotonic()
    await asyncio.gather(
        *(s.open(urls[i % len(urls)], cookies[i % len(cookies)], sem) for i in range(n))
    )
    say({"ready": len(s.conns), "failed": s.failed, "seconds": time.monotonic() - started})
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line or line == "QUIT":
            break
        command, _, rest = line.partition(" ")
        if command == "WATCH":
            seconds, _, marker = rest.partition(" ")
            s.seen, s.marker = {}, re.compile(marker)
            s.all_seen = asyncio.Event()
            say({"armed": True})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.all_seen.wait(), float(seconds))
            s.marker = None
            say({"times": list(s.seen.values()), "sockets": len(s.conns) - s.closed})
        elif command == "RECORD":
            s.records, s.recording = {}, True
            say({"recording": True})
        elif command == "DUMP":
            s.recording = False
            say({"records": s.records})
    for _url, ws in s.conns:
        await ws.close()


def say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
