"""The watcher against the Fay simulator over real HTTP: start, follow, complete, fail, stop
before the id is known, retried stops, the stop deadline, timeouts and restart recovery."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from runs.models import Channel, Run, Status
from runs.providers.base import Started
from runs.watcher import Watcher
from tests.conftest import start_at_provider

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
    assert "Ask a team admin to update the key" in run.error


async def test_rate_limits_are_one_backoff_event_and_the_run_completes(launch):
    run = await sync_to_async(launch)(
        f"{uuid.uuid4()} sim:pending=0 sim:duration=0.1 sim:fail=rate_limit"
    )
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert (await sync_to_async(kinds)(run)).count("backoff") == 1


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


async def test_a_stop_pressed_while_the_create_is_in_flight_is_sent_when_the_id_arrives(
    launch, bob, sim, fay_account
):
    run = await sync_to_async(launch)("in flight sim:pending=0 sim:duration=60")
    provider = fay_account.provider()
    started = await anext(provider.run(run.prompt, {}))
    await run.astop(actor=bob, channel=Channel.BUTTON)
    assert run.status == Status.STOPPING
    assert not run.stop_sent_at
    await Watcher().apply(run, Started(started.external_id))
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
    await Run.objects.filter(pk=run.pk).aupdate(start_attempted_at=timezone.now())
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert "provider id is unknown" in run.error
    assert not [r for r in sim.requests() if r["body"] and run.prompt in str(r["body"])]
