"""Rate limits on launch, stop and login: a window opened by the first attempt and counted in
the cache, so every web process shares it when the cache is Redis (scaled out)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limited:
    scope: str
    retry_after: int

    @property
    def message(self) -> str:
        what = {
            "launch": "launches",
            "stop": "stop requests",
            "login": "failed logins",
            "login_name": "failed logins for this username",
        }
        return (
            f"Too many {what.get(self.scope, 'requests')} in a short time. "
            f"Try again in {self.retry_after} s."
        )


def hit(scope: str, who: str) -> Limited | None:
    """Count one attempt; None while within the limit, else how long to wait. Sync, so a view
    checks it in the same thread hop as its database work."""
    try:
        return _hit(scope, who)
    except Exception as exc:
        # The cache (Redis, scaled out) is down: a limiter that cannot count must not keep
        # anyone from stopping a run, so it lets the attempt through.
        logger.warning("rate limit %s not counted, the cache failed: %s", scope, exc)
        return None


async def ahit(scope: str, who: str) -> Limited | None:
    """`hit` from async code: one thread hop for all its cache calls."""
    return await sync_to_async(hit)(scope, who)


def _hit(scope: str, who: str) -> Limited | None:
    limit, seconds = settings.RUNBRAKE_RATE_LIMITS[scope]
    key = f"rl:{scope}:{who}"
    now = time.time()
    # The first attempt opens the window (both keys expire with it); later ones count in it:
    # one cache call each while the window is open.
    if cache.add(key, 1, seconds):
        cache.set(f"{key}:opened", now, seconds)
        count = 1
    else:
        try:
            count = cache.incr(key)
        except ValueError:  # the window closed between add and incr: this attempt opens one
            cache.set(f"{key}:opened", now, seconds)
            cache.set(key, 1, seconds)
            count = 1
    if count <= limit:
        return None
    opened = cache.get(f"{key}:opened", now)
    return Limited(scope, max(1, round(opened + seconds - now)))


def peek(scope: str, who: str) -> Limited | None:
    """Whether `who` is over the limit now, without counting an attempt (a login checks
    before it tries and counts only failures)."""
    try:
        limit, seconds = settings.RUNBRAKE_RATE_LIMITS[scope]
        key = f"rl:{scope}:{who}"
        count = cache.get(key, 0)
        if count < limit:
            return None
        now = time.time()
        opened = cache.get(f"{key}:opened", now)
        return Limited(scope, max(1, round(opened + seconds - now)))
    except Exception as exc:
        logger.warning("rate limit %s not read, the cache failed: %s", scope, exc)
        return None
