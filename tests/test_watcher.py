"""The watcher against the Fay simulator over real HTTP: start, follow, complete, fail, stop
before the id is known, retried stops, the stop deadline, timeouts and restart recovery."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from runs.models import Channel, ProviderAccount, Run, RunEvent, Status
from runs.providers import ProviderError
from runs.providers.base import Finished, OutputDelta, Running, Started, StopResult
from runs.watcher.watcher import OutputWriter, Session, Watcher
from tests.conftest import sim_account, start_at_provider

pytestmark = pytest.mark.django_db(transaction=True)


def kinds(run: Run) -> list[str]:
    return list(run.events.order_by("at", "id").values_list("kind", flat=True))


async def test_it_starts_follows_and_completes_a_run_with_its_output(launch, sim):
    run = await sync_to_async(launch)("AI editors sim:pending=0.1 sim:duration=0.3")
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert "### Research: AI editors" in run.output
    assert run.external_id
    assert run.started_at
    assert run.finished_at
    assert await sync_to_async(kinds)(run) == ["created", "accepted", "running", "completed"]
    creates = [
        r
        for r in sim.requests()
        if r["path"].endswith("/conversations") and r["body"]["prompt"] == run.prompt
    ]
    assert len(creates) == 1


async def test_it_keeps_structured_output(launch):
    schema = {
        "type": "object",
        "properties": {"names": {"type": "array", "items": {"type": "string"}}},
    }
    run = await sync_to_async(launch)(
        "x sim:pending=0 sim:duration=0.1", structured_output=True, output_schema=schema
    )
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.structured_output == {"names": ["Sample names"]}


async def test_a_failed_run_is_failed_with_the_providers_words(launch):
    run = await sync_to_async(launch)("x sim:pending=0 sim:duration=0.1 sim:fail=failed")
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert "Simulated research failure" in run.error


async def test_a_rejected_key_fails_the_run_with_what_to_do(launch, fay_account):
    fay_account.api_key = "expired-key"
    await fay_account.asave()
    run = await sync_to_async(launch)("x")
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert "The key is set on the Fay provider account by a team admin" in run.error


async def test_it_queues_a_launch_fay_refuses_as_over_quota_and_sends_it_once_allowed(launch, sim):
    prompt = f"{uuid.uuid4()} sim:pending=0 sim:duration=0.1 sim:fail=rate_limit"
    run = await sync_to_async(launch)(prompt)
    await Watcher(tick=0.05).watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    # One queued episode for the three 429s, not a failure and not one event per refusal.
    assert (await sync_to_async(kinds)(run)).count("quota_wait") == 1
    assert not run.quota_endpoint  # nothing waits any more
    creates = [r for r in sim.requests() if r["path"].endswith("/conversations")]
    assert sum(1 for r in creates if r["body"] and r["body"].get("prompt") == prompt) == 4


async def test_a_stop_before_the_run_was_sent_never_reaches_the_provider(launch, bob, sim):
    prompt = f"{uuid.uuid4()} sim:pending=0 sim:duration=60"
    run = await sync_to_async(launch)(prompt)
    outcome = await run.astop(actor=bob, channel=Channel.BUTTON, reason="wrong prompt")
    assert outcome.requested
    assert run.status == Status.STOPPING
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert "never having been sent" in run.stop_confirmation
    assert not [r for r in sim.requests() if r["body"] and prompt in str(r["body"])]


async def test_a_run_whose_watcher_died_waiting_to_resend_a_refused_start_is_settled_once_stopped(
    launch, bob, sim
):
    """Found by the chaos soak (run 76): a watcher was killed while its session waited to send
    a refused start call again, and the next holder waited out a start call that was not out
    (the claim was never released) while the stop went unconfirmed."""
    prompt = f"{uuid.uuid4()} sim:pending=0 sim:duration=60 sim:fail=server_error"
    run = await sync_to_async(launch)(prompt)
    dying = asyncio.create_task(Watcher().watch(run.pk))
    for _ in range(400):
        if await run.events.filter(kind=RunEvent.Kind.BACKOFF).aexists():
            break
        await asyncio.sleep(0.025)
    dying.cancel()  # the watcher is gone: its session sends nothing more
    await asyncio.gather(dying, return_exceptions=True)

    def creates() -> int:
        return sum(1 for r in sim.requests() if r["body"] and prompt in str(r["body"]))

    sent = await sync_to_async(creates)()
    assert sent >= 1
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await Watcher().watch(run.pk)  # whoever holds the run next
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.proof == "start_refused"
    assert await sync_to_async(creates)() == sent


async def test_a_run_whose_stop_went_unconfirmed_before_it_was_ever_sent_is_never_sent(
    launch, bob, sim
):
    prompt = f"{uuid.uuid4()} sim:pending=0 sim:duration=60"
    run = await sync_to_async(launch)(prompt)
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await Run.objects.filter(pk=run.pk).aupdate(stop_deadline=timezone.now())
    await sync_to_async(run.mark_stop_unconfirmed)()
    assert run.status == Status.STOP_UNCONFIRMED
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.proof == "never_sent"
    assert not [r for r in sim.requests() if r["body"] and prompt in str(r["body"])]


async def test_a_start_the_provider_refuses_for_good_while_the_run_is_stopping_is_stopped(
    launch, bob
):
    # The session gives up on the start call (a refusal not worth retrying, or the last
    # try) just as a stop is under way: nothing started, so the run is stopped, not left
    # for "Runbrake restarted while this run was being started".
    run = await sync_to_async(launch)("refused sim:duration=60")
    assert await sync_to_async(run.claim_start)()
    await run.astop(actor=bob, channel=Channel.BUTTON)
    refusal = ProviderError("UNAUTHORIZED", "Fay refused the API key.", http_status=401)
    await Watcher()._provider_failed(run, refusal)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.proof == "start_refused"


FAY_STOPPED = StopResult("stopped", "STOPPED", "Fay stopped the research.", {"status": "STOPPED"})


async def _session_with_unsaved_text(run: Run) -> tuple[Session, asyncio.Task[None], OutputWriter]:
    """A session that read "Saved. " (saved) then "Shown, not saved." (sent to the pages as
    an append, not saved yet: saves come every second), its stream still open."""
    writer = OutputWriter(interval=60)
    saving = asyncio.create_task(writer.run_forever())
    account = await ProviderAccount.objects.aget(pk=run.provider_account_id)
    # Held by the watcher this session reads for, as a watcher's claim leaves it.
    await Run.objects.filter(pk=run.pk).aupdate(
        watched_by="watcher-a", watch_lease_until=timezone.now() + dt.timedelta(seconds=5)
    )
    session = Session(run, account.provider(), writer=writer, reader="watcher-a")
    more, quiet = asyncio.Event(), asyncio.Event()

    async def stream() -> Any:
        yield OutputDelta("Saved. ")
        await more.wait()
        yield OutputDelta("Shown, not saved.")
        await quiet.wait()  # the provider says nothing more

    reading = asyncio.create_task(session.consume(stream()))
    for _ in range(400):
        if session.text == "Saved. ":
            break
        await asyncio.sleep(0.01)
    assert session.text == "Saved. ", "the session never read the first delta"
    await session.flush()
    more.set()
    for _ in range(400):
        if session.text.endswith("not saved."):
            break
        await asyncio.sleep(0.01)
    assert session.text.endswith("not saved."), "the session never read the second delta"
    assert (await Run.objects.aget(pk=run.pk)).output == "Saved. "
    reading.add_done_callback(lambda _t: saving.cancel())
    return session, reading, writer


async def test_text_shown_but_not_saved_when_a_stop_answer_ended_the_run_is_kept(launch, bob, sim):
    """Found by the 30-minute soak (run 24): the stop path settled the run on the provider's
    word with the text saved so far, and what the session had shown since was never saved
    (saves skip ended runs): pages had shown more than the run kept, unmarked."""
    run = await sync_to_async(launch)("shown sim:pending=0 sim:duration=60")
    await sync_to_async(start_at_provider)(run)
    _session, reading, _writer = await _session_with_unsaved_text(run)
    other = await Run.objects.select_related("provider_account").aget(pk=run.pk)
    await sync_to_async(other.request_stop)(actor=bob, channel=Channel.BUTTON)
    await sync_to_async(other.record_stop_answer)(FAY_STOPPED, provider_label="Fay")
    assert other.status == Status.STOPPED
    reading.cancel()  # its watcher drops the session of a run that ended without it
    await asyncio.gather(reading, return_exceptions=True)
    await run.arefresh_from_db()
    assert run.output == "Saved. Shown, not saved."
    assert not run.output_incomplete


def _held_run_with_saved_text(launch: Any, holder: str) -> Run:
    run = launch("held sim:pending=0 sim:duration=60")
    start_at_provider(run)
    run.mark_running("PROCESSING")
    Run.objects.record_outputs({run.pk: ("Saved. ", 0)})
    Run.objects.filter(pk=run.pk).update(
        watched_by=holder, watch_lease_until=timezone.now() + dt.timedelta(seconds=4.9)
    )
    run.refresh_from_db()
    return run


def test_a_stop_answer_ending_a_run_a_watcher_reads_leaves_its_text_to_that_watcher(launch, bob):
    """The soak's runs 24 and 928: the watcher reading the run was killed (run 928: a second
    before the stop answer, its lease as fresh as a live one's). A dead reader cannot be told
    from a live one at once, so the stop answer leaves the kept text unconfirmed: the reader
    vouches for it when it lets go of the run. Pages do not say "incomplete" meanwhile (a
    live reader vouches within a tick: every Cancel would flash it)."""
    run = _held_run_with_saved_text(launch, "watcher-a")
    run.request_stop(actor=bob, channel=Channel.BUTTON)
    run.record_stop_answer(FAY_STOPPED, provider_label="Fay")
    run.refresh_from_db()
    assert run.status == Status.STOPPED
    assert not run.output_incomplete
    assert run.text_unconfirmed_until is not None
    # Another watcher's session cannot vouch for what watcher-a showed.
    run.keep_text_after_end("Saved. ", False, reader="watcher-b")
    run.refresh_from_db()
    assert run.text_unconfirmed_until is not None
    # watcher-a lets go: all it showed is saved (or it saves the rest now).
    run.keep_text_after_end("Saved. And the rest.", False, reader="watcher-a")
    run.refresh_from_db()
    assert run.output == "Saved. And the rest."
    assert not run.output_incomplete
    assert run.text_unconfirmed_until is None
    # Nothing left for the sweep of unconfirmed text.
    assert Run.objects.mark_unconfirmed_text(timezone.now() + dt.timedelta(hours=1)) == 0


def test_text_whose_reader_never_vouched_for_it_is_marked_incomplete(launch, bob):
    """A reader that died never lets go: once its time is up, a watcher's tick marks the
    kept text incomplete, with a timeline entry saying why, once."""
    run = _held_run_with_saved_text(launch, "watcher-a")
    run.request_stop(actor=bob, channel=Channel.BUTTON)
    run.record_stop_answer(FAY_STOPPED, provider_label="Fay")
    run.refresh_from_db()
    assert Run.objects.mark_unconfirmed_text(timezone.now()) == 0  # still its reader's time
    assert run.text_unconfirmed_until is not None
    later = run.text_unconfirmed_until + dt.timedelta(seconds=1)
    assert Run.objects.mark_unconfirmed_text(later) == 1
    assert Run.objects.mark_unconfirmed_text(later) == 0  # once
    run.refresh_from_db()
    assert run.output_incomplete
    assert run.status == Status.STOPPED
    assert run.events.filter(kind=RunEvent.Kind.STREAM_LOST).count() == 1
    # A reader coming back too late adds its text but cannot clear the mark.
    run.keep_text_after_end("Saved. Late.", False, reader="watcher-a")
    run.refresh_from_db()
    assert run.output == "Saved. Late."
    assert run.output_incomplete


async def test_any_watchers_tick_marks_text_whose_reader_is_gone(launch, bob, sim):
    run = await sync_to_async(_held_run_with_saved_text)(launch, "watcher-that-died")
    await sync_to_async(run.request_stop)(actor=bob, channel=Channel.BUTTON)
    await sync_to_async(run.record_stop_answer)(FAY_STOPPED, provider_label="Fay")
    await Run.objects.filter(pk=run.pk).aupdate(text_unconfirmed_until=timezone.now())
    watcher = Watcher()
    try:
        await watcher.tick()
    finally:
        await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.output_incomplete


def test_a_reader_that_showed_less_than_was_saved_still_vouches_for_the_text(launch, bob):
    """Fay with webhooks: the text arrives by webhook, and the reading session (a safety net
    that polls every few minutes) holds less of it."""
    run = _held_run_with_saved_text(launch, "watcher-a")
    run.request_stop(actor=bob, channel=Channel.BUTTON)
    run.record_stop_answer(FAY_STOPPED, provider_label="Fay")
    run.keep_text_after_end("Sav", False, reader="watcher-a")
    run.refresh_from_db()
    assert run.output == "Saved. "
    assert not run.output_incomplete
    assert run.text_unconfirmed_until is None


def test_a_session_letting_go_of_an_ended_run_never_clears_its_incomplete_mark(launch, bob):
    """Text the provider produced that no session read (a stop's recheck found the run over)
    stays marked: a session can vouch only for what it read."""
    run = launch("marked sim:pending=0 sim:duration=60")
    start_at_provider(run)
    run.mark_running("PROCESSING")
    Run.objects.record_outputs({run.pk: ("Read. ", 0)})
    run.refresh_from_db()
    run.keep_text("Read. ", True)
    run.request_stop(actor=bob, channel=Channel.BUTTON)
    run.record_stop_answer(FAY_STOPPED, provider_label="Fay")
    run.keep_text_after_end("Read. ", False, reader="")
    run.refresh_from_db()
    assert run.output_incomplete  # the stop answer kept it, and so does the session
    run.keep_text_after_end("Read. And more.", False, reader="")
    run.refresh_from_db()
    assert run.output == "Read. And more."
    assert run.output_incomplete


async def test_a_stop_pressed_while_the_create_is_in_flight_is_sent_when_the_id_arrives(
    launch, bob, sim, fay_account
):
    run = await sync_to_async(launch)("in flight sim:pending=0 sim:duration=60")
    provider = fay_account.provider()
    started = await anext(provider.run(run.prompt, {}))
    await run.astop(actor=bob, channel=Channel.BUTTON)
    assert run.status == Status.STOPPING
    assert not run.stop_sent_at
    session = Session(run, provider, writer=OutputWriter(interval=60))
    await session.apply(Started(started.external_id))
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert len(sim.stop_calls(started.external_id)) == 1


async def test_a_failing_stop_is_retried_then_unconfirmed_never_stopped(launch, bob, sim):
    run = await sync_to_async(launch)("x sim:pending=0 sim:duration=60 sim:stop=error")
    await sync_to_async(start_at_provider)(run)
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPING
    assert "internal error" in run.stop_error
    assert run.stop_next_attempt_at > timezone.now()  # backing off, not hammering

    # The wait is over: the next tick sends the stop again.
    await Run.objects.filter(pk=run.pk).aupdate(stop_next_attempt_at=timezone.now())
    watcher = Watcher()
    await watcher.tick()
    await watcher.drain(sessions=False)
    assert len(sim.stop_calls(run.external_id)) == 2

    # Past the deadline with no confirmation: unconfirmed, and still being retried.
    await Run.objects.filter(pk=run.pk).aupdate(
        stop_deadline=timezone.now() - dt.timedelta(seconds=1)
    )
    await watcher.tick()
    await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.status == Status.STOP_UNCONFIRMED
    assert run.stop_next_attempt_at is not None
    assert run.stop_confirmed_at is None


async def test_a_run_past_its_timeout_is_stopped_through_the_verified_path(launch, sim):
    run = await sync_to_async(launch)("x sim:pending=0 sim:duration=60")
    await sync_to_async(start_at_provider)(run)
    await Run.objects.filter(pk=run.pk).aupdate(deadline=timezone.now() - dt.timedelta(seconds=1))
    watcher = Watcher()
    await watcher.tick()
    await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.stop_channel == Channel.TIMEOUT
    assert "Timed out after 600 s" in run.stop_reason
    assert len(sim.stop_calls(run.external_id)) == 1


async def test_after_a_restart_running_runs_are_followed_not_started_again(launch, sim):
    run = await sync_to_async(launch)(f"{uuid.uuid4()} sim:pending=0 sim:duration=0.4")
    await sync_to_async(start_at_provider)(run)  # the process that did this has "died"
    watcher = Watcher()
    await watcher.tick()
    await watcher.drain()
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    creates = [
        r
        for r in sim.requests()
        if r["path"].endswith("/conversations") and r["body"]["prompt"] == run.prompt
    ]
    assert len(creates) == 1


async def test_a_start_interrupted_before_the_id_was_saved_is_not_sent_twice(launch, sim):
    run = await sync_to_async(launch)(f"{uuid.uuid4()} sim:pending=0 sim:duration=60")
    # Long enough ago that the call is over: its process died with it.
    await Run.objects.filter(pk=run.pk).aupdate(
        start_attempted_at=timezone.now() - dt.timedelta(minutes=5)
    )
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert "provider id is unknown" in run.error
    assert not [r for r in sim.requests() if r["body"] and run.prompt in str(r["body"])]


async def test_a_start_still_in_flight_elsewhere_is_waited_for_not_failed(launch, sim):
    """A watcher shutting down may still be waiting for its start call's answer."""
    run = await sync_to_async(launch)(f"{uuid.uuid4()} sim:pending=0 sim:duration=60")
    await Run.objects.filter(pk=run.pk).aupdate(start_attempted_at=timezone.now())
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.PENDING
    assert not [r for r in sim.requests() if r["body"] and run.prompt in str(r["body"])]


# --- Leases: each active run has exactly one watcher --------------------------------------


def test_watchers_split_the_active_runs_and_never_share_one(launch):
    runs = [launch(f"lease {i} sim:duration=60") for i in range(5)]
    first = Run.objects.claim_watch("w1", lease_seconds=30, limit=3)
    second = Run.objects.claim_watch("w2", lease_seconds=30, limit=3)
    assert len(first) == 3
    assert len(second) == 2
    assert set(first) | set(second) == {r.pk for r in runs}
    assert not set(first) & set(second)
    # Renewing takes nothing from the other watcher.
    assert Run.objects.claim_watch("w1", lease_seconds=30, limit=10) == first


def test_a_lapsed_lease_is_taken_over_and_a_released_run_is_free_at_once(launch):
    run = launch("lease sim:duration=60")
    assert Run.objects.claim_watch("dead", lease_seconds=-1, limit=10) == [run.pk]
    assert Run.objects.claim_watch("alive", lease_seconds=30, limit=10) == [run.pk]
    assert Run.objects.claim_watch("dead", lease_seconds=30, limit=10) == []
    assert Run.objects.release_watch("alive") == 1
    assert Run.objects.claim_watch("next", lease_seconds=30, limit=10) == [run.pk]


def test_text_of_a_run_taken_from_a_watcher_that_died_is_marked_incomplete_not_after_a_hand_over(
    launch,
):
    """Found by the chaos soak: viewers had been shown text the dead watcher's session never
    saved, and the run's page did not say its text was incomplete."""
    died, handed_over = launch("a sim:duration=60"), launch("b sim:duration=60")
    for run in (died, handed_over):
        run.record_external_id(f"ext-{run.pk}")
        run.mark_running("PROCESSING")
    Run.objects.record_outputs({died.pk: ("Saved so far", 0), handed_over.pk: ("All saved", 0)})
    assert Run.objects.claim_watch("dead", lease_seconds=-1, limit=10)
    Run.objects.filter(pk=handed_over.pk).update(watched_by="")  # what release_watch leaves
    Run.objects.claim_watch("next", lease_seconds=30, limit=10)
    died.refresh_from_db()
    handed_over.refresh_from_db()
    assert died.output_incomplete
    assert died.output == "Saved so far"
    assert died.events.filter(kind=RunEvent.Kind.STREAM_LOST).exists()
    assert not handed_over.output_incomplete


def test_finished_runs_are_not_claimed(launch):
    run = launch("done sim:duration=60")
    run.mark_failed(proof="status_read", error="gone")
    assert Run.objects.claim_watch("w", lease_seconds=30, limit=10) == []


async def test_a_watcher_shutting_down_hands_its_runs_back(launch, sim):
    run = await sync_to_async(launch)(f"{uuid.uuid4()} sim:pending=0 sim:duration=60")
    await sync_to_async(start_at_provider)(run)
    watcher = Watcher()
    await watcher.tick()
    await run.arefresh_from_db()
    assert run.watched_by == watcher.identity
    await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.watched_by == ""
    assert run.status == Status.RUNNING  # handed back, not stopped or failed


async def test_a_watcher_that_lost_a_run_to_another_stops_following_it(launch, sim):
    run = await sync_to_async(launch)(f"{uuid.uuid4()} sim:pending=0 sim:duration=60")
    await sync_to_async(start_at_provider)(run)
    watcher = Watcher()
    await watcher.tick()
    session = watcher.sessions[run.pk]
    await Run.objects.filter(pk=run.pk).aupdate(watched_by="someone-else")
    await watcher.tick()
    with pytest.raises(asyncio.CancelledError):
        await session
    assert run.pk not in watcher.sessions
    await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.watched_by == "someone-else"


# --- The "no progress" guardrail ----------------------------------------------------------


def launch_guarded(bob, fay_account, seconds: int) -> Run:
    return Run.objects.launch(
        account=fay_account,
        user=bob,
        prompt=f"{uuid.uuid4()} sim:pending=0 sim:duration=60",
        options={},
        timeout_seconds=600,
        no_progress_seconds=seconds,
    )


def test_output_and_a_new_provider_status_move_the_no_progress_deadline(bob, fay_account):
    run = launch_guarded(bob, fay_account, 120)
    assert run.stall_deadline is None  # not running yet: the timeout covers queued runs
    run.mark_running("PROCESSING")
    first = run.stall_deadline
    assert first is not None
    Run.objects.record_outputs({run.pk: ("partial", run.no_progress_seconds)})
    run.refresh_from_db()
    assert run.stall_deadline > first
    moved, version = run.stall_deadline, run.version
    assert run.record_progress("SUMMARISING")
    run.refresh_from_db()
    assert run.stall_deadline > moved
    assert run.provider_status == "SUMMARISING"
    assert run.version == version + 1  # a new provider status is shown to viewers


async def test_a_repeated_progress_marker_is_not_progress_but_a_bare_still_working_is(
    bob, fay_account
):
    """IntelligenceBox's message count says whether a status-followed stream moved; Fay can
    only say it is still working, which must not look like a stall."""
    run = await sync_to_async(launch_guarded)(bob, fay_account, 120)
    await sync_to_async(run.mark_running)("active")
    session = Session(run, fay_account.provider(), writer=OutputWriter(interval=60))

    async def deadline_after(event: Running) -> dt.datetime:
        await session.apply(event)
        await run.arefresh_from_db()
        assert run.stall_deadline is not None
        return run.stall_deadline

    first = await deadline_after(Running("active", progress="3"))
    assert await deadline_after(Running("active", progress="3")) == first
    second = await deadline_after(Running("active", progress="4"))
    assert second > first
    assert await deadline_after(Running("active")) > second


def test_zero_turns_the_no_progress_guardrail_off(bob, fay_account):
    run = launch_guarded(bob, fay_account, 0)
    run.mark_running("PROCESSING")
    Run.objects.record_outputs({run.pk: ("partial", run.no_progress_seconds)})
    run.refresh_from_db()
    assert run.stall_deadline is None
    assert not Run.objects.stalled(timezone.now() + dt.timedelta(days=365)).exists()


async def test_a_run_without_progress_is_stopped_through_the_verified_path(bob, fay_account, sim):
    run = await sync_to_async(launch_guarded)(bob, fay_account, 300)
    await sync_to_async(start_at_provider)(run)
    await sync_to_async(run.mark_running)("PROCESSING")
    await Run.objects.filter(pk=run.pk).aupdate(
        stall_deadline=timezone.now() - dt.timedelta(seconds=1)
    )
    watcher = Watcher()
    await watcher.tick()
    await watcher.drain(sessions=False)
    await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.stop_channel == Channel.STALL
    assert run.stop_reason.startswith("No progress for 5 min")
    assert "Fay's stop answer" in run.stop_confirmation
    assert len(sim.stop_calls(run.external_id)) == 1


async def test_shutdown_lets_an_intelligencebox_stream_finish(acme, bob, sim, settings):
    """IntelligenceBox ends a chat whose stream disconnects: handing it over mid-stream would
    end the run, so shutdown lets that stream finish (bounded) before letting go."""
    settings.RUNBRAKE_WATCHER_DRAIN_SECONDS = 60
    account = await sync_to_async(sim_account)(acme, sim, "intelligencebox")
    run = await sync_to_async(Run.objects.launch)(
        account=account,
        user=bob,
        prompt=f"{uuid.uuid4()} sim:duration=1.5 sim:chunks=15",
        options={},
        timeout_seconds=600,
    )
    watcher = Watcher()
    await watcher.tick()
    async with asyncio.timeout(15):  # streaming, then hand over mid-stream
        while not (await Run.objects.aget(pk=run.pk)).output:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await watcher.shutdown()
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED, run.status


async def _dify_run_with_an_unconfirmed_stop(acme, sim, bob) -> Run:
    run = await _dify_run_stopping(acme, sim, bob)
    await sync_to_async(run.record_stop_answer)(DIFY_ACCEPTS, provider_label="Dify")
    await sync_to_async(run.mark_stop_unconfirmed)()
    return run


# Dify's answer to every stop call, known task or not: it proves the call arrived, nothing more.
DIFY_ACCEPTS = StopResult(
    terminal=None,
    provider_status="stop accepted",
    message="Dify accepted the stop; waiting for its stream to end.",
    answer={"result": "success"},
)


async def _dify_run_stopping(acme, sim, bob) -> Run:
    """A Dify run whose stop was requested: the requester holds the stop call's lease, and
    the call has not been answered (yet)."""
    account = await sync_to_async(sim_account)(acme, sim, "dify")
    launched = await sync_to_async(Run.objects.launch)(
        account=account, user=bob, prompt="q", options={}, timeout_seconds=600
    )
    run = await Run.objects.select_related("provider_account").aget(pk=launched.pk)
    await sync_to_async(run.record_external_id)(
        "task-1", {"conversation_id": "c", "message_id": "m"}
    )
    await sync_to_async(run.request_stop)(actor=bob, channel=Channel.BUTTON)
    assert run.stop_sent_at is not None
    return run


async def test_a_dify_reply_ending_normally_when_no_stop_call_was_ever_answered_is_completed(
    acme, sim, bob
):
    """Found by the chaos soak: the stop's lease was taken, the call never reached Dify (its
    sender died), and the reply's normal end was taken as the stop landing: Stopped without
    the provider's word. Dify ends a stopped reply like a finished one, so only a stop Dify
    has answered makes that end a stop."""
    run = await _dify_run_stopping(acme, sim, bob)
    # The lease ran out with no answer recorded: whoever held it never got one.
    await Run.objects.filter(pk=run.pk).aupdate(
        stop_sent_at=timezone.now() - dt.timedelta(minutes=5)
    )
    await run.arefresh_from_db()
    account = await ProviderAccount.objects.aget(pk=run.provider_account_id)
    session = Session(run, account.provider(), writer=OutputWriter(interval=60))
    session.text = "The whole reply."
    await session.apply(Finished("completed", "message_end", via="stream"))
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED, run.status
    assert run.output == "The whole reply."
    assert run.proof != "stream_end"


async def test_a_dify_reply_ending_while_its_stop_call_is_out_waits_for_the_answer(acme, sim, bob):
    """Dify's stop answer and the stream's end race (two connections, two processes): an end
    that arrives while the stop call is still out is the stop landing once Dify answers it."""
    run = await _dify_run_stopping(acme, sim, bob)
    account = await ProviderAccount.objects.aget(pk=run.provider_account_id)
    session = Session(run, account.provider(), writer=OutputWriter(interval=60))
    ending = asyncio.create_task(session.apply(Finished("completed", "message_end", via="stream")))
    # Undecided while the call is out (its lease runs for seconds; a session that decided
    # at once would be done long before this).
    done, _ = await asyncio.wait({ending}, timeout=0.5)
    assert not done
    other = await Run.objects.select_related("provider_account").aget(pk=run.pk)
    await sync_to_async(other.record_stop_answer)(DIFY_ACCEPTS, provider_label="Dify")
    async with asyncio.timeout(10):
        await ending
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED, run.status
    assert run.proof == "stream_end"


async def test_a_dify_reply_that_ended_with_no_answer_after_the_stop_is_stopped(acme, sim, bob):
    """Dify saves an empty answer for a reply stopped before its first word, exactly like one
    still generating; once its record settles empty after the stop, the stop landed."""
    run = await _dify_run_with_an_unconfirmed_stop(acme, sim, bob)
    account = await ProviderAccount.objects.aget(pk=run.provider_account_id)
    session = Session(run, account.provider(), writer=OutputWriter(interval=60))
    await session.apply(Finished("completed", "history:no_answer", via="history"))
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.proof == "history"
    assert "record of the message" in run.stop_confirmation


async def test_a_dify_reply_with_text_after_an_unconfirmed_stop_completed_despite_it(
    acme, sim, bob
):
    run = await _dify_run_with_an_unconfirmed_stop(acme, sim, bob)
    account = await ProviderAccount.objects.aget(pk=run.provider_account_id)
    session = Session(run, account.provider(), writer=OutputWriter(interval=60))
    await session.apply(
        Finished("completed", "history:answer", output="The whole answer.", via="history")
    )
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output == "The whole answer."
    last = await run.events.alast()
    assert last is not None
    assert "despite the stop" in last.message


async def test_a_tick_replaces_a_database_connection_that_died_under_the_sessions(launch):
    # Found by the chaos soak: after a PostgreSQL restart the sessions' shared ORM thread kept
    # its dead connection (no request ever ends there to close it), every session crashed on
    # "the connection is closed" for good, and the heartbeat's own connection kept the leases.
    from django.db import connection

    run = await sync_to_async(launch)("x sim:pending=0 sim:duration=60")

    def kill_the_connection_under_django() -> None:
        connection.ensure_connection()
        connection.connection.close()  # the server went away; Django does not know yet

    await sync_to_async(kill_the_connection_under_django)()
    watcher = Watcher()
    try:
        await watcher.tick()
        found = await Run.objects.aget(pk=run.pk)
    finally:
        await watcher.shutdown()
    assert found.pk == run.pk


async def test_a_stop_intelligencebox_finds_nothing_to_stop_completes_a_run_nobody_else_settled(
    acme, sim, bob
):
    """Found by the chaos soak: the box answers a stop with "no active stream" for a chat it
    completed, and its stream-status says `completed`. The stream's reader gets the first
    chance to settle the run with its whole text; when it has not (it died or hangs), the
    stop's recheck applies the box's own word, marks the kept text as possibly incomplete, and
    sends no second stop call. Before, the run stayed Stopping for good."""
    account = await sync_to_async(sim_account)(acme, sim, "intelligencebox")
    run = await _followed_to_its_end_by_a_reader_that_died(
        account, bob, "sim:duration=0.2 sim:chunks=2"
    )
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPING  # "no active stream": the reader may still settle it
    assert run.stop_next_attempt_at is not None  # ... and if it does not, the recheck will
    await _the_stops_recheck_comes(run, account)
    assert run.status == Status.COMPLETED, run.status
    assert run.proof == "status_read"
    assert run.output_incomplete
    assert len(sim.stop_calls(run.external_id, "intelligencebox")) == 1


async def test_an_xpander_stop_accepted_on_a_turn_that_already_failed_fails_the_run_on_recheck(
    acme, sim, bob
):
    """Found by the chaos soak: the conversation was idle (its turn had failed), xpander
    accepted the stop (200, nothing to stop), and Runbrake sent it again every few seconds
    until it gave up as Stop unconfirmed. The recheck reads the run-state first."""
    account = await sync_to_async(sim_account)(acme, sim, "xpander")
    run = await _followed_to_its_end_by_a_reader_that_died(
        account, bob, "sim:duration=0.2 sim:fail=error"
    )
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPING
    await _the_stops_recheck_comes(run, account)
    assert run.status == Status.FAILED, run.status
    assert run.proof == "status_read"
    stops = [r for r in sim.requests("xpander") if r["path"].endswith("/stop")]
    assert len([r for r in stops if run.external_id in r["path"]]) == 1


async def _followed_to_its_end_by_a_reader_that_died(
    account: ProviderAccount, user: Any, behaviour: str
) -> Run:
    """A run launched with these `sim:` directives, sent and read to its provider's end by a
    reader that died before saving any of it (nothing but its id and Running recorded)."""
    launched = await sync_to_async(Run.objects.launch)(
        account=account,
        user=user,
        prompt=f"{uuid.uuid4()} {behaviour}",
        options={},
        timeout_seconds=600,
    )
    run = await Run.objects.select_related("provider_account").aget(pk=launched.pk)
    async for event in run.provider_account.provider().run(run.prompt, run.options):
        if isinstance(event, Started):
            await sync_to_async(run.record_external_id)(event.external_id, event.refs)
            await sync_to_async(run.mark_running)("running")
    return run


async def test_a_run_whose_session_crashed_mid_stream_keeps_its_text_marked_incomplete(
    acme, sim, bob, monkeypatch
):
    """Found by the chaos soak: a session crashed (its database writes failing) after pages
    had been shown text it never saved; the retried session followed the run to its end
    and the text was kept as if whole."""
    account = await sync_to_async(sim_account)(acme, sim, "xpander")
    run = await sync_to_async(Run.objects.launch)(
        account=account,
        user=bob,
        prompt=f"{uuid.uuid4()} sim:duration=0.5 sim:chunks=6 sim:fail=error",
        options={},
        timeout_seconds=600,
    )
    apply = Session.apply

    async def crash_on_the_first_text(self: Session, event: object) -> str | None:
        if isinstance(event, OutputDelta):
            raise RuntimeError("the database went away")
        return await apply(self, event)

    watcher = Watcher()
    monkeypatch.setattr(Session, "apply", crash_on_the_first_text)
    await watcher.watch(run.pk)  # crashes (logged), as a session does
    monkeypatch.setattr(Session, "apply", apply)
    await watcher.watch(run.pk)  # the retry, next tick: follows the turn to its end
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert run.output_incomplete


async def test_a_run_the_box_forgot_after_saying_nothing_was_left_to_stop_ends_on_that_answer(
    replay, acme, bob
):
    """Found by the 30-minute soak: the box answered the stop "no active stream" with its
    stream-status `error`, then was restarted and forgot the chat (`not_found`). The run
    stayed Stopping for good, its status read every few seconds. The box's own earlier word
    settles it."""
    from tests.wire import Answer

    replay.on(
        "POST",
        "/api/ai/chat/run-9/stop",
        Answer.json({"success": False, "message": "No active stream found"}, status=404),
    )
    replay.on(
        "GET",
        "/api/ai/chat/run-9/stream-status",
        Answer.json({"status": "error", "isActive": False, "messageCount": 9}),
        Answer.json({"status": "not_found", "isActive": False}),
    )
    account = await ProviderAccount.objects.acreate(
        team=acme, kind="intelligencebox", name="Box", base_url=replay.url, api_key="k"
    )
    launched = await sync_to_async(Run.objects.launch)(
        account=account, user=bob, prompt="q", options={}, timeout_seconds=600
    )
    run = await Run.objects.select_related("provider_account").aget(pk=launched.pk)
    await sync_to_async(run.record_external_id)("run-9")
    await sync_to_async(run.mark_running)("active")
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPING
    await _the_stops_recheck_comes(run, account)
    assert run.status == Status.FAILED, run.status
    assert run.output_incomplete
    assert len(replay.requests_to("POST", "/api/ai/chat/run-9/stop")) == 1


async def _the_stops_recheck_comes(run: Run, account: ProviderAccount) -> None:
    """The stop's recheck time arrives and the watcher's stop pass takes it (asend_stop)."""
    await Run.objects.filter(pk=run.pk).aupdate(stop_next_attempt_at=timezone.now())
    await run.arefresh_from_db()
    await run.asend_stop(account=account)
    await run.arefresh_from_db()
