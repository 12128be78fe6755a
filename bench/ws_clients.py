"""A websocket load generator (its own process): opens authenticated sockets, then obeys
commands on stdin and answers one JSON line on stdout per command.

    ws_clients.py '<json: {"urls": [...], "cookies": [...], "n": N,
                           "concurrency": 50, "deadline": seconds}>'
    first line: {"ready": sockets open, "failed": refused or timed out, "seconds": ...}
    stdin: WATCH <seconds> <regex>   -> {"armed": true}, then
                                        {"times": [first time.time() each socket matched],
                                         "sockets": sockets open}
           RECORD                    -> start keeping [time, status, output end] per message
           UNTIL <seconds> <regex>   -> once every socket's records hold a status matching
                                        the regex (or the seconds are up): {"missing": n}
           DUMP                      -> {"records": {url: [[t, status, end], ...]}}
           RECONNECT <seconds> <concurrency>
                                     -> every socket drops its connection at once (as a
                                        network blip or a killed proxy would) and connects
                                        again, retrying until the deadline:
                                        {"sockets", "reconnected", "attempts_failed",
                                         "seconds" (until the last had its snapshot)}
           QUIT

Both wire formats of the run page are read: HTML fragments (text starting with `<`) and JSON
frames (text starting with `{`). A frame's output end is the character count it brings the
run's output to: `end` of an `output.append` or `output.text` frame, `data-output-end` on an
HTML output section, or else that section's "<n> characters" line; -1 when it carries none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import resource
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

ORIGIN = "http://127.0.0.1"
STATUS = re.compile(r'id="run-status-\d+"[^>]*data-status="(\w+)"')
OUTPUT_END = re.compile(r'id="run-output-\d+"[^>]*data-output-end="(\d+)"')
CHARS = re.compile(r"([\d,]+) characters")
RUN_URL = re.compile(r"/ws/runs/(\d+)/")


def parse(text: str, run_id: int | None = None) -> tuple[str, int]:
    """(status, output end) that one frame shows; "" and -1 for what it does not carry."""
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            return "", -1
        if not isinstance(doc, dict):
            return "", -1
        if run_id is not None and doc.get("run") not in (None, run_id):
            return "", -1
        status = doc.get("status")
        end = doc.get("end")
        return (
            status if isinstance(status, str) else "",
            end if isinstance(end, int) and str(doc.get("type", "")).startswith("output") else -1,
        )
    found = STATUS.search(text)
    status = found.group(1) if found else ""
    marked = OUTPUT_END.search(text)
    if marked:
        return status, int(marked.group(1))
    # Today's HTML: the output section's "<n> characters" line (or "Showing the last m of
    # <n> characters" above a long output's tail).
    section = text.find('id="run-output-')
    close = text.find("</section>", section)
    chars = (
        CHARS.search(text, section, close if close >= 0 else len(text)) if section >= 0 else None
    )
    return status, int(chars.group(1).replace(",", "")) if chars else -1


class Sockets:
    def __init__(self, urls: list[str], cookies: list[str]) -> None:
        self.urls = urls
        self.cookies = cookies
        self.conns: dict[int, ClientConnection] = {}
        self.marker: re.Pattern[str] | None = None
        self.seen: dict[int, float] = {}
        self.all_seen = asyncio.Event()
        self.recording = False
        self.records: dict[str, list[tuple[float, str, int]]] = {}
        self.failed = 0
        self.readers: set[asyncio.Task[None]] = set()

    def url(self, index: int) -> str:
        return self.urls[index % len(self.urls)]

    async def open(
        self, index: int, sem: asyncio.Semaphore, deadline: float, retry: bool = False
    ) -> bool:
        """Connect socket `index` and take its snapshot; with retry, try again (jittered)
        until the deadline, as a browser's page would."""
        url = self.url(index)
        cookie = self.cookies[index % len(self.cookies)]
        while True:
            if deadline <= time.monotonic():
                return False
            async with sem:
                # Checked again once its turn comes: no attempt starts after the deadline.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    ws = await connect(
                        url,
                        additional_headers={"Cookie": f"sessionid={cookie}", "Origin": ORIGIN},
                        compression=None,
                        max_size=2**22,
                        ping_interval=None,
                        open_timeout=remaining + 5,
                        close_timeout=2,
                    )
                    await asyncio.wait_for(ws.recv(), remaining + 5)  # the snapshot
                except Exception as exc:
                    self.failed += 1
                    if self.failed <= 3:
                        print(f"connect failed: {exc!r}", file=sys.stderr)
                    if not retry:
                        return False
                    await asyncio.sleep(random.uniform(0.5, 1.5))
                    continue
            self.conns[index] = ws
            task = asyncio.create_task(self.read(index, url, ws))
            self.readers.add(task)
            task.add_done_callback(self.readers.discard)
            return True

    async def read(self, index: int, url: str, ws: ClientConnection) -> None:
        found = RUN_URL.search(url)
        run_id = int(found.group(1)) if found else None
        try:
            async for message in ws:
                now = time.time()
                text = message if isinstance(message, str) else message.decode()
                if self.marker is not None and index not in self.seen and self.marker.search(text):
                    self.seen[index] = now
                    if len(self.seen) >= len(self.conns):
                        self.all_seen.set()
                if self.recording:
                    status, end = parse(text, run_id)
                    self.records.setdefault(url, []).append((now, status, end))
        except Exception:
            pass
        finally:
            if self.conns.get(index) is ws:
                del self.conns[index]

    async def until(self, seconds: float, status: re.Pattern[str]) -> int:
        """Wait until every socket's page has shown a status matching `status`."""
        deadline = time.monotonic() + seconds
        while True:
            missing = sum(
                1
                for i in list(self.conns)
                if not any(status.fullmatch(r[1]) for r in self.records.get(self.url(i), []))
            )
            if not missing or time.monotonic() > deadline:
                return missing
            await asyncio.sleep(0.1)

    async def open_all(self, n: int, concurrency: int, seconds: float) -> dict[str, Any]:
        sem = asyncio.Semaphore(concurrency)
        started = time.monotonic()
        deadline = started + seconds
        await asyncio.gather(*(self.open(i, sem, deadline) for i in range(n)))
        return {
            "ready": len(self.conns),
            "failed": self.failed,
            "seconds": round(time.monotonic() - started, 2),
        }

    async def reconnect(self, seconds: float, concurrency: int) -> dict[str, Any]:
        indices = sorted(self.conns)
        started = time.monotonic()
        for i in indices:
            # An abrupt drop (no closing handshake): what the server sees when a network
            # blip or a restarted proxy cuts every connection at once.
            self.conns.pop(i).transport.abort()
        self.failed = 0
        sem = asyncio.Semaphore(concurrency)
        deadline = started + seconds
        done = await asyncio.gather(*(self.open(i, sem, deadline, retry=True) for i in indices))
        return {
            "sockets": len(indices),
            "reconnected": sum(done),
            "attempts_failed": self.failed,
            "seconds": round(time.monotonic() - started, 2),
        }


async def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spec = json.loads(sys.argv[1])
    s = Sockets(spec["urls"], spec["cookies"])
    say(await s.open_all(spec["n"], spec.get("concurrency", 50), spec.get("deadline", 600)))
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
            say({"times": list(s.seen.values()), "sockets": len(s.conns)})
        elif command == "RECORD":
            s.records, s.recording = {}, True
            say({"recording": True})
        elif command == "UNTIL":
            seconds, _, pattern = rest.partition(" ")
            say({"missing": await s.until(float(seconds), re.compile(pattern))})
        elif command == "DUMP":
            s.recording = False
            say({"records": s.records})
        elif command == "RECONNECT":
            seconds, _, concurrency = rest.partition(" ")
            say(await s.reconnect(float(seconds), int(concurrency or 500)))
    for ws in list(s.conns.values()):
        ws.transport.abort()


def say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
