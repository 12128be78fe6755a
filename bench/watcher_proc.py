"""The watcher in its own process (until `manage.py runwatcher` lands): Watcher().run_forever()
with the same event-loop lag probe the web servers get from `serve --loop-lag-file`."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

import django

django.setup()

from runs.management.commands.serve import start_loop_lag_probe  # noqa: E402
from runs.watcher import Watcher  # noqa: E402


async def main(lag_file: str) -> None:
    if lag_file:
        start_loop_lag_probe(lag_file)
    await Watcher().run_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else ""))
