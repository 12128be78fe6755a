"""ASGI lifespan: start the embedded watcher with the server, stop it on shutdown."""

from __future__ import annotations

from typing import Any

from . import watcher


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            watcher.start_embedded()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await watcher.stop_embedded()
            await send({"type": "lifespan.shutdown.complete"})
            return
