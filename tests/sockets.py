"""A websocket through the real ASGI stack (origin check, session auth, channel layer), always
disconnected when the block ends, however it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from webapp.asgi import application


@sync_to_async
def session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


class TextSocket(WebsocketCommunicator):
    """Runbrake's sockets send text frames only."""

    async def receive_from(self, timeout: float = 1) -> str:
        frame = await super().receive_from(timeout)
        assert isinstance(frame, str), frame
        return frame


@asynccontextmanager
async def websocket(
    path: str, user: Any = None, origin: str = "http://localhost"
) -> AsyncIterator[tuple[TextSocket, bool]]:
    """`async with websocket(path, bob) as (socket, connected):` — a refused handshake too."""
    headers = [(b"origin", origin.encode()), (b"host", b"localhost")]
    if user is not None:
        headers.append((b"cookie", f"sessionid={await session_cookie(user)}".encode()))
    communicator = TextSocket(application, path, headers=headers)
    try:
        connected, _ = await communicator.connect()
        yield communicator, connected
    finally:
        await communicator.disconnect()
