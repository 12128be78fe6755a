"""Serve Runbrake on one port: web pages, websockets, the simulators and the embedded watcher.

Two ASGI servers, same flags: daphne (the default) and uvicorn. daphne sends no ASGI lifespan
events, so this command starts the watcher itself once daphne is listening; uvicorn starts it
through the lifespan handler in webapp/asgi.py. Both refuse websocket messages over 64 KiB.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

logger = logging.getLogger(__name__)

# Bounded frames: an oversized websocket message is refused, not buffered.
MAX_WS_MESSAGE = 64 * 1024


class Command(BaseCommand):
    help = "Run Runbrake (daphne or uvicorn) on one port: pages, websockets, simulators, watcher."

    def add_arguments(self, parser: CommandParser) -> None:
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

    def handle(
        self,
        *args: Any,
        host: str,
        port: int,
        server: str,
        no_watcher: bool,
        loop_lag_file: str,
        **options: Any,
    ) -> None:
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
        from twisted.internet import defer
        from twisted.internet import reactor as twisted_reactor

        from runs.watcher import watcher
        from webapp.asgi import application

        # Typed through IReactorCore, whose stub leaves out `self`.
        reactor: Any = twisted_reactor
        listening: list[Any] = []

        class Daphne(Server):
            # daphne (pinned <5) hands each listening port to listen_success; keeping them
            # lets a shutdown stop listening first, so a restart can bind at once.
            def listen_success(self, port: Any) -> None:
                listening.append(port)
                super().listen_success(port)  # type: ignore[no-untyped-call] # daphne: untyped

        def ready() -> None:
            loop = asyncio.get_event_loop()
            if not no_watcher:
                loop.call_soon(watcher.start_embedded)
            # If the reactor stops some other way, the watcher still hands its runs back.
            reactor.addSystemEventTrigger(
                "before",
                "shutdown",
                lambda: defer.Deferred.fromFuture(asyncio.ensure_future(watcher.stop_embedded())),
            )

            def on_signal() -> None:
                if self._stopping:
                    self._hurry()
                    return
                self._stopping = True
                for listener in listening:
                    listener.stopListening()
                task = loop.create_task(self._shut_down())
                task.add_done_callback(lambda _: reactor.stop())

            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, on_signal)
            if lag_file:
                loop.call_soon(start_loop_lag_probe, lag_file)
            self.stdout.write(banner, ending="\n")
            self.stdout.flush()

        Daphne(  # type: ignore[no-untyped-call] # daphne has no annotations
            application=application,
            endpoints=[f"tcp:port={port}:interface={host}"],
            ready_callable=ready,
            # Ours (in ready): stop listening, send pages elsewhere, hand the runs back, then
            # stop the reactor; twisted's own would stop it first, port still held.
            signal_handlers=False,
            websocket_max_message_size=MAX_WS_MESSAGE,
            websocket_max_frame_size=MAX_WS_MESSAGE,
            application_close_timeout=5,
            verbosity=0,
        ).run()

    _stopping = False

    async def _shut_down(self) -> None:
        """After the port is closed: tell open pages to reconnect, then hand the runs back."""
        from runs.realtime import consumers
        from runs.watcher import watcher

        self.stdout.write(
            "Shutting down: handing the runs back (Ctrl-C again to stop waiting for streams "
            "that end when their connection closes).",
            ending="\n",
        )
        self.stdout.flush()
        await consumers.close_all_for_restart()
        await watcher.stop_embedded()

    def _hurry(self) -> None:
        from runs.watcher import watcher

        watcher.hurry_embedded()

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

        command = self

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                if self.started:
                    stdout.write(banner, ending="\n")
                    stdout.flush()

            def handle_exit(self, sig: int, frame: Any) -> None:
                if self.should_exit:
                    command._hurry()  # a second Ctrl-C
                super().handle_exit(sig, frame)

            async def shutdown(self, sockets: Any = None) -> None:
                # uvicorn would wait for every connection (the in-process simulators' streams
                # to our own watcher among them) before the lifespan stops the watcher: stop
                # listening, then the watcher, then let uvicorn close what is left.
                for listener in self.servers:
                    listener.close()
                await command._shut_down()
                await super().shutdown(sockets)

        # uvicorn raises the Ctrl-C it caught again once it has shut down; it is done.
        with contextlib.suppress(KeyboardInterrupt):
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
