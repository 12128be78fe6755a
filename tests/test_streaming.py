"""The streaming providers (Dify, IntelligenceBox, xpander) end to end through the watcher,
against their simulators over real HTTP: live output, verified stops, lost streams."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from runs.models import Channel, ProviderAccount, Run, Status
from runs.watcher.watcher import LET_GO, Watcher
from tests.conftest import sim_account

pytestmark = pytest.mark.django_db(transaction=True)

PROVIDERS = ["dify", "intelligencebox", "xpander"]
STOP_PATH = {
    "dify": lambda ext: f"/chat-messages/{ext}/stop",
    "intelligencebox": lambda ext: f"/api/ai/chat/{ext}/stop",
    "xpander": lambda ext: f"/conversations/{ext}/stop",
}


@pytest.fixture
def account(acme, sim, request) -> Callable[[str], ProviderAccount]:
    def make(kind: str) -> ProviderAccount:
        return sim_account(acme, sim, kind)

    return make


async def launch_on(kind: str, account, bob, prompt: str, **options: Any) -> Run:
    acct = await sync_to_async(account)(kind)
    return await sync_to_async(Run.objects.launch)(
        account=acct,
        user=bob,
        prompt=f"{uuid.uuid4().hex[:6]} {prompt}",
        options=options,
        timeout_seconds=600,
    )


async def wait_for(run: Run, check: Callable[[Run], object], timeout: float = 15.0) -> Run:
    """Wait for a real condition on the stored run (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await run.arefresh_from_db()
        if check(run):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run.pk} never got there: {run.status} {run.output[:80]!r}")


def stop_calls(sim, kind: str, run: Run) -> list[dict[str, Any]]:
    suffix = STOP_PATH[kind](run.external_id)
    return [r for r in sim.requests(kind) if r["method"] == "POST" and r["path"].endswith(suffix)]


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_it_streams_a_run_to_completion_with_batched_output(kind, account, bob, sim):
    run = await launch_on(kind, account, bob, "quantum computing sim:duration=0.6 sim:chunks=12")
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.external_id
    assert len(run.output) > 40
    kinds = [k async for k in run.events.values_list("kind", flat=True)]
    # IntelligenceBox's chat id is Runbrake's own: sent, not yet accepted, when it is saved.
    named = "sent" if kind == "intelligencebox" else "accepted"
    assert kinds[:3] == ["created", named, "running"]
    assert kinds[-1] == "completed"
    # Output is saved in batches: far fewer writes than the 12 chunks streamed.
    assert run.version < 12


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_stop_mid_stream_is_confirmed_and_keeps_the_partial_output(kind, account, bob, sim):
    run = await launch_on(kind, account, bob, "long answer sim:duration=20")
    session = asyncio.create_task(Watcher().watch(run.pk))
    await wait_for(run, lambda r: r.status == Status.RUNNING and len(r.output) > 10)
    outcome = await run.astop(actor=bob, channel=Channel.BUTTON, reason="have what I need")
    assert outcome.requested
    await asyncio.wait_for(session, 10)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.output, "the partial output is kept"
    assert run.stop_confirmation
    assert "stop answer" not in run.stop_confirmation  # a stream or status confirmed it
    assert run.stop_latency_ms is not None
    assert len(stop_calls(sim, kind, run)) == 1


@pytest.mark.parametrize("kind", ["dify", "xpander"])
async def test_a_stop_before_the_id_is_known_is_sent_when_it_arrives(kind, account, bob, sim):
    run = await launch_on(kind, account, bob, "slow start sim:delay=1 sim:duration=20")
    session = asyncio.create_task(Watcher().watch(run.pk))
    await wait_for(run, lambda r: r.start_attempted_at is not None)
    await run.astop(actor=bob, channel=Channel.BUTTON)
    assert not run.external_id
    await asyncio.wait_for(session, 10)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert len(stop_calls(sim, kind, run)) == 1


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_stop_after_completion_is_refused_and_nothing_flips(kind, account, bob, sim):
    run = await launch_on(kind, account, bob, "short sim:duration=0.2")
    await Watcher().watch(run.pk)
    from runs.models import RunAlreadyFinished

    with pytest.raises(RunAlreadyFinished):
        await run.astop(actor=bob, channel=Channel.BUTTON)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert stop_calls(sim, kind, run) == []


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_provider_failure_mid_stream_fails_the_run_in_words(kind, account, bob):
    run = await launch_on(kind, account, bob, "doomed sim:duration=0.4 sim:fail=error")
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert run.error


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_bad_key_fails_the_run_with_what_to_do(kind, account, bob):
    run = await launch_on(kind, account, bob, "x")
    await ProviderAccount.objects.filter(pk=run.provider_account_id).aupdate(api_key="bad")
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert "key" in run.error


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_transient_rate_limits_are_waited_out(kind, account, bob):
    run = await launch_on(kind, account, bob, "busy sim:duration=0.2 sim:fail=rate_limit")
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    kinds = [k async for k in run.events.values_list("kind", flat=True)]
    assert kinds.count("backoff") == 1


