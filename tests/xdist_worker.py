"""Loaded before Django reads its settings (`-p tests.xdist_worker` in pyproject's addopts).

Under pytest-xdist (`make test` runs the suite on several workers) each worker's test
database is its own already: pytest-django adds the worker id to its name. Redis is shared,
and run ids restart at 1 in every worker's database, so two workers would hear each other's
"run-1" pushes, and one's `cache.clear()` (FLUSHDB) would wipe the other's rate limits. Each
worker gets a Redis database of its own (the cache) and a prefix of its own (pub/sub ignores
database numbers); its server subprocesses inherit both through the environment."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

_worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
_url = os.environ.get("REDIS_URL", "")
if _worker and _url:
    os.environ["RUNBRAKE_REDIS_PREFIX"] = (
        f"{os.environ.get('RUNBRAKE_REDIS_PREFIX', 'asgi')}-{_worker}"
    )
    _parts = urlsplit(_url)
    if _parts.scheme in ("redis", "rediss"):
        # Redis has 16 databases: 0 stays the caller's, workers take 1-15.
        _db = 1 + int(_worker.removeprefix("gw")) % 15
        os.environ["REDIS_URL"] = _parts._replace(path=f"/{_db}").geturl()
