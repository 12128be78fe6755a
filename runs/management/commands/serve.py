"""Serve Runbrake with daphne: web pages, websockets, the simulators and the embedded watcher.

daphne sends no ASGI lifespan events, so this command starts the watcher itself once the
server is listening (uvicorn users get the same through the lifespan handler in asgi.py).
"""

import asyncio
import logging

import daphne.server  # noqa: F401 - installs the asyncio reactor before anything else
from django.conf import settings
from django.core.management.base import BaseCommand

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Run Runbrake (daphne) on one port: pages, websockets, simulators and watcher."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--no-watcher", action="store_true", help="Serve only; another process watches."
        )

    def handle(self, *args, host, port, no_watcher, **options):
        from daphne.server import Server

        from runs import watcher
        from webapp.asgi import application

        def ready() -> None:
            if not no_watcher:
                asyncio.get_event_loop().call_soon(watcher.start_embedded)
            self.stdout.write(f"Runbrake listening on http://{host}:{port}/", ending="\n")
            self.stdout.flush()

        if not settings.RUNBRAKE_EMBEDDED_WATCHER:
            no_watcher = True
        Server(
            application=application,
            endpoints=[f"tcp:port={port}:interface={host}"],
            ready_callable=ready,
            # Bounded frames: an oversized websocket message is refused, not buffered.
            websocket_max_message_size=64 * 1024,
            websocket_max_frame_size=64 * 1024,
            application_close_timeout=5,
            verbosity=0,
        ).run()