def start_calls(sim, kind: str, run: Run) -> int:
    """How many start calls (the POST carrying the prompt) the provider received for `run`."""
    return sum(
        1
        for r in sim.requests(kind)
        if r["method"] == "POST" and "/stop" not in r["path"] and run.prompt in str(r["body"])
    )


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_stop_while_a_refused_start_call_waits_to_be_sent_again_sends_it_no_more(
    kind, account, bob, sim
):
    # Found by the chaos soak (run 76, xpander): the stop came while the start call waited
    # out a 429, the start was sent again anyway, and the run ended *Stop unconfirmed*.
    run = await launch_on(kind, account, bob, "busy sim:duration=30 sim:fail=rate_limit")
    session = asyncio.create_task(Watcher().watch(run.pk))
    try:
        await until_refused(run)
        refused = start_calls(sim, kind, run)
        await run.astop(actor=bob, channel=Channel.BUTTON, reason="wrong prompt")
        await asyncio.wait_for(session, 20)
    finally:
        session.cancel()
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.proof == "start_refused"
    assert "refusing the start call" in run.stop_confirmation
    # The refusals proved nothing started; nothing was sent after the stop.
    assert start_calls(sim, kind, run) == refused


async def until_refused(run: Run) -> None:
    """Until the provider refused the run's start call (its timeline says so)."""
    deadline = time.monotonic() + 15
    while not await run.events.filter(kind="backoff").aexists():
        assert time.monotonic() < deadline, "the start call was never refused"
        await asyncio.sleep(0.02)


async def test_a_stop_cuts_short_a_long_wait_to_resend_a_refused_start(account, bob, sim):
    """The provider asked for a minute before the start call goes out again; the stop does
    not wait for it (nothing is out at the provider meanwhile)."""
    run = await launch_on("xpander", account, bob, "busy sim:fail=rate_limit sim:retry_after=60")
    watcher = Watcher(tick=0.05)
    try:
        await watcher.tick()
        await until_refused(run)
        refused = start_calls(sim, "xpander", run)
        await run.astop(actor=bob, channel=Channel.BUTTON)
        deadline = time.monotonic() + 15  # a quarter of the wait the provider asked for
        while (await Run.objects.aget(pk=run.pk)).status != Status.STOPPED:
            assert time.monotonic() < deadline, "the stop waited for the provider's minute"
            await watcher.tick()
            await asyncio.sleep(0.05)
    finally:
        await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.proof == "start_refused"
    assert start_calls(sim, "xpander", run) == refused


async def test_a_watcher_shutting_down_hands_back_a_launch_waiting_to_resend_its_start(
    account, bob, sim, settings
):
    """A deploy's graceful shutdown waits for start calls that are out, so no provider id is
    lost; a launch waiting out the provider's refusal has none out. It is handed back at once,
    unsent, for the next watcher to start, instead of holding the shutdown for the provider's
    minute and then being cut off in the middle of its resend."""
    settings.RUNBRAKE_PROVIDER_TIMEOUT = 120.0  # what the shutdown would wait for a call out
    run = await launch_on("xpander", account, bob, "busy sim:fail=rate_limit sim:retry_after=60")
    watcher = Watcher(tick=60)
    await watcher.tick()
    await until_refused(run)
    refused = start_calls(sim, "xpander", run)

    await asyncio.wait_for(watcher.shutdown(), 20)  # not the provider's 60 s, nor 120 s

    await run.arefresh_from_db()
    assert run.status == Status.PENDING
    assert run.start_attempted_at is None  # no start call out: the next holder may send it
    assert not run.watched_by
    assert start_calls(sim, "xpander", run) == refused


