"""The watcher's database threads (runs/dbthreads.py): different runs' calls run side by side,
one run's calls one at a time and in order (also when a caller is cancelled), and on
PostgreSQL the threads hold pool connections only while they work, so requests in the same
process always find one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction

from runs import dbthreads
from runs.models import ApiToken, Run, RunEvent, Status
from tests.test_db_pool import get, in_use

pytestmark = pytest.mark.django_db(transaction=True)

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite keeps one writer on the shared thread"
)
# Long enough never to fire on a slow machine; it only turns a hang (the bug) into a failure.
HANG = 30


@pytest.fixture
def threads(settings: Any) -> int:
    """Four threads on either backend for the tests that touch no database."""
    settings.RUNBRAKE_DB_THREADS = 4
    return 4


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, HANG), "never happened"


async def test_one_runs_calls_run_one_at_a_time_in_the_order_they_were_made(threads):
    running = 0
    most = 0
    order: list[int] = []
    guard = threading.Lock()

    def work(i: int) -> None:
        nonlocal running, most
        with guard:
            running += 1
            most = max(most, running)
        order.append(i)
        with guard:
            running -= 1

    await asyncio.gather(*(dbthreads.call(7, work, i) for i in range(40)))
    assert order == list(range(40))
    assert most == 1


class TwoCalls:
    """Two calls for run 1: the first blocks on its thread until released; the second notes
    whether the first had returned when it started."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.first_done = threading.Event()
        self.seen: dict[str, bool] = {}

    def first(self) -> None:
        self.entered.set()
        assert self.release.wait(HANG)
        self.first_done.set()

    def second(self) -> None:
        self.seen["first done when the second started"] = self.first_done.is_set()

    async def second_held_back(self, second: asyncio.Task[None]) -> None:
        # Another run is not held back (and, with free threads, run 1's second call would
        # have run by now if nothing kept it back).
        assert await dbthreads.call(2, lambda: "other run") == "other run"
        assert not second.done()
        self.release.set()
        await second
        assert self.seen == {"first done when the second started": True}


async def test_a_run_waiting_on_its_thread_holds_back_only_its_own_next_call(threads):
    calls = TwoCalls()
    one = asyncio.create_task(dbthreads.call(1, calls.first))
    await wait_for(calls.entered)
    await calls.second_held_back(asyncio.create_task(dbthreads.call(1, calls.second)))
    await one


async def test_a_cancelled_caller_keeps_its_runs_lane_until_its_call_returned(threads):
    calls = TwoCalls()
    one = asyncio.create_task(dbthreads.call(1, calls.first))
    await wait_for(calls.entered)
    one.cancel()
    await calls.second_held_back(asyncio.create_task(dbthreads.call(1, calls.second)))
    with pytest.raises(asyncio.CancelledError):
        await one


async def test_without_threads_calls_stay_on_asgirefs_shared_thread(settings):
    settings.RUNBRAKE_DB_THREADS = 0
    shared = await sync_to_async(threading.get_ident)()
    assert await dbthreads.call(1, threading.get_ident) == shared
    assert await dbthreads.call(None, threading.get_ident) == shared


# --- PostgreSQL: real transitions and the pool ------------------------------------------------


@pytest.fixture
def two_runs(launch: Any) -> list[Run]:
    return [launch(), launch()]


@postgres_only
async def test_two_runs_transitions_are_open_at_the_same_time_on_their_own_connections(two_runs):
    assert dbthreads.threads() >= 2
    both_inside = threading.Barrier(2, timeout=HANG)

    def start(run: Run) -> int:
        with transaction.atomic():
            assert run.mark_running("working")
            # Both transactions hold their run's row lock here, at once: on one thread the
            # first would wait for the second forever (the barrier breaks instead).
            both_inside.wait()
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                return int(cursor.fetchone()[0])

    pids = await asyncio.gather(*(dbthreads.call(run.pk, start, run) for run in two_runs))
    assert len(set(pids)) == 2
    for run in two_runs:
        await run.arefresh_from_db()
        assert run.status == Status.RUNNING
        assert await RunEvent.objects.filter(run=run, kind=RunEvent.Kind.RUNNING).acount() == 1


@postgres_only
async def test_one_runs_transitions_are_stored_in_the_order_they_were_made(two_runs):
    run = two_runs[0]
    messages = [f"backoff {i}" for i in range(30)]
    await asyncio.gather(
        *(dbthreads.call(run.pk, run.record_event, RunEvent.Kind.BACKOFF, m) for m in messages)
    )
    stored = RunEvent.objects.filter(run=run, kind=RunEvent.Kind.BACKOFF).order_by("id")
    assert [e.message async for e in stored] == messages


@postgres_only
async def test_busy_database_threads_leave_the_pool_to_requests_and_give_every_connection_back(
    two_runs, bob
):
    token = await sync_to_async(ApiToken.issue)(bob)
    before = in_use()
    size = dbthreads.threads()
    pool_max = connection.pool.max_size  # type: ignore[attr-defined]  # PostgreSQL only
    assert 0 < size <= pool_max // 2
    busy = threading.Barrier(size + 1, timeout=HANG)
    release = threading.Event()
    held: list[int] = []

    def hold(pk: int) -> None:
        with transaction.atomic():
            assert Run.objects.filter(pk=pk).exists()
            held.append(in_use())
            if not release.is_set():
                busy.wait()  # the first calls, one a thread: every thread holds a connection
            assert release.wait(HANG)

    # More runs' calls than the pool has connections, all at once.
    calls = [
        asyncio.create_task(dbthreads.call(10_000 + i, hold, two_runs[0].pk))
        for i in range(pool_max + 5)
    ]
    await asyncio.to_thread(busy.wait)
    assert in_use() <= before + size
    # A request in the same process still finds a connection.
    assert (await get(f"/api/runs/{two_runs[0].pk}", token))["id"] == two_runs[0].pk
    release.set()
    await asyncio.gather(*calls)
    assert max(held) <= before + size
    assert in_use() == before


@postgres_only
async def test_each_call_gives_its_connection_back_before_the_thread_takes_the_next(two_runs):
    def found_one_open() -> bool:
        was_open = connection.connection is not None
        assert Run.objects.filter(pk=two_runs[0].pk).exists()  # takes one from the pool
        return was_open

    # One after another: the executor reuses its idle threads, each several times.
    found = [await dbthreads.call(None, found_one_open) for _ in range(dbthreads.threads() * 3)]
    assert not any(found)
