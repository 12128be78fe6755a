"""Run a watcher as its own process (the scaled-out topology).

Watchers claim runs through the database with leases, so any number of these can run beside
any number of web processes. SIGTERM or SIGINT hands the runs back and exits: start calls in
flight get their provider ids first, and the leases are released so another watcher takes
the runs on its next tick.
"""

import asyncio
import logging
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Follow runs at their providers in this process (scale out with several)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--capacity",
            type=int,
            default=None,
            help="Most runs this watcher follows at once "
            f"(default RUNBRAKE_WATCHER_CAPACITY={settings.RUNBRAKE_WATCHER_CAPACITY}).",
        )
        parser.add_argument(
            "--loop-lag-file",
            default="",
            help="Measurement (bench/): sample the event loop's lag, as `serve` does.",
        )

    def handle(self, *args: Any, capacity: int | None, loop_lag_file: str, **options: Any) -> None:
        asyncio.run(self._main(capacity, loop_lag_file))

    async def _main(self, capacity: int | None, lag_file: str) -> None:
        from runs.management.commands.serve import start_loop_lag_probe
        from runs.watcher.watcher import Watcher

        if lag_file:
            start_loop_lag_probe(lag_file)
        watcher = Watcher(capacity=capacity)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, watcher.request_shutdown)
        self.stdout.write(f"Runbrake watcher {watcher.identity} running", ending="\n")
        self.stdout.flush()
        try:
            await watcher.run_forever()
        finally:
            await watcher.shutdown()
        self.stdout.write(f"Runbrake watcher {watcher.identity} stopped", ending="\n")
