"""Helpers for the reliability tests: a real server process (daphne through `manage.py serve`,
or uvicorn) on the test's own database, real websocket clients with a session cookie, the
server's memory, and waiting for a condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, overload
from urllib.parse import quote, urlencode

from asgiref.sync import sync_to_async

from tests.conftest import ROOT, Server, free_port


def database_url() -> str:
    """A DATABASE_URL for the test database, as a server subprocess must open it."""
    from django.db import connection

    s = connection.settings_dict
    if connection.vendor == "sqlite":
        name = str(s["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise RuntimeError("These tests need a file-backed SQLite test database.")
        return f"sqlite:///{Path(name).resolve()}"
    user = quote(str(s.get("USER") or ""), safe="")
    password = quote(str(s.get("PASSWORD") or ""), safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    port = f":{s['PORT']}" if s.get("PORT") else ""
    url = f"postgres://{auth}{s.get('HOST') or ''}{port}/{quote(str(s['NAME']), safe='')}"
    options = {k: v for k, v in (s.get("OPTIONS") or {}).items() if isinstance(v, str)}
    return f"{url}?{urlencode(options)}" if options else url


def serve(*, env: dict[str, str] | None = None, watcher: bool = True) -> Server:
    """`manage.py serve` (daphne, embedded watcher, simulators) on the test database."""
    return Server(
        watcher=watcher,
        env={"DATABASE_URL": database_url(), "DJANGO_ALLOW_ASYNC_UNSAFE": "", **(env or {})},
    )


class Uvicorn(Server):
    """The same application under uvicorn; its lifespan starts the embedded watcher."""

    def __init__(self, *, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = tempfile.mkdtemp(prefix="runbrake-sim-")
        self.inspect_token = secrets.token_urlsafe(16)
        full_env = {
            **os.environ,
            "RUNBRAKE_SIM_STATE_DIR": self.state_dir,
            "RUNBRAKE_SIM_INSPECT_TOKEN": self.inspect_token,
            "DATABASE_URL": database_url(),
            "DJANGO_ALLOW_ASYNC_UNSAFE": "",
            "RUNBRAKE_EMBEDDED_WATCHER": "true",
            **(env or {}),
        }
        self.log = open(ROOT / f".server-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "webapp.asgi:application"),
                *("--host", "127.0.0.1", "--port", str(self.port)),
                *("--ws-max-size", "65536", "--log-level", "warning"),
            ],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@overload
async def eventually[T](
    check: Callable[[], Awaitable[T]], what: str, timeout: float = 20.0
) -> T: ...
@overload
async def eventually[T](check: Callable[[], T], what: str, timeout: float = 20.0) -> T: ...
async def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` past the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@sync_to_async
def session_cookie(user: Any) -> str:
    from django.conf import settings
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def open_socket(server: Server, path: str, user: Any) -> Any:
    """A real websocket client, as a browser on the server's own origin connects."""
    from websockets.asyncio.client import connect

    return await connect(
        server.url.replace("http://", "ws://") + path,
        origin=server.url,  # type: ignore[arg-type]
        additional_headers={"Cookie": await session_cookie(user)},
        max_size=None,
        open_timeout=10,
    )


async def raw_socket_that_never_reads(server: Server, path: str, user: Any) -> socket.socket:
    """Completes the websocket handshake, then never reads another byte (a frozen tab)."""
    sock = socket.socket()
    # A small receive window makes the kernel hold little, so what piles up is the server's.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {server.url}\r\nCookie: {await session_cookie(user)}\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    sock.settimeout(10)
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.to_thread(sock.recv, 1)
        if not chunk:
            raise AssertionError(f"handshake refused: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
