"""IntelligenceBox runs end to end through the watcher when the box speaks the AI SDK UI
message stream (`sim:format=ui`): completion, a stop, an in-band error."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from asgiref.sync import sync_to_async

from runs.models import Channel, Run, Status
from runs.watcher.watcher import Watcher
from simulators.intelligencebox import answer_chunks
from tests.conftest import sim_account

pytestmark = pytest.mark.django_db(transaction=True)


async def launch(acme, sim, bob, prompt: str) -> Run:
    account = await sync_to_async(sim_account)(acme, sim, "intelligencebox")
    return await sync_to_async(Run.objects.launch)(
        account=account,
        user=bob,
        prompt=f"{uuid.uuid4().hex[:6]} {prompt}",
        options={},
        timeout_seconds=600,
    )


async def wait_for(run: Run, check: Callable[[Run], bool], timeout: float = 15.0) -> Run:
    """Wait for a real condition on the stored run (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await run.arefresh_from_db()
        if check(run):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run.pk} never got there: {run.status} {run.output[:80]!r}")


def full_answer(run: Run, chunks: int) -> str:
    """What the simulated box writes for this prompt (it answers deterministically)."""
    return "".join(answer_chunks(run.prompt, chunks))


async def test_it_completes_a_ui_stream_run_with_its_full_text(acme, sim, bob):
    run = await launch(
        acme, sim, bob, "glacier retreat sim:format=ui sim:duration=0.6 sim:chunks=12"
    )
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.provider_status == "finish:stop"
    assert run.output == full_answer(run, 12)
    assert "glacier retreat" in run.output


async def test_it_stops_a_ui_stream_run_on_the_box_s_abort_and_keeps_the_partial_text(
    acme, sim, bob
):
    run = await launch(acme, sim, bob, "long history of tea sim:format=ui sim:duration=20")
    session = asyncio.create_task(Watcher().watch(run.pk))
    await wait_for(run, lambda r: r.status == Status.RUNNING and len(r.output) > 10)
    outcome = await run.astop(actor=bob, channel=Channel.BUTTON, reason="enough")
    assert outcome.requested
    await asyncio.wait_for(session, 10)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    # The stream's own `abort` chunk confirmed it, not a status read after the stream ended.
    assert run.provider_status == "abort"
    assert run.stop_confirmation == "IntelligenceBox's stream reporting the run stopped"
    whole = full_answer(run, 300)
    assert run.output
    assert whole.startswith(run.output)
    assert len(run.output) < len(whole)
    stops = [
        r
        for r in sim.requests("intelligencebox")
        if r["method"] == "POST" and r["path"].endswith(f"/api/ai/chat/{run.external_id}/stop")
    ]
    assert len(stops) == 1


async def test_it_fails_a_ui_stream_run_in_the_box_s_words_despite_the_trailing_finish(
    acme, sim, bob
):
    run = await launch(
        acme, sim, bob, "doomed ledger sim:format=ui sim:fail=error sim:duration=0.4 sim:chunks=6"
    )
    await Watcher().watch(run.pk)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert run.error == "The IntelligenceBox reported an error: Model unavailable"
    # The text streamed before the error is kept.
    assert run.output == "".join(answer_chunks(run.prompt, 6)[:3])
