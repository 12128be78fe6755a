"""Liveness and readiness for load balancers and process supervisors.

- `/healthz`: the process answers (nothing else is checked, so a database outage does not get
  every web process restarted at once).
- `/readyz`: this process can do its job: the database answers, and so does the channel layer
  when it is shared (Redis). 503 with the failing check named otherwise, so a load balancer
  takes the process out of rotation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0


@never_cache
@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
async def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, Any] = {}
    ready = True
    for name, check in (("database", _database), ("channel_layer", _channel_layer)):
        started = time.perf_counter()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                detail = await check()
        except Exception:  # any failure means "not ready"
            # The details (hosts, users) go to the log, not to whoever asks.
            logger.warning("readiness check %s failing", name, exc_info=True)
            ready = False
            checks[name] = "failing"
        else:
            ms = round((time.perf_counter() - started) * 1000, 1)
            checks[name] = detail or f"ok ({ms} ms)"
    return JsonResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


@sync_to_async
def _database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return ""


async def _channel_layer() -> str:
    layer = get_channel_layer()
    if layer is None:
        return "none configured"
    if isinstance(layer, InMemoryChannelLayer):
        return "in-process"
    # A send to a throwaway group crosses the wire to Redis and back.
    await layer.group_send("runbrake-readiness", {"type": "readiness.probe"})
    return ""
