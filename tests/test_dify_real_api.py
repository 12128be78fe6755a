"""Dify runs end to end through the watcher, against the simulator that now behaves as Dify's
source does: history shows no answer until the reply ends, New Agent closes with the whole
answer, text may arrive as message_file, Chatflows settle at workflow_finished."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async

from runs.models import Channel, Run, RunEvent, Status
from runs.providers.base import Finished, ProviderConfig
from runs.providers.dify import DifyProvider
from runs.watcher.watcher import Watcher
from simulators.dify import answer_text, topic_of
from tests.conftest import SIM_BASE, sim_account

pytestmark = pytest.mark.django_db(transaction=True)

CHAT, NEW_AGENT, CHATFLOW = "sim-acme-dify", "sim-newagent-acme", "sim-chatflow-acme"


async def launch(acme: Any, sim: Any, bob: Any, prompt: str, key: str = CHAT) -> Run:
    account = await sync_to_async(sim_account)(acme, sim, "dify")
    account.api_key = key
    account.options = {"poll_interval": 0.1}
    await account.asave()
    return await sync_to_async(Run.objects.launch)(
        account=account,
        user=bob,
        prompt=f"{uuid.uuid4().hex[:6]} {prompt}",
        options={},
        timeout_seconds=600,
    )


def full_answer(run: Run, chunks: int) -> str:
    """The simulator's answer for this prompt (deterministic), as Dify would save it."""
    return answer_text(topic_of(run.prompt), chunks).strip()


async def wait_for(run: Run, check: Callable[[Run], bool], timeout: float = 20.0) -> Run:
    """Wait for a real condition on the stored run (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await run.arefresh_from_db()
        if check(run):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run.pk} never got there: {run.status} {run.provider_status!r}")


async def kinds(run: Run) -> list[str]:
    return [k async for k in run.events.values_list("kind", flat=True)]


async def test_it_keeps_a_run_whose_stream_dropped_running_until_dify_saves_the_answer(
    acme, sim, bob
):
    # Dropped after 3 s; Dify goes on for 3 s more, its history showing answer "" all along.
    # (The old follow() took three unchanged polls as the end: COMPLETED with 0 characters.)
    run = await launch(acme, sim, bob, "tides sim:duration=6 sim:chunks=24 sim:drop_stream")
    session = asyncio.create_task(Watcher().watch(run.pk))
    await wait_for(run, lambda r: r.provider_status == "generating")
    assert run.status == Status.RUNNING
    assert RunEvent.Kind.STREAM_LOST in await kinds(run)
    refs = run.provider_refs
    async with httpx.AsyncClient(
        base_url=sim.url + SIM_BASE["dify"], headers={"Authorization": f"Bearer {CHAT}"}
    ) as client:
        page = await client.get(
            "/messages", params={"conversation_id": refs["conversation_id"], "user": refs["user"]}
        )
    assert (page.json()["data"][-1]["answer"], page.json()["data"][-1]["status"]) == ("", "normal")
    assert run.output  # the streamed half is shown meanwhile

    await asyncio.wait_for(session, 30)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output == full_answer(run, 24)


async def test_it_stops_a_run_followed_through_history(acme, sim, bob):
    run = await launch(acme, sim, bob, "long sim:duration=8 sim:chunks=16 sim:drop_stream")
    session = asyncio.create_task(Watcher().watch(run.pk))
    await wait_for(run, lambda r: r.provider_status == "generating")
    await run.astop(actor=bob, channel=Channel.BUTTON)
    await asyncio.wait_for(session, 20)
    await run.arefresh_from_db()
    # Dify saves the partial text at the stop; history shows it and that ends the run.
    assert run.status == Status.STOPPED
    assert run.output
    assert full_answer(run, 16).startswith(run.output)


async def test_it_takes_a_new_agents_answer_once(acme, sim, bob):
    run = await launch(acme, sim, bob, "commute sim:duration=0.6 sim:chunks=6", key=NEW_AGENT)
    await asyncio.wait_for(Watcher().watch(run.pk), 20)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output == full_answer(run, 6)  # the closing message replaced, not appended


async def test_it_keeps_all_text_sent_as_message_file(acme, sim, bob):
    run = await launch(acme, sim, bob, "vision sim:message_file sim:duration=0.6 sim:chunks=6")
    await asyncio.wait_for(Watcher().watch(run.pk), 20)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output == full_answer(run, 6)


async def test_it_takes_a_new_agents_closing_message_file_as_the_answer(acme, sim, bob):
    prompt = "chart sim:message_file sim:duration=0.6 sim:chunks=6"
    run = await launch(acme, sim, bob, prompt, key=NEW_AGENT)
    await asyncio.wait_for(Watcher().watch(run.pk), 20)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output == full_answer(run, 6)


async def test_it_completes_a_chatflow_run(acme, sim, bob):
    run = await launch(acme, sim, bob, "memo sim:duration=0.6 sim:chunks=6", key=CHATFLOW)
    await asyncio.wait_for(Watcher().watch(run.pk), 20)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output == full_answer(run, 6)
    assert run.provider_status == "workflow_finished:succeeded"


@pytest.mark.parametrize("directive", ["", "sim:stop=abort"])
async def test_it_stops_a_chatflow_run(acme, sim, bob, directive):
    # Either path of Dify's stop race: workflow_finished stopped, or failed "Aborted: …".
    run = await launch(acme, sim, bob, f"long flow {directive} sim:duration=20", key=CHATFLOW)
    session = asyncio.create_task(Watcher().watch(run.pk))
    await wait_for(run, lambda r: r.status == Status.RUNNING and len(r.output) > 10)
    await run.astop(actor=bob, channel=Channel.BUTTON, reason="enough")
    await asyncio.wait_for(session, 10)
    await run.arefresh_from_db()
    assert run.status == Status.STOPPED
    assert run.output
    assert "stream" in run.stop_confirmation


async def test_it_fails_a_chatflow_whose_run_never_started_without_waiting_for_dify(acme, sim, bob):
    # Dify keeps this stream open for 300 s (dify #37197): the client closes it itself.
    run = await launch(acme, sim, bob, "broken flow sim:fail=prerun", key=CHATFLOW)
    await asyncio.wait_for(Watcher().watch(run.pk), 10)
    await run.arefresh_from_db()
    assert run.status == Status.FAILED
    assert run.error == "Dify reported an error: query is required"


@pytest.mark.parametrize("key", [CHAT, "sim-agent-acme", NEW_AGENT, CHATFLOW])
async def test_it_reports_difys_usage_on_the_finished_event(sim, key):
    # The watcher does not save usage yet: asserted where the client hands it over.
    provider = DifyProvider(
        ProviderConfig(base_url=sim.url + SIM_BASE["dify"], api_key=key, allow_private=True)
    )
    query = f"usage {uuid.uuid4().hex[:6]} sim:duration=0.3 sim:chunks=4"
    try:
        events = [e async for e in provider.run(query, {})]
    finally:
        await provider.aclose()
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.status == "completed"
    usage = finished.usage
    assert usage is not None
    assert usage.prompt_tokens == len(query) // 4
    assert usage.completion_tokens == len(answer_text(topic_of(query), 4)) // 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.currency == "USD"
    assert usage.price is not None
    assert float(usage.price) > 0
