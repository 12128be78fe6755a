"""ASGI lifespan: start the embedded watcher with the server, stop it on shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

from runs.watcher import watcher


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while True:
        try:
            message = await receive()
        except asyncio.CancelledError:
            # A forced exit (a second Ctrl-C) sends no shutdown event and cancels us at the
            # end; `serve` has already handed the runs back by then. Returning keeps uvicorn
            # from logging the cancellation as a traceback.
            return
        if message["type"] == "lifespan.startup":
            watcher.start_embedded()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await watcher.stop_embedded()
            await send({"type": "lifespan.shutdown.complete"})
            return