async def refused_launch_under(watcher: Watcher, kind: str, account, bob, sim) -> tuple[Run, Any]:
    """A launch whose start call `kind` refused, waiting (a minute) to send it again under
    `watcher`, and that session; the resend is then driven by hand."""
    run = await launch_on(kind, account, bob, "busy sim:fail=rate_limit sim:retry_after=60")
    await watcher.tick()
    await until_refused(run)
    return run, watcher.live_sessions[run.pk]


async def test_a_refused_start_coming_due_during_a_shutdown_is_handed_back_unsent(
    account, bob, sim
):
    """The shutdown waits only for the start calls it saw out: one resent after it began
    would be cut off mid-flight (its provider id lost). The next watcher sends it instead."""
    watcher = Watcher(tick=60)
    run, session = await refused_launch_under(watcher, "xpander", account, bob, sim)
    refused = start_calls(sim, "xpander", run)
    watcher._stopping = True  # the shutdown's first step

    assert await session._start_again() == LET_GO
    await run.arefresh_from_db()
    assert run.status == Status.PENDING
    assert run.start_attempted_at is None
    assert run.pk not in watcher.starting  # nothing out for the shutdown to wait for
    await asyncio.wait_for(watcher.shutdown(), 20)
    assert start_calls(sim, "xpander", run) == refused

    heir = Watcher(tick=60)
    try:
        await heir.tick()
        deadline = time.monotonic() + 15
        while start_calls(sim, "xpander", run) == refused:
            assert time.monotonic() < deadline, "the next watcher never sent the start call"
            await asyncio.sleep(0.05)
    finally:
        await heir.shutdown()


async def test_a_refused_start_stopped_during_a_shutdown_is_stopped_there(account, bob, sim):
    watcher = Watcher(tick=60)
    run, session = await refused_launch_under(watcher, "xpander", account, bob, sim)
    refused = start_calls(sim, "xpander", run)
    await sync_to_async(run.request_stop)(actor=bob, channel=Channel.BUTTON)
    watcher._stopping = True

    assert await session._start_again() == LET_GO
    await asyncio.wait_for(watcher.shutdown(), 20)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.proof == "start_refused"
    assert start_calls(sim, "xpander", run) == refused


async def test_an_intelligencebox_start_is_resent_even_during_a_shutdown(account, bob, sim):
    """Its chat id is Runbrake's own, saved before the first call: handed back unsent, the
    next holder would find a chat the box never heard of and fail it. The resend goes out,
    and the shutdown lets the box's stream finish as for any of its runs."""
    watcher = Watcher(tick=60)
    run, session = await refused_launch_under(watcher, "intelligencebox", account, bob, sim)
    watcher._stopping = True
    try:
        assert await session._start_again() is None  # go on: send it
        assert run.pk not in watcher.starting  # no provider id to wait for: it has one
    finally:
        watcher._stopping = False
        await watcher.shutdown()


async def test_a_stopped_chat_the_box_never_heard_of_is_stopped_on_its_status(account, bob, sim):
    """IntelligenceBox's chat id is Runbrake's own, saved before the start call: a watcher
    that died while the box refused that call leaves an id the box never knew. Stopped, the
    run ends on the box's word that no such chat runs, not Stop unconfirmed for good."""
    run = await launch_on("intelligencebox", account, bob, "never started sim:duration=30")
    await sync_to_async(run.record_external_id)(f"run-{uuid.uuid4()}", acknowledged=False)
    await sync_to_async(run.request_stop)(actor=bob, channel=Channel.BUTTON)
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.proof == "status_read"
    assert "not knowing the run" in run.stop_confirmation


async def test_the_tick_that_cuts_a_refused_starts_wait_short_also_ends_the_run(account, bob, sim):
    """Not one tick later: the page that pressed Cancel waits for no second tick (the demo
    showed Stopped 1.6 s after Cancel, a tick and a half)."""
    run = await launch_on("xpander", account, bob, "busy sim:fail=rate_limit sim:retry_after=60")
    watcher = Watcher(tick=60)  # no tick but the ones this test runs
    try:
        await watcher.tick()
        await until_refused(run)
        await run.astop(actor=bob, channel=Channel.BUTTON)
        await watcher.tick()
        await asyncio.wait_for(watcher.drain(), 15)
        await run.arefresh_from_db()
        assert run.status == Status.STOPPED
        assert run.proof == "start_refused"
    finally:
        await watcher.shutdown()


