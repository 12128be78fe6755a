"""Run-scoped database work on a few threads of its own, one run at a time.

`call(run_id, func, *args)` runs the sync `func` and returns its result, like
`sync_to_async(func)(*args)`, with this contract:

- Each run has a lane: calls for one run run one at a time, in the order they were made
  (asyncio's locks are fair), so a run's transitions never overtake each other. Calls for
  different runs run side by side. `run_id=None` is work that belongs to no single run.
- With `RUNBRAKE_DB_THREADS` = 0 (the SQLite default) every call goes to asgiref's one
  shared thread, as before: SQLite has one writer, and the embedded process keeps its
  behaviour. With N > 0 (the PostgreSQL default), calls run on N threads that serve
  nothing else; each gives its connection back (to Django's pool) when a call ends, so the
  pool lends at most N connections to this work at any moment and a request or a socket's
  handshake in the same process always finds one (settings.py keeps N at most half the
  pool). A thread that kept its connection between calls would make that N for good, and
  threads that took one each without bound starved the pool once (a handshake timed out).
- Async code that a sync thread waits for (inside async_to_sync: a sync middleware, Django's
  test client) keeps asgiref's behaviour too: its calls run on that thread, whose connection
  may hold the caller's open transaction.
- `transaction.on_commit` callbacks run on the calling thread after its commit, as on the
  shared thread: asgiref records the owning event loop for the thread, so `live.push_run`
  hands the push to the loop (push after commit).
- A cancelled caller gets its CancelledError once `func` has returned on its thread: the
  lane stays taken until then, so the run's next call cannot overlap it.

Why: the watcher made every run's transitions on asgiref's single shared thread. On
PostgreSQL each is a few round trips, so a thousand runs finishing in the same second queued
for ten seconds behind each other (docs/PERFORMANCE.md, P4).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from runs.realtime import layers

_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


class _Lane:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


# Per event loop (an asyncio lock belongs to one), per run: the lanes in use. A lane is
# dropped when its last caller leaves, so this holds only runs with a call in flight.
_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _Lane]] = (
    weakref.WeakKeyDictionary()
)


def threads() -> int:
    return int(settings.RUNBRAKE_DB_THREADS)


def _executor(size: int) -> ThreadPoolExecutor:
    with _executors_lock:
        executor = _executors.get(size)
        if executor is None:
            executor = _executors[size] = ThreadPoolExecutor(
                max_workers=size, thread_name_prefix="runbrake-db"
            )
        return executor


async def call[**P, R](
    run_id: int | None, func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
) -> R:
    size = threads()
    if size <= 0 or layers.sync_caller_waits():
        return await sync_to_async(func)(*args, **kwargs)

    def unit() -> R:
        try:
            return func(*args, **kwargs)
        finally:
            # With the pool (CONN_MAX_AGE=0) this gives the connection back; a broken one
            # is dropped either way, so the next call on this thread starts clean.
            close_old_connections()

    run_on_thread = sync_to_async(unit, thread_sensitive=False, executor=_executor(size))
    if run_id is None:
        return await _finish_even_if_cancelled(run_on_thread())
    lanes = _lanes.setdefault(asyncio.get_running_loop(), {})
    lane = lanes.get(run_id)
    if lane is None:
        lane = lanes[run_id] = _Lane()
    lane.users += 1
    try:
        async with lane.lock:
            return await _finish_even_if_cancelled(run_on_thread())
    finally:
        lane.users -= 1
        if not lane.users:
            del lanes[run_id]


async def _finish_even_if_cancelled[R](work: Coroutine[Any, Any, R]) -> R:
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # The thread cannot be interrupted: hold the lane until it is done, then give up.
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
        if not task.cancelled():
            task.exception()  # retrieved: the caller was cancelled, nobody else will read it
        raise
