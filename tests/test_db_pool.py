"""On PostgreSQL, connections come from Django's pool, and every thread that takes one gives it
back: each request's own thread, and the watcher's heartbeat threads. One that did not would
keep it for good, and the pool would run dry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from django.db import connection, connections

from runs.models import ApiToken
from runs.watcher.watcher import _claim
from webapp.asgi import application

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the pool is PostgreSQL's"),
]


def pool() -> Any:
    from django.db.backends.postgresql.base import DatabaseWrapper

    wrapper = connections["default"]
    assert isinstance(wrapper, DatabaseWrapper)
    return wrapper.pool


def in_use() -> int:
    stats = pool().get_stats()
    return stats["pool_size"] - stats["pool_available"]


@pytest.fixture
def run(launch: Any) -> Any:
    # Made here, on the test's own thread: no other thread keeps a connection after the test.
    return launch()


async def test_the_watchers_heartbeat_threads_give_their_connections_back(run):
    before = in_use()
    # More heartbeats than the pool has connections, on the loop's own worker threads.
    for _ in range(pool().max_size + 5):
        assert await _claim("pool-test", 10) == [run.pk]
    assert in_use() == before


async def get(path: str, token: str) -> dict[str, Any]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("localhost", 80),
    }
    app = ApplicationCommunicator(application, scope)
    await app.send_input({"type": "http.request", "body": b""})
    start = await app.receive_output(timeout=10)
    body = await app.receive_output(timeout=10)
    await app.wait(timeout=10)
    assert start["status"] == 200
    return json.loads(body["body"])


@pytest.fixture
def token(bob: Any) -> str:
    return ApiToken.issue(bob)


async def test_every_request_gives_its_connection_back(run, token):
    """Django's ASGI handler runs each request's database work on a thread of its own, and
    closes its connection when the request ends: with the pool, closing gives it back."""
    before = in_use()
    for _ in range(pool().max_size + 5):
        assert (await get(f"/api/runs/{run.pk}", token))["id"] == run.pk
    assert in_use() == before