async def test_a_stop_of_a_run_the_provider_has_not_named_wakes_the_watcher(account, bob, sim):
    """Only a watcher can end a run that has no provider id yet (nothing for the requester
    to call): the stop wakes it, as a launch does, instead of waiting for its next tick
    (the demo showed Stopped a second after Cancel)."""
    run = await launch_on("xpander", account, bob, "busy sim:fail=rate_limit sim:retry_after=60")
    watcher = Watcher(tick=60)  # its first tick now, the next a minute away
    looping = asyncio.create_task(watcher.run_forever())
    try:
        await until_refused(run)
        await sync_to_async(run.request_stop)(actor=bob, channel=Channel.BUTTON)
        deadline = time.monotonic() + 15
        while (await Run.objects.aget(pk=run.pk)).status != Status.STOPPED:
            assert time.monotonic() < deadline, "the stop waited for the watcher's next tick"
            await asyncio.sleep(0.05)
    finally:
        await watcher.shutdown()
        looping.cancel()
        await asyncio.gather(looping, return_exceptions=True)


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_dropped_stream_is_reconciled_and_the_run_completes(kind, account, bob, sim):
    run = await launch_on(kind, account, bob, "flaky sim:duration=1.5 sim:drop_stream")
    await asyncio.wait_for(Watcher().watch(run.pk), 20)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    kinds = [k async for k in run.events.values_list("kind", flat=True)]
    assert "stream_lost" in kinds


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_an_ignored_stop_ends_unconfirmed_never_stopped(kind, account, bob, sim, settings):
    settings.RUNBRAKE_STOP_GRACE_SECONDS = 1.0
    run = await launch_on(kind, account, bob, "stubborn sim:duration=4 sim:stop=ignore")
    watcher = Watcher()
    session = asyncio.create_task(watcher.watch(run.pk))
    await wait_for(run, lambda r: r.status == Status.RUNNING and r.output)
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await Run.objects.filter(pk=run.pk).aupdate(stop_deadline=timezone.now())
    # Past the deadline: unconfirmed, on the tick that holds the run. (A claim skips a row
    # another transaction has locked at that instant, e.g. the session saving output, and
    # takes it on a later tick.)
    async with asyncio.timeout(10):
        while run.status != Status.STOP_UNCONFIRMED:
            await watcher.tick()
            await run.arefresh_from_db()
    await asyncio.wait_for(session, 15)
    await watcher.shutdown()
    await run.arefresh_from_db()
    # The provider ran to its end despite the stop: never shown as stopped.
    assert run.status == Status.COMPLETED
    last = await run.events.alast()
    assert last is not None
    assert "despite the stop" in last.message
    kinds = [k async for k in run.events.values_list("kind", flat=True)]
    assert "output_after_stop" in kinds  # the stream kept going and we said so


async def test_fifty_streaming_runs_stopped_at_once_each_get_one_confirmed_stop(account, bob, sim):
    accounts = {kind: await sync_to_async(account)(kind) for kind in PROVIDERS}
    runs = []
    for i in range(50):
        kind = PROVIDERS[i % 3]
        runs.append(
            await sync_to_async(Run.objects.launch)(
                account=accounts[kind],
                user=bob,
                prompt=f"fleet {i} {uuid.uuid4().hex[:6]} sim:duration=300",
                options={},
                timeout_seconds=600,
            )
        )
    watcher = Watcher()
    sessions = [asyncio.create_task(watcher.watch(r.pk)) for r in runs]
    for run in runs:
        await wait_for(run, lambda r: r.status == Status.RUNNING and r.output, timeout=30)
    await asyncio.gather(*(r.astop(actor=bob, channel=Channel.BUTTON) for r in runs))
    _done, pending = await asyncio.wait(sessions, timeout=30)
    assert not pending, f"{len(pending)} sessions still following their runs after the stop"
    for run in runs:
        await run.arefresh_from_db()
        assert run.status == Status.STOPPED, (run.provider, run.status)
        assert len(stop_calls(sim, run.provider, run)) == 1
