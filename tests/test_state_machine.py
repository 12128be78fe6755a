"""The run state machine: conditional transitions, events, terminal finality, racing stops."""

from __future__ import annotations

import threading
import time

import pytest
from asgiref.sync import async_to_sync

from runs.models import Channel, Run, RunAlreadyFinished, RunEvent, Status
from tests.conftest import start_at_provider


def kinds(run: Run) -> list[str]:
    return list(run.events.order_by("at", "id").values_list("kind", flat=True))


def test_it_launches_pending_with_a_created_event(launch, bob):
    run = launch()
    assert run.status == Status.PENDING
    event = run.events.get()
    assert (event.kind, event.actor, event.to_status) == ("created", bob, "pending")


def test_each_transition_writes_one_event_with_from_and_to(launch):
    run = launch()
    assert run.mark_running("PROCESSING")
    assert run.mark_completed(proof="status_read", output="done", provider_status="COMPLETED")
    events = list(run.events.order_by("at", "id").values_list("kind", "from_status", "to_status"))
    assert events[1:] == [("running", "pending", "running"), ("completed", "running", "completed")]
    run.refresh_from_db()
    assert run.output == "done"
    assert run.finished_at is not None


def test_a_disallowed_transition_loses_and_changes_nothing(launch):
    run = launch()
    assert run.mark_stop_unconfirmed() is False
    assert Run.objects.get(pk=run.pk).status == Status.PENDING
    assert kinds(run) == ["created"]


def test_terminal_states_never_change_and_late_news_is_an_event(launch, bob):
    run = launch()
    run.request_stop(actor=bob, channel=Channel.BUTTON, reason="wrong prompt")
    assert run.mark_stopped(proof="status_read", confirmation="a test")
    assert (
        run.mark_completed(proof="status_read", output="late", provider_status="COMPLETED") is False
    )
    run.refresh_from_db()
    assert run.status == Status.STOPPED
    assert run.output == ""
    late = run.events.get(kind=RunEvent.Kind.LATE_RESULT)
    assert "stays stopped" in late.message


def test_request_stop_records_who_how_and_why(launch, bob):
    run = launch()
    assert run.request_stop(actor=bob, channel=Channel.API, reason="too slow") is True
    run.refresh_from_db()
    assert run.status == Status.STOPPING
    assert (run.stop_requested_by, run.stop_channel, run.stop_reason) == (bob, "api", "too slow")
    assert run.stop_deadline > run.stop_requested_at
    event = run.events.get(kind="stop_requested")
    assert (event.actor, event.channel, event.message) == (bob, "api", "too slow")


def test_request_stop_is_idempotent_while_stopping_or_stopped(launch, bob):
    run = launch()
    run.request_stop(actor=bob, channel=Channel.BUTTON)
    assert run.request_stop(actor=bob, channel=Channel.BUTTON) is False
    run.mark_stopped(proof="status_read", confirmation="a test")
    assert run.request_stop(actor=bob, channel=Channel.BUTTON) is False
    assert run.events.filter(kind="stop_requested").count() == 1


@pytest.mark.parametrize("finish", ["completed", "failed"])
def test_stopping_a_finished_run_is_refused(launch, bob, finish):
    run = launch()
    if finish == "completed":
        run.mark_completed(proof="status_read", output="x")
    else:
        run.mark_failed(proof="status_read", error="boom")
    with pytest.raises(RunAlreadyFinished, match=f"already {finish}"):
        run.request_stop(actor=bob, channel=Channel.BUTTON)


def test_a_run_that_finishes_while_stopping_says_so(launch, bob):
    run = launch()
    run.request_stop(actor=bob, channel=Channel.BUTTON)
    assert run.mark_completed(proof="status_read", output="full report")
    assert run.finished_before_stop
    assert "before the stop landed" in run.events.get(kind="completed").message


