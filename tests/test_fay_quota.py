"""Fay's quotas (fay-docs: each endpoint's "Rate Limits" and api-key's monthly requests): one
budget per account, shared through the database, paces status reads to fit the hourly quota,
keeps stops ahead of polls, and queues launches and stops it cannot send yet, in words, with
the time they go out. Fay answers 429 `RATE_LIMIT_EXCEEDED` with no Retry-After past a quota;
the budget keeps Runbrake from ever getting there."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import deque
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.utils import timezone

from runs.models import (
    Channel,
    ProviderAccount,
    QuotaSpend,
    QuotaTier,
    Run,
    RunEvent,
    Status,
    astop_runs,
)
from runs.providers.base import Started
from runs.providers.errors import QuotaExhausted
from runs.watcher.watcher import Watcher
from tests.wire import Answer, event_of, finished

pytestmark = pytest.mark.django_db(transaction=True)

HOUR = dt.timedelta(hours=1)


def fay_account(acme: Any, sim: Any, tier: str, key: str, **limits: int) -> ProviderAccount:
    return ProviderAccount.objects.create(
        team=acme,
        kind="fay",
        name=f"Fay {uuid.uuid4().hex[:6]}",
        base_url=f"{sim.url}/sim/fay/api/v1",
        api_key=key,
        quota_tier=tier,
        quota_limits=limits,
        options={"poll_interval": 0.1},
    )


def launch(account: ProviderAccount, user: Any, prompt: str) -> Run:
    return Run.objects.launch(
        account=account, user=user, prompt=prompt, options={}, timeout_seconds=600
    )


def creates_for(sim: Any, key_tail: str) -> list[dict[str, Any]]:
    return [
        r
        for r in sim.requests("fay")
        if r["path"].endswith("/conversations") and r["api_key"].endswith(key_tail)
    ]


# --- The budget itself, on a simulated clock ----------------------------------------------------


def poll_for_hours(account: ProviderAccount, user: Any, hours: int) -> list[dt.datetime]:
    """Twenty runs polled on a simulated clock, each at the pace the budget sets and waiting
    whenever it refuses; returns when each read went out."""
    for n in range(20):
        run = launch(account, user, f"run {n}")
        run.record_external_id(f"req-{n}")
    start = timezone.now()
    next_read = dict.fromkeys(range(20), start)
    reads: list[dt.datetime] = []
    clock = start
    while clock < start + hours * HOUR:
        for n, due in next_read.items():
            if due > clock:
                continue
            refusal = account.take_quota("status", now=clock)
            if refusal is None:
                reads.append(clock)
                next_read[n] = clock + dt.timedelta(seconds=account.poll_interval("status", 2.0))
            else:
                next_read[n] = clock + dt.timedelta(seconds=refusal.seconds)
        clock += dt.timedelta(seconds=5)
    return reads


def busiest_hour(reads: list[dt.datetime]) -> int:
    window: deque[dt.datetime] = deque()
    busiest = 0
    for at in reads:
        window.append(at)
        while window[0] <= at - HOUR:
            window.popleft()
        busiest = max(busiest, len(window))
    return busiest


def test_it_keeps_twenty_open_runs_within_100_status_reads_in_any_hour(acme, sim, bob):
    account = fay_account(acme, sim, QuotaTier.CUSTOM, "sim-x", status=100)
    reads = poll_for_hours(account, bob, 3)
    assert busiest_hour(reads) <= 100
    assert len(reads) >= 250  # and the quota is used, not starved


def test_it_keeps_a_free_key_within_its_hour_and_its_month_with_room_to_stop(acme, sim, bob):
    """Fay's free tier: 100 status reads an hour, and 100 requests a month in all. Twenty runs
    may read until 80 are spent; the last 20 are kept so each run can still be stopped."""
    account = fay_account(acme, sim, QuotaTier.FREE, "sim-free-x")
    reads = poll_for_hours(account, bob, 2)
    assert busiest_hour(reads) <= 100
    # The month's 100 calls, less the 20 kept so that each run can still be stopped.
    assert len(reads) == 80
    for _ in range(20):
        assert account.take_quota("stop") is None


def test_it_refuses_the_101st_status_read_of_the_hour_with_the_time_the_next_can_go(acme, sim):
    account = fay_account(acme, sim, QuotaTier.CUSTOM, "sim-x", status=100)
    now = timezone.now()
    for second in range(100):
        at = now - HOUR + dt.timedelta(seconds=60 + second)
        assert account.take_quota("status", now=at) is None
    refusal = account.take_quota("status", now=now)
    assert refusal is not None
    # The oldest read (59 minutes ago) ages out in about a minute.
    assert 55 <= refusal.seconds <= 65
    assert "100 status reads an hour" in refusal.reason


def test_it_keeps_monthly_calls_in_reserve_for_stops(acme, sim, bob):
    account = fay_account(acme, sim, QuotaTier.CUSTOM, "sim-x", month=5)
    run = launch(account, bob, "one")
    run.record_external_id("req-1")  # a running run that may need one stop
    for _ in range(4):
        assert account.take_quota("status") is None
    refused = account.take_quota("status")
    assert refused is not None
    assert "keeping 1 for stops" in refused.reason
    assert account.take_quota("stop") is None


def test_a_429_from_fay_blocks_every_process_and_doubles_while_it_repeats(acme, sim):
    account = fay_account(acme, sim, QuotaTier.UNLIMITED, "sim-x")
    now = timezone.now()
    first = account.quota_refused("status", None, now=now)
    assert first.seconds == pytest.approx(60)
    assert account.take_quota("status", now=now + dt.timedelta(seconds=30)) is not None
    second = account.quota_refused("status", None, now=now + dt.timedelta(seconds=61))
    assert second.seconds == pytest.approx(120)
    assert account.take_quota("status", now=now + dt.timedelta(seconds=200)) is None


def test_an_account_without_a_quota_only_reads_its_blocks_and_locks_nothing(acme, sim):
    """Nothing to count: no transaction and no row lock (on SQLite that is the database's
    write lock, which a stop call would wait for behind the watcher's writes)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    account = fay_account(acme, sim, QuotaTier.UNLIMITED, "sim-x")
    with CaptureQueriesContext(connection) as queries:
        assert account.take_quota("stop") is None
    assert [q["sql"].split()[0] for q in queries] == ["SELECT"]
    assert "runs_quotablock" in queries[0]["sql"]
    assert "FOR UPDATE" not in queries[0]["sql"]
    assert QuotaSpend.objects.count() == 0


# --- Against the simulator ----------------------------------------------------------------------


async def test_it_queues_the_eleventh_launch_of_the_hour_and_never_provokes_a_429(acme, sim, bob):
    key = f"sim-free-{uuid.uuid4().hex[:8]}"
    account = await sync_to_async(fay_account)(acme, sim, QuotaTier.FREE, key)
    runs = [
        await sync_to_async(launch)(account, bob, f"{uuid.uuid4()} sim:pending=0 sim:duration=60")
        for _ in range(11)
    ]
    watcher = Watcher(tick=0.05)
    for run in runs:
        watcher._start_session(run.pk)
    # The eleventh to reach the quota: on PostgreSQL the sessions' database calls run side by
    # side (runs/dbthreads.py), so that need not be the last one launched.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [run async for run in Run.objects.filter(pk__in=[r.pk for r in runs])]
        waiting = [run for run in found if run.is_queued]
        if waiting:
            break
        await watcher.drain(sessions=False)
        await _yield()
    assert len(waiting) == 1, [run.status for run in found]
    queued = waiting[0]
    assert "10 launches an hour (Fay free tier)" in queued.quota_note
    assert "The launch is queued until" in queued.quota_note
    # Cancelled at no cost: never sent.
    outcome = await queued.astop(actor=bob, channel=Channel.BUTTON)
    assert outcome.requested
    await _until(queued, lambda r: r.status == Status.STOPPED)
    assert queued.proof == "never_sent"
    # Ten creates, Fay's free hourly quota: the eleventh never went out to be refused.
    assert len(creates_for(sim, key[-4:])) == 10
    for task in list(watcher.sessions.values()):
        task.cancel()
    await watcher.drain()


async def test_a_bulk_stop_over_the_stop_quota_is_queued_with_a_time_and_sent_when_allowed(
    acme, sim, bob
):
    key = f"sim-{uuid.uuid4().hex[:8]}"
    account = await sync_to_async(fay_account)(acme, sim, QuotaTier.CUSTOM, key, stop=2)
    runs = []
    for _ in range(3):
        run = await sync_to_async(launch)(
            account, bob, f"{uuid.uuid4()} sim:pending=0 sim:duration=60"
        )
        provider = account.provider()
        events = provider.run(run.prompt, {})
        started = event_of(Started, await anext(events))
        await events.aclose()
        await sync_to_async(run.record_external_id)(started.external_id)
        await sync_to_async(run.mark_running)("PROCESSING")
        runs.append(run)
    # Two stop calls made 59 min 57 s ago: the window frees in about three seconds.
    long_ago = timezone.now() - HOUR + dt.timedelta(seconds=3)
    await QuotaSpend.objects.acreate(account=account, endpoint="stop", at=long_ago)
    await QuotaSpend.objects.acreate(account=account, endpoint="stop", at=long_ago)

    results = await astop_runs(runs, actor=bob, channel=Channel.BUTTON, reason="bulk")

    assert {r.outcome for r in results} == {"queued"}
    assert all("The stop is queued until" in r.message for r in results)
    assert all("2 stop calls an hour" in r.message for r in results)
    for run in runs:
        await run.arefresh_from_db()
        assert run.status == Status.STOPPING  # queued, not failed, not unconfirmed
        assert not run.stop_error
        kinds = [k async for k in run.events.values_list("kind", flat=True)]
        assert RunEvent.Kind.STOP_QUEUED in kinds
        assert RunEvent.Kind.STOP_FAILED not in kinds
    assert not [
        r for r in sim.requests("fay") if r["path"].endswith("/stop") and key[-4:] in r["api_key"]
    ]

    # The watcher sends each stop the moment the budget allows (two now, one an hour on).
    watcher = Watcher(tick=0.1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await watcher.tick()
        await watcher.drain(sessions=False)
        stopped = [
            r async for r in Run.objects.filter(pk__in=[r.pk for r in runs], status=Status.STOPPED)
        ]
        if len(stopped) >= 2:
            break
        await _yield(0.1)
    assert len(stopped) == 2
    for task in list(watcher.sessions.values()):
        task.cancel()
    await watcher.drain()


async def test_fay_refusing_a_status_read_as_over_quota_is_a_wait_in_words_not_a_failure(
    acme, sim, bob
):
    """A key also used elsewhere: Runbrake's own count says there is room, Fay says 429."""
    key = f"sim-free-{uuid.uuid4().hex[:8]}"
    account = await sync_to_async(fay_account)(acme, sim, QuotaTier.UNLIMITED, key)
    provider = account.provider()
    run = await sync_to_async(launch)(account, bob, f"{uuid.uuid4()} sim:pending=0 sim:duration=60")
    events = provider.run(run.prompt, {})
    started = event_of(Started, await anext(events))
    await events.aclose()
    # Someone else spends the rest of the key's month (one create and 99 reads: 100).
    for _ in range(99):
        await provider.status(started.external_id)
    with pytest.raises(QuotaExhausted) as refused:
        await provider.status(started.external_id)
    assert refused.value.retry_after == pytest.approx(60)  # no Retry-After: a minute, then more
    assert "Fay refused this account's status reads as over its quota" in refused.value.message


async def _yield(seconds: float = 0.05) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _until(run: Run, check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await run.arefresh_from_db()
        if check(run):
            return
        await _yield()
    raise AssertionError(f"run {run.pk} is {run.status}")


# --- Found in review ---------------------------------------------------------------------------


def test_a_429_with_retry_after_zero_still_waits_a_second(acme, sim):
    account = fay_account(acme, sim, QuotaTier.UNLIMITED, "sim-x")
    now = timezone.now()
    refusal = account.quota_refused("status", 0.0, now=now)
    assert refusal.seconds == 1.0
    assert account.take_quota("status", now=now) is not None
    assert account.take_quota("status", now=now + dt.timedelta(seconds=2)) is None


def test_polls_slow_down_with_a_runs_age_and_keep_the_hourly_pace(acme, sim):
    from runs.providers.fay import FayProvider

    account = fay_account(acme, sim, QuotaTier.CUSTOM, "sim-x", status=1000)
    provider = account.provider()
    assert isinstance(provider, FayProvider)
    # 2 s at first (the docs' pace), a quarter of the run's age later, five minutes at most.
    assert async_to_sync(provider._poll_delay)(0) == pytest.approx(4.0)  # 1,000 an hour, 90 %
    assert async_to_sync(provider._poll_delay)(120) == pytest.approx(30)
    assert async_to_sync(provider._poll_delay)(7200) == pytest.approx(300)


def test_a_launch_keeps_the_monthly_call_its_own_stop_will_need(acme, sim, bob):
    account = fay_account(acme, sim, QuotaTier.CUSTOM, "sim-x", month=3)
    run = launch(account, bob, "one")
    run.record_external_id("req-1")  # running: one call kept for its stop
    assert account.take_quota("status") is None  # 1 used, 1 kept: room for 1 more
    refused = account.take_quota("create")  # and a new run would need a stop of its own
    assert refused is not None
    assert account.take_quota("stop") is None


def test_a_queued_launch_is_not_stopped_by_its_own_timeout_which_starts_when_it_is_sent(
    acme, sim, bob
):
    account = fay_account(acme, sim, QuotaTier.FREE, "sim-free-x")
    run = Run.objects.launch(account=account, user=bob, prompt="q", options={}, timeout_seconds=60)
    run.queue_for_quota(QuotaExhausted("create", 3000.0, "Over the launch quota."))
    later = timezone.now() + dt.timedelta(minutes=5)
    assert not Run.objects.past_timeout(later).filter(pk=run.pk).exists()
    run.record_external_id("req-1")
    run.refresh_from_db()
    assert run.deadline > timezone.now() + dt.timedelta(seconds=55)


async def test_a_stop_fay_answers_already_completed_is_not_queued_when_status_must_wait(
    replay, acme, bob
):
    """The stop was answered (400 CONVERSATION_ALREADY_COMPLETED); the status read that would
    confirm it is over its quota. The stop must not be taken as unsent and sent again."""
    replay.on(
        "POST",
        "/conversation/req-1/stop",
        Answer(
            status=400,
            headers={"content-type": "application/json"},
            chunks=[
                b'{"status":false,"version":"1.0.24","error":{"message":"Cannot stop '
                b'completed conversation","code":"CONVERSATION_ALREADY_COMPLETED"}}'
            ],
        ),
    )
    account = await ProviderAccount.objects.acreate(
        team=acme,
        kind="fay",
        name="Fay",
        base_url=replay.url,
        api_key="k",
        quota_tier=QuotaTier.CUSTOM,
        quota_limits={"status": 1},
    )
    await QuotaSpend.objects.acreate(account=account, endpoint="status")
    run = await sync_to_async(launch)(account, bob, "q")
    await sync_to_async(run.record_external_id)("req-1")
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await run.arefresh_from_db()
    assert run.stop_answer is not None
    assert run.quota_endpoint != "stop"
    # Its recheck (the status still over its quota) reads, and sends no second stop call.
    await Run.objects.filter(pk=run.pk).aupdate(stop_next_attempt_at=timezone.now())
    await run.arefresh_from_db()
    await run.asend_stop(account=account)
    await run.arefresh_from_db()
    assert len(replay.requests_to("POST", "/conversation/req-1/stop")) == 1
    assert run.status == Status.STOPPING
    assert run.stop_attempts == 1
    assert run.stop_next_attempt_at is not None
    assert run.stop_next_attempt_at > timezone.now()


async def test_a_status_read_after_a_quota_wait_clears_the_note_and_the_report_waits_its_turn(
    replay, acme, bob
):
    def status(value: str) -> Answer:
        return Answer.json(
            {"status": True, "version": "1.0.24", "data": {"request_id": "r", "status": value}}
        )

    replay.on(
        "GET",
        "/conversation/req-1/status",
        status("PROCESSING"),
        status("PROCESSING"),
        status("COMPLETED"),
    )
    replay.on(
        "GET",
        "/conversation/req-1/output",
        Answer.json({"status": True, "version": "1.0.24", "data": {"output": "## Report"}}),
    )
    account = await ProviderAccount.objects.acreate(
        team=acme,
        kind="fay",
        name="Fay",
        base_url=replay.url,
        api_key="k",
        options={"poll_interval": 0.05},
    )
    provider = account.provider()
    # The budget refuses the first status read and the first two output reads.
    refusals = {"status": [True], "output": [True, True]}

    async def take(endpoint: str) -> Any:
        from runs.providers.base import Refusal

        refused = refusals[endpoint].pop(0) if refusals[endpoint] else False
        return Refusal(0.05, f"{endpoint} waits") if refused else None

    provider.budget.take = take  # type: ignore[method-assign]
    events = [e async for e in provider.follow("req-1", {})]
    kinds = [type(e).__name__ for e in events]
    # The first read waited; the read after it says so (Running), the run completes, and the
    # report waited twice for the output quota without being lost.
    assert kinds == ["QuotaWait", "Running", "QuotaWait", "QuotaWait", "Finished"]
    assert finished(events).output == "## Report"
    assert finished(events).via == "status"


async def test_a_stop_that_finds_the_research_completed_ends_it_completed_with_its_report(
    acme, bob, sim
):
    """Found by an independent stand-in: Fay answered the stop 'already completed' and its
    status said COMPLETED, yet the run went on to 'Stop unconfirmed' with no output."""
    account = await sync_to_async(fay_account)(acme, sim, QuotaTier.UNLIMITED, "sim-x")
    run = await sync_to_async(launch)(
        account, bob, f"{uuid.uuid4()} sim:pending=0 sim:duration=0.2"
    )
    provider = account.provider()
    events = provider.run(run.prompt, {})
    started = event_of(Started, await anext(events))
    await events.aclose()
    await sync_to_async(run.record_external_id)(started.external_id)
    await sync_to_async(run.mark_running)("PROCESSING")
    await _until_at_fay(sim, started.external_id)
    await run.astop(actor=bob, channel=Channel.TIMEOUT, reason="Timed out")
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output.startswith("### Research:")
    assert run.proof == "status_read"
    assert run.finished_before_stop


async def _until_at_fay(sim: Any, request_id: str) -> None:
    """Wait (with a deadline) until the simulator says the research completed."""
    import json
    import urllib.request

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            f"{sim.url}/sim/fay/api/v1/conversation/{request_id}/status",
            headers={"Authorization": "Bearer sim-x"},
        )
        status = await sync_to_async(lambda r=req: json.load(urllib.request.urlopen(r)))()
        if status["data"]["status"] == "COMPLETED":
            return
        await _yield(0.1)
    raise AssertionError("the research never completed at the simulator")


async def test_a_launch_fay_refused_as_over_quota_then_stopped_says_fay_refused_it(acme, sim, bob):
    """Runbrake's count said there was room (the key is used elsewhere too); Fay answered the
    create 429. The run is Stopped on Fay's refusal, not as "never sent": a call went out."""
    key = f"sim-free-{uuid.uuid4().hex[:8]}"
    account = await sync_to_async(fay_account)(acme, sim, QuotaTier.UNLIMITED, key)
    provider = account.provider()
    for _ in range(10):  # someone else spends the key's hourly creates
        events = provider.run(f"{uuid.uuid4()} sim:pending=0 sim:duration=1", {})
        event_of(Started, await anext(events))
        await events.aclose()
    run = await sync_to_async(launch)(account, bob, f"{uuid.uuid4()} sim:pending=0 sim:duration=60")
    watcher = Watcher(tick=0.05)
    watcher._start_session(run.pk)
    await _until(run, lambda r: r.is_queued)
    creates = creates_for(sim, key[-4:])
    assert len(creates) == 11
    assert creates[-1]["body"]["prompt"] == run.prompt  # Fay answered it 429

    outcome = await run.astop(actor=bob, channel=Channel.BUTTON)
    assert outcome.requested
    await _until(run, lambda r: r.status == Status.STOPPED)
    assert run.proof == "start_refused"
    assert "refusing the start call" in run.stop_confirmation
    assert len(creates_for(sim, key[-4:])) == 11  # nothing sent after the stop
    for task in list(watcher.sessions.values()):
        task.cancel()
    await watcher.drain()


def test_a_queued_launch_releases_its_start_claim_in_the_same_update_as_the_wait(acme, sim, bob):
    """Two updates left a window: a watcher dying between them kept a claim on a start call
    that was never out, which the next holder takes for one lost in a restart (and fails)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    account = fay_account(acme, sim, QuotaTier.UNLIMITED, "sim-x")
    run = launch(account, bob, "queued")
    assert run.claim_start()
    with CaptureQueriesContext(connection) as queries:
        run.queue_for_quota(QuotaExhausted("create", 60.0, "Over the hourly launches."))
    updates = [q["sql"] for q in queries if q["sql"].startswith('UPDATE "runs_run"')]
    assert len(updates) == 1
    assert "start_attempted_at" in updates[0]
    run.refresh_from_db()
    assert run.start_attempted_at is None
    assert run.is_queued


async def test_a_queued_launch_whose_turn_comes_as_a_shutdown_begins_is_not_sent(
    acme, sim, bob, monkeypatch
):
    """The shutdown waits only for the start calls it saw out; a queued launch sent after it
    began would be cut off mid-flight. Here the shutdown begins while the queue's wait reads
    the run (a database call: the event loop runs on)."""
    account = await sync_to_async(fay_account)(acme, sim, QuotaTier.UNLIMITED, "sim-x")
    run = await sync_to_async(launch)(account, bob, "queued")
    watcher = Watcher(tick=0.05)
    read = Run.refresh_from_db

    def read_as_the_shutdown_begins(self: Run, *args: Any, **kwargs: Any) -> None:
        watcher._stopping = True
        read(self, *args, **kwargs)

    monkeypatch.setattr(Run, "refresh_from_db", read_as_the_shutdown_begins)
    assert await watcher._wait_queued(run, 0.0) is False
