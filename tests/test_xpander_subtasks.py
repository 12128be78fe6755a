"""xpander.ai runs whose router hands the work to an async sub-task, end to end through the
watcher against the simulator over real HTTP: the run lasts as long as the sub-task does."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async

from runs.models import Channel, Run, Status
from runs.watcher.watcher import Watcher
from tests.conftest import sim_account

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "sim-acme-xpander"


@pytest.fixture
def launch(acme: Any, bob: Any, sim: Any) -> Callable[[str], Any]:
    async def make(prompt: str) -> Run:
        account = await sync_to_async(sim_account)(acme, sim, "xpander")
        account.options = {**account.options, "poll_interval": 0.1}
        await account.asave(update_fields=["options"])
        return await sync_to_async(Run.objects.launch)(
            account=account,
            user=bob,
            prompt=f"{uuid.uuid4().hex[:6]} {prompt}",
            options={},
            timeout_seconds=600,
        )

    return make


async def wait_for(run: Run, check: Callable[[Run], bool], timeout: float = 15.0) -> Run:
    """Wait for a real condition on the stored run (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await run.arefresh_from_db()
        if check(run):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run.pk} never got there: {run.status} {run.output[:80]!r}")


async def records(sim: Any, run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """The router's and its sub-task's task records, as the simulator holds them."""
    async with httpx.AsyncClient(base_url=f"{sim.url}/sim/xpander", timeout=10) as client:
        headers = {"x-api-key": KEY}
        router = (await client.get(f"/v1/tasks/{run.external_id}", headers=headers)).json()
        (child_id,) = router["sub_executions"]
        child = (await client.get(f"/v1/tasks/{child_id}", headers=headers)).json()
    return router, child


def when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


async def kinds_of(run: Run) -> list[str]:
    return [k async for k in run.events.values_list("kind", flat=True)]


async def test_it_completes_an_async_sub_task_run_only_after_the_sub_task(launch, sim) -> None:
    run = await launch("contract audit sim:subtask=async sim:duration=1 sim:chunks=10")

    await asyncio.wait_for(Watcher().watch(run.pk), 20)

    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    router, child = await records(sim, run)
    assert router["status"] == child["status"] == "completed"
    # The router's acknowledgement, then the sub-task's findings as their own paragraph.
    assert run.output == f"{router['result']}\n\n{child['result']}"
    assert "Here is what the agent found about" in run.output
    # Finished after the sub-task, not at the router's own task_finished a second earlier.
    assert run.finished_at is not None
    assert run.finished_at >= when(child["finished_at"]) > when(router["finished_at"])
    assert (await kinds_of(run))[-1] == "completed"
    assert "stream_lost" not in await kinds_of(run)


async def test_it_stops_a_run_while_its_sub_task_works(launch, sim, bob) -> None:
    run = await launch("contract audit sim:subtask=async sim:duration=20")
    session = asyncio.create_task(Watcher().watch(run.pk))
    # The router has answered; the sub-task's text is arriving.
    await wait_for(run, lambda r: "Here is what the agent found" in r.output)

    outcome = await run.astop(actor=bob, channel=Channel.BUTTON, reason="enough")
    assert outcome.requested
    await asyncio.wait_for(session, 10)

    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.stop_confirmation == "xpander.ai's stream reporting the run stopped"
    router, child = await records(sim, run)
    assert child["status"] == "stopped"
    assert child["is_manually_stopped"] is True
    assert router["status"] == "completed"  # it had answered before the stop
    assert run.output.startswith(router["result"])
    assert child["result"] in run.output
    (stop,) = sim.stop_calls(run.external_id, "xpander")
    assert stop["body"] == {"clear_queue": True}


async def test_it_follows_a_stream_dropped_during_the_sub_task_to_its_end(launch, sim) -> None:
    run = await launch("contract audit sim:subtask=async sim:drop_stream sim:duration=1.5")

    await asyncio.wait_for(Watcher().watch(run.pk), 20)

    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert "stream_lost" in await kinds_of(run)
    router, child = await records(sim, run)
    assert child["status"] == "completed"
    # The whole answer, although the stream carried only half of the sub-task's text.
    assert run.output == f"{router['result']}\n\n{child['result']}"
    assert run.finished_at is not None
    assert run.finished_at >= when(child["finished_at"])
    reads = [r for r in sim.requests("xpander") if r["path"].endswith(f"/v1/tasks/{child['id']}")]
    assert reads, "the sub-task's own record was checked"