@pytest.mark.django_db(transaction=True)
def test_two_stops_racing_make_exactly_one_provider_call(launch, bob, alice, sim):
    run = start_at_provider(launch("race sim:pending=0 sim:duration=60"))
    barrier = threading.Barrier(2)
    outcomes: list[bool] = []

    def press_stop(user):
        mine = Run.objects.get(pk=run.pk)
        barrier.wait()
        outcomes.append(async_to_sync(mine.astop)(actor=user, channel=Channel.BUTTON).requested)

    threads = [threading.Thread(target=press_stop, args=(u,)) for u in (alice, bob)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False, True]
    run.refresh_from_db()
    assert run.status == Status.STOPPED
    assert len(sim.stop_calls(run.external_id)) == 1
    assert run.events.filter(kind="stop_requested").count() == 1


def test_the_stopper_holds_the_first_stop_call_so_the_watcher_cannot_send_it_first(launch, bob):
    from django.utils import timezone

    with_id = launch()
    with_id.record_external_id("abc")
    with_id.request_stop(actor=bob, channel=Channel.BUTTON)
    without_id = launch()
    without_id.request_stop(actor=bob, channel=Channel.BUTTON)
    due = set(Run.objects.stop_due(timezone.now()).values_list("pk", flat=True))
    assert with_id.pk not in due  # leased to the requester, who sends it now
    assert with_id.stop_attempts == 1
    assert without_id.stop_attempts == 0  # nothing to send until the provider names it


def test_an_event_records_the_status_the_run_has_not_the_one_its_caller_last_read(launch, bob):
    # Found by the chaos soak: the stop call's answer came back after the stream had already
    # ended the run, and its event said "stopping → stopping" on a run that was stopped.
    run = launch()
    run.mark_running("active")
    run.request_stop(actor=bob, channel=Channel.API)
    stale = Run.objects.get(pk=run.pk)  # the stopper's copy, still STOPPING
    assert run.mark_stopped(confirmation="the stream", proof="stream_event")
    stale.record_event(RunEvent.Kind.STOP_ANSWER, "Stream stopped successfully")
    answer = stale.events.get(kind=RunEvent.Kind.STOP_ANSWER)
    assert (answer.from_status, answer.to_status) == (Status.STOPPED, Status.STOPPED)
    assert stale.status == Status.STOPPED


@pytest.mark.django_db(transaction=True)
def test_a_transition_that_waited_for_the_run_is_timed_after_the_one_that_held_it(launch, bob):
    """Found by the chaos soak: the watcher read "completed" and waited for the run's row
    while the API's stop held it; the stop went first, yet the completion was timed when it
    began waiting, so the timeline read Completed, then Stop requested (a terminal state that
    seemed to change). An event is timed once it holds the run."""
    from django.db import connection, transaction

    if connection.vendor != "postgresql":
        pytest.skip("needs row locks another connection can be seen waiting on (PostgreSQL)")
    run = launch()
    run.mark_running("PROCESSING")
    holding, release = threading.Event(), threading.Event()

    def hold_the_run_then_stop_it() -> None:
        try:
            with transaction.atomic():
                Run.objects.select_for_update().filter(pk=run.pk).first()
                holding.set()
                release.wait(30)
                Run.objects.get(pk=run.pk).request_stop(actor=bob, channel=Channel.API)
        finally:
            connection.close()

    def complete_it() -> None:
        try:
            Run.objects.get(pk=run.pk).mark_completed(proof="status_read", output="done")
        finally:
            connection.close()

    stopper = threading.Thread(target=hold_the_run_then_stop_it)
    stopper.start()
    assert holding.wait(30)
    completer = threading.Thread(target=complete_it)
    completer.start()
    try:
        deadline = time.monotonic() + 30
        while not _sessions_waiting_for_a_lock():
            assert time.monotonic() < deadline, "the completion never waited for the run"
            time.sleep(0.02)
    finally:
        release.set()
        stopper.join(30)
        completer.join(30)
    timeline = list(run.events.order_by("at", "id").values_list("kind", "to_status"))
    assert timeline[-2:] == [("stop_requested", "stopping"), ("completed", "completed")]


def _sessions_waiting_for_a_lock() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])
