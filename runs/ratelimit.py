"""Rate limits on launch, stop and login: fixed windows counted in the cache, so every web
process shares them when the cache is Redis (scaled out); one process needs nothing more."""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache


@dataclass(frozen=True)
class Limited:
    scope: str
    retry_after: int

    @property
    def message(self) -> str:
        what = {"launch": "launches", "stop": "stop requests", "login": "login attempts"}
        return (
            f"Too many {what.get(self.scope, 'requests')} in a short time. "
            f"Try again in {self.retry_after} s."
        )


def _window(scope: str) -> tuple[int, int]:
    limit, seconds = settings.RUNBRAKE_RATE_LIMITS[scope]
    return limit, seconds


async def ahit(scope: str, who: str) -> Limited | None:
    """Count one attempt; None while within the limit, else how long to wait."""
    limit, seconds = _window(scope)
    start = int(time.time()) // seconds * seconds
    key = f"rl:{scope}:{who}:{start}"
    await cache.aadd(key, 0, seconds + 1)
    try:
        count = await cache.aincr(key)
    except ValueError:  # expired between add and incr: this attempt opens a new window
        await cache.aset(key, 1, seconds + 1)
        count = 1
    if count <= limit:
        return None
    return Limited(scope, max(1, start + seconds - int(time.time())))
