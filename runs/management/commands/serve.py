"""Serve Runbrake on one port: web pages, websockets, the simulators and the embedded watcher.

Two ASGI servers, same flags: daphne (the default) and uvicorn. daphne sends no ASGI lifespan
events, so this command starts the watcher itself once daphne is listening; uvicorn starts it
through the lifespan handler in webapp/asgi.py. Both refuse websocket messages over 64 KiB.
"""

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

logger = logging.getLogger(__name__)

# Bounded frames: an oversized websocket message is refused, not buffered.
MAX_WS_MESSAGE = 64 * 1024


class Command(BaseCommand):
    help = "Run Runbrake (daphne or uvicorn) on one port: pages, websockets, simulators, watcher."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--server", choices=("daphne", "uvicorn"), default="daphne")
        parser.add_argument(
            "--no-watcher", action="store_true", help="Serve only; another process watches."
        )
        parser.add_argument(
            "--loop-lag-file",
            default="",
            help="Measurement: sample the event loop's lag every 10 ms and write the "
            "samples (ms) to this file as JSON once a second.",
        )

    def handle(self, *args, host, port, server, no_watcher, loop_lag_file, **options):
        if not settings.RUNBRAKE_EMBEDDED_WATCHER:
            no_watcher = True
        banner = f"Runbrake listening on http://{host}:{port}/ ({server})"
        if server == "uvicorn":
            self._uvicorn(host, port, no_watcher, loop_lag_file, banner)
        else:
            self._daphne(host, port, no_watcher, loop_lag_file, banner)

    def _daphne(self, host: str, port: int, no_watcher: bool, lag_file: str, banner: str) -> None:
        import daphne.server  # noqa: F401 - installs the asyncio reactor before anything else
        from daphne.server import Server

        from runs import watcher
        from webapp.asgi import application

        def ready() -> None:
            loop = asyncio.get_event_loop()
            if not no_watcher:
                loop.call_soon(watcher.start_embedded)
                # SIGTERM: hand the watcher's runs back before the reactor stops (what
                # uvicorn's lifespan shutdown does), instead of dropping them mid-call.
                from twisted.internet import defer
                from twisted.internet import reactor as twisted_reactor

                # Typed through IReactorCore, whose stub leaves out `self`.
                reactor: Any = twisted_reactor
                reactor.addSystemEventTrigger(
                    "before",
                    "shutdown",
                    lambda: defer.Deferred.fromFuture(
                        asyncio.ensure_future(watcher.stop_embedded())
                    ),
                )
            if lag_file:
                loop.call_soon(start_loop_lag_probe, lag_file)
            self.stdout.write(banner, ending="\n")
            self.stdout.flush()

        Server(
            application=application,
            endpoints=[f"tcp:port={port}:interface={host}"],
            ready_callable=ready,
            websocket_max_message_size=MAX_WS_MESSAGE,
            websocket_max_frame_size=MAX_WS_MESSAGE,
            application_close_timeout=5,
            verbosity=0,
        ).run()

    def _uvicorn(self, host: str, port: int, no_watcher: bool, lag_file: str, banner: str) -> None:
        try:
            import uvicorn
        except ImportError:  # pragma: no cover - uvicorn is a locked dependency
            raise CommandError("uvicorn is not installed.") from None

        from webapp.asgi import application

        app: Any = application
        if lag_file:
            app = _with_loop_lag_probe(application, lag_file)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            # The lifespan handler only starts and stops the embedded watcher.
            lifespan="off" if no_watcher else "on",
            ws_max_size=MAX_WS_MESSAGE,
            # Compression would cost a zlib context per socket (tens of KiB) for fragments
            # of a few KiB; daphne does not compress either.
            ws_per_message_deflate=False,
            log_level="warning",
            # Keep Django's LOGGING (its handler scrubs secrets); uvicorn's own config would
            # give its loggers handlers of their own.
            log_config=None,
            access_log=False,
            server_header=False,
            # X-Forwarded-For/-Proto are believed only from the proxies named in
            # RUNBRAKE_TRUSTED_PROXIES (uvicorn's default trusts 127.0.0.1, so any client of a
            # proxy on the same host could reset its own login limit with a fresh header).
            proxy_headers=bool(settings.RUNBRAKE_TRUSTED_PROXIES),
            forwarded_allow_ips=settings.RUNBRAKE_TRUSTED_PROXIES or None,
        )
        stdout = self.stdout

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                if self.started:
                    stdout.write(banner, ending="\n")
                    stdout.flush()

        Server(config).run()


def _with_loop_lag_probe(application: Any, lag_file: str) -> Any:
    started = False

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal started
        if not started:
            started = True
            start_loop_lag_probe(lag_file)
        await application(scope, receive, send)

    return app


def start_loop_lag_probe(lag_file: str) -> None:
    """How late the loop wakes a 10 ms sleep: the delay every handler on this loop sees."""
    path = Path(lag_file)

    async def probe() -> None:
        samples: list[float] = []
        last_write = time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            samples.append(max(0.0, (time.monotonic() - before - 0.01) * 1000))
            if time.monotonic() - last_write >= 1.0:
                last_write = time.monotonic()
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(samples[-200_000:]))
                tmp.replace(path)

    task = asyncio.get_running_loop().create_task(probe())
    _probes.add(task)


_probes: set[asyncio.Task[None]] = set()
