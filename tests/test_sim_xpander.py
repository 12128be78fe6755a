"""The xpander.ai Agent Gateway simulator, over real HTTP (shared/providers/xpander.md §6)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

AGENT = "47c3a1de-agent"
KEY = "sim-xpander-test"
HEADERS = {"x-api-key": KEY}


@pytest.fixture
def base(sim: Any) -> str:
    return f"{sim.url}/sim/xpander"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15, headers=HEADERS) as c:
        yield c


def invoke_url(base: str, *, plain: bool = False) -> str:
    return f"{base}/v1/agents/{AGENT}/{'' if plain else 'gateway/'}invoke/stream"


def conv_url(base: str, conversation_id: str, prefix: str = "gateway/conversations") -> str:
    return f"{base}/v1/agents/{AGENT}/{prefix}/{conversation_id}"


def body(text: str, conversation_id: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"input": {"text": text, "files": [], "user": {"id": "u1"}}}
    if conversation_id:
        payload["id"] = conversation_id
    return payload


async def events(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any] | None,
    on_event: Callable[[dict[str, Any], list[dict[str, Any]]], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:
    """Every TaskUpdateEvent of a stream, until the server closes it."""
    seen: list[dict[str, Any]] = []
    async with aconnect_sse(client, "POST", url, json=payload) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            event = json.loads(sse.data)
            seen.append(event)
            if on_event:
                await on_event(event, seen)
    return seen


def kinds(seen: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in seen]


def text_of(seen: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in seen if e["type"] == "chunk")


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_it_streams_a_turn_with_the_documented_events(
    sim: Any, base: str, client: httpx.AsyncClient
) -> None:
    seen = await events(
        client, invoke_url(base), body("Compare EU cloud providers sim:duration=0.3 sim:chunks=6")
    )

    assert kinds(seen) == ["connected", "task_created", "task_updated"] + ["chunk"] * 6 + [
        "task_finished"
    ]
    for event in seen:
        assert set(event) == {"type", "task_id", "organization_id", "time", "data"}
        assert event["time"].endswith("Z")
    assert seen[0]["task_id"] == ""  # a new conversation has no id yet (a string all the same)
    assert seen[0]["data"] is None
    conversation_id = seen[1]["task_id"]
    assert uuid.UUID(conversation_id).version == 4
    assert {e["task_id"] for e in seen[1:]} == {conversation_id}
    created, updated, finished = seen[1]["data"], seen[2]["data"], seen[-1]["data"]
    assert created["status"] == "pending"
    assert created["id"] == conversation_id
    assert created["agent_id"] == AGENT
    assert created["input"]["text"].startswith("Compare EU cloud providers")
    assert updated["status"] == "executing"
    assert updated["started_at"]
    assert finished["status"] == "completed"
    assert finished["is_manually_stopped"] is False
    assert finished["result"] == text_of(seen)
    assert "Compare EU cloud providers" in finished["result"]
    assert "sim:" not in finished["result"]
    assert finished["finished_at"]
    assert finished["created_at"]

    state = (await client.get(f"{conv_url(base, conversation_id)}/run-state")).json()
    assert state == {
        "conversation_id": conversation_id,
        "is_running": False,
        "is_steerable": False,
        "steer_target": "none",
        "active_child_id": None,
        "queue_depth": 0,
        "queued_messages": [],
        "execution_status": "completed",
        "conversation_state": "regular",
    }
    record = (await client.get(f"{base}/v1/tasks/{conversation_id}")).json()
    assert record["status"] == "completed"
    assert record["result"] == finished["result"]
    assert any(
        r["path"].endswith(f"/v1/agents/{AGENT}/gateway/invoke/stream") and r["method"] == "POST"
        for r in sim.requests("xpander")
    )

    # The plain Invoke stream continues the same conversation (same id, new turn).
    again = await events(
        client,
        invoke_url(base, plain=True),
        body("And in the US? sim:duration=0.2 sim:chunks=3", conversation_id),
    )
    assert again[1]["task_id"] == conversation_id
    assert again[-1]["data"]["status"] == "completed"
    record = (await client.get(f"{base}/v1/tasks/{conversation_id}")).json()
    assert record["input"]["text"].startswith("And in the US?")
    # The renamed Conversations family serves the same state.
    renamed = await client.get(f"{conv_url(base, conversation_id, 'conversations')}/run-state")
    assert renamed.json()["execution_status"] == "completed"


async def test_it_refuses_any_key_but_a_sim_x_api_key(base: str) -> None:
    payload = body("hello sim:duration=0.1")
    async with httpx.AsyncClient(timeout=10) as anonymous:
        for headers in (
            {},
            {"x-api-key": "sk-real-looking"},
            {"Authorization": f"Bearer {KEY}"},  # API keys are never accepted as Bearer
        ):
            response = await anonymous.post(invoke_url(base), json=payload, headers=headers)
            assert response.status_code == 401
            assert response.json() == {"detail": "Unauthorized"}
        response = await anonymous.get(f"{conv_url(base, 'x')}/run-state")
        assert response.status_code == 401


async def test_it_validates_bodies_like_fastapi(base: str, client: httpx.AsyncClient) -> None:
    url = invoke_url(base)

    async def detail(payload: Any = None, content: bytes | None = None) -> list[dict[str, Any]]:
        response = await client.post(url, json=payload, content=content)
        assert response.status_code == 422
        return response.json()["detail"]

    assert await detail({"input": {"text": "", "files": []}}) == [
        {
            "loc": ["body", "input"],
            "msg": "Value error, input.text or input.files is required",
            "type": "value_error",
        }
    ]
    assert await detail({}) == [
        {"loc": ["body", "input"], "msg": "Field required", "type": "missing"}
    ]
    errors = await detail({"input": {"text": 5, "files": "a.pdf"}, "output_format": "xml"})
    assert {tuple(e["loc"]): e["type"] for e in errors} == {
        ("body", "input", "text"): "string_type",
        ("body", "input", "files"): "list_type",
        ("body", "output_format"): "enum",
    }
    assert (await detail(content=b"{not json"))[0]["type"] == "json_invalid"
    assert (await detail(content=b""))[0] == {
        "loc": ["body"],
        "msg": "Field required",
        "type": "missing",
    }

    # Files alone are a valid message.
    seen = await events(
        client,
        url,
        {"input": {"text": "sim:duration=0.1 sim:chunks=2", "files": ["https://x.test/a.pdf"]}},
    )
    assert seen[-1]["data"]["status"] == "completed"
    stop = f"{conv_url(base, seen[1]['task_id'])}/stop"

    response = await client.post(stop)  # the stop body is required
    assert response.status_code == 422
    assert response.json() == {
        "detail": [{"loc": ["body"], "msg": "Field required", "type": "missing"}]
    }
    response = await client.post(stop, json={"clear_queue": "maybe"})
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            {
                "loc": ["body", "clear_queue"],
                "msg": "Input should be a valid boolean",
                "type": "bool_parsing",
            }
        ]
    }
    response = await client.post(
        f"{conv_url(base, seen[1]['task_id'])}/messages", json={"text": "x", "mode": "later"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "mode"]
    assert response.json()["detail"][0]["type"] == "enum"


async def test_it_stops_a_running_turn_and_keeps_the_partial_text(
    sim: Any, base: str, client: httpx.AsyncClient
) -> None:
    stop: dict[str, Any] = {}

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and kinds(seen).count("chunk") == 3:
            stop["sent"] = time.monotonic()
            url = f"{conv_url(base, event['task_id'])}/stop"
            stop["response"] = await client.post(url, json={"clear_queue": True})
        if event["type"] == "task_finished":
            stop["finished"] = time.monotonic()

    seen = await events(
        client, invoke_url(base), body("Long report sim:duration=10 sim:chunks=100"), on_event
    )

    conversation_id = seen[1]["task_id"]
    response = stop["response"]
    assert response.status_code == 200
    assert response.json() == {
        "conversation_id": conversation_id,
        "stopped": True,
        "cleared_queue": True,
        "queue_depth": 0,
    }
    # Ended early (100 chunks were due), with the stop's own terminal event.
    assert kinds(seen).count("chunk") < 100
    assert seen[-1]["type"] == "task_finished"  # and then the stream closed
    finished = seen[-1]["data"]
    assert finished["status"] == "stopped"
    assert finished["is_manually_stopped"] is True
    assert finished["result"] == text_of(seen)
    assert 3 <= kinds(seen).count("chunk") < 100

    state = (await client.get(f"{conv_url(base, conversation_id)}/run-state")).json()
    assert state["is_running"] is False
    assert state["execution_status"] == "stopped"
    record = (await client.get(f"{base}/v1/tasks/{conversation_id}")).json()
    assert record["status"] == "stopped"
    assert record["result"] == finished["result"]
    assert len(sim.stop_calls(conversation_id, "xpander")) == 1

    # Stopping again is an idempotent no-op; unknown conversations are 404.
    again = await client.post(f"{conv_url(base, conversation_id)}/stop", json={})
    assert again.status_code == 200
    assert again.json() == {
        "conversation_id": conversation_id,
        "stopped": False,
        "cleared_queue": False,
        "queue_depth": 0,
    }
    unknown = conv_url(base, str(uuid.uuid4()))
    for response in (
        await client.post(f"{unknown}/stop", json={}),
        await client.get(f"{unknown}/run-state"),
    ):
        assert response.status_code == 404
        assert response.json() == {"detail": "Conversation not found"}
    response = await client.get(f"{base}/v1/tasks/{uuid.uuid4()}")
    assert response.status_code == 404
    # Another key cannot see (or stop) this conversation.
    async with httpx.AsyncClient(timeout=10, headers={"x-api-key": "sim-other"}) as other:
        response = await other.post(f"{conv_url(base, conversation_id)}/stop", json={})
        assert response.status_code == 404


async def test_it_drains_queued_follow_ups_on_the_same_stream(
    base: str, client: httpx.AsyncClient
) -> None:
    answers: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "task_updated" and not answers:
            url = f"{conv_url(base, event['task_id'])}/messages"
            follow_up = {
                "text": "and prices? sim:duration=0.2 sim:chunks=2",
                "idempotency_key": "k1",
            }
            answers.append((await client.post(url, json=follow_up)).json())
            answers.append((await client.post(url, json=follow_up)).json())  # a retry
            state = (await client.get(f"{conv_url(base, event['task_id'])}/run-state")).json()
            answers.append(state)

    seen = await events(
        client, invoke_url(base), body("Compare vendors sim:duration=0.5 sim:chunks=4"), on_event
    )

    queued, retry, state = answers
    assert queued["action"] == "queued"
    assert queued["queue_depth"] == 1
    assert queued["message_id"].startswith("q_")
    assert retry == queued  # de-duplicated by the idempotency key
    assert state["is_running"] is True
    assert state["is_steerable"] is True
    assert state["queue_depth"] == 1
    (message,) = state["queued_messages"]
    assert message["id"] == queued["message_id"]
    assert message["idempotency_key"] == "k1"
    assert message["enqueued_at"].endswith("Z")
    assert set(message) == {"id", "text", "files", "user", "enqueued_at", "idempotency_key"}

    assert kinds(seen) == (
        ["connected", "task_created", "task_updated"]
        + ["chunk"] * 4
        + ["task_finished", "task_created", "task_updated"]
        + ["chunk"] * 2
        + ["task_finished"]
    )
    first, second = seen[7]["data"], seen[-1]["data"]
    assert first["status"] == second["status"] == "completed"
    assert second["input"]["text"].startswith("and prices?")
    conversation_id = seen[1]["task_id"]
    state = (await client.get(f"{conv_url(base, conversation_id)}/run-state")).json()
    assert state["queue_depth"] == 0
    assert state["is_running"] is False

    # Idle: `auto` does not enqueue, the caller runs the turn itself.
    response = await client.post(f"{conv_url(base, conversation_id)}/messages", json={"text": "x"})
    assert response.json() == {
        "action": "started",
        "message_id": None,
        "queue_depth": 0,
        "steer_target": None,
    }


async def test_it_keeps_the_queue_after_a_stop_and_drains_it_on_request(
    base: str, client: httpx.AsyncClient
) -> None:
    stop: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and not stop:
            url = conv_url(base, event["task_id"])
            for text in ("first sim:duration=0.2 sim:chunks=2", "second sim:duration=0.2"):
                await client.post(f"{url}/messages", json={"text": text, "mode": "queue"})
            stop.append((await client.post(f"{url}/stop", json={"clear_queue": False})).json())

    seen = await events(
        client, invoke_url(base), body("Main sim:duration=5 sim:chunks=50"), on_event
    )

    assert stop[0]["stopped"] is True
    assert stop[0]["queue_depth"] == 2
    assert stop[0]["cleared_queue"] is False
    assert kinds(seen).count("task_created") == 1  # nothing was started after the stop
    assert seen[-1]["data"]["status"] == "stopped"
    url = conv_url(base, seen[1]["task_id"])
    state = (await client.get(f"{url}/run-state")).json()
    assert state["is_running"] is False
    assert state["queue_depth"] == 2

    # Cancel one queued message, then drain the rest.
    second = state["queued_messages"][1]["id"]
    response = await client.delete(f"{url}/queue/{second}")
    assert response.status_code == 200
    assert response.json()["queue_depth"] == 1
    assert (await client.delete(f"{url}/queue/{second}")).status_code == 404
    drained = await events(client, f"{url}/drain/stream", None)
    assert kinds(drained)[:2] == ["connected", "task_created"]
    assert drained[-1]["data"]["status"] == "completed"
    assert drained[-1]["data"]["input"]["text"].startswith("first")
    # Nothing left: a drain is a bare `connected`.
    assert kinds(await events(client, f"{url}/drain/stream", None)) == ["connected"]

    await client.post(f"{url}/messages", json={"text": "later", "mode": "queue"})
    assert (await client.delete(f"{url}/queue")).json() == {"cleared": 1}
    assert (await client.get(f"{url}/run-state")).json()["queue_depth"] == 0


async def test_it_steers_a_running_turn(base: str, client: httpx.AsyncClient) -> None:
    answers: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and not answers:
            url = f"{conv_url(base, event['task_id'])}/messages"
            answers.append(
                (await client.post(url, json={"text": "shorter", "mode": "steer"})).json()
            )

    seen = await events(
        client, invoke_url(base), body("Essay sim:duration=0.6 sim:chunks=6"), on_event
    )
    assert answers[0]["action"] == "steered"
    assert answers[0]["steer_target"] == "router"
    steer = next(e for e in seen if e["type"] == "gateway_steer_applied")
    assert steer["data"]["text"] == "shorter"
    assert seen[-1]["data"]["status"] == "completed"


async def test_it_preempts_the_running_turn_when_a_new_turn_starts(
    base: str, client: httpx.AsyncClient
) -> None:
    started = asyncio.Event()
    ids: list[str] = []

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and not started.is_set():
            ids.append(event["task_id"])
            started.set()

    old = asyncio.create_task(
        events(client, invoke_url(base), body("Old sim:duration=10 sim:chunks=100"), on_event)
    )
    await asyncio.wait_for(started.wait(), 10)
    new = await events(client, invoke_url(base), body("New sim:duration=0.2 sim:chunks=2", ids[0]))
    old_seen = await asyncio.wait_for(old, 5)

    assert old_seen[-1]["type"] == "task_finished"
    assert old_seen[-1]["data"]["status"] == "stopped"
    assert old_seen[-1]["data"]["result"] == text_of(old_seen)
    assert new[1]["task_id"] == ids[0]
    assert new[-1]["data"]["status"] == "completed"


async def test_it_lets_a_turn_ignore_stops_with_sim_stop_ignore(
    base: str, client: httpx.AsyncClient
) -> None:
    after_stop: list[Any] = []

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and not after_stop:
            url = conv_url(base, event["task_id"])
            after_stop.append((await client.post(f"{url}/stop", json={})).json())
            after_stop.append((await client.get(f"{url}/run-state")).json())

    seen = await events(
        client,
        invoke_url(base),
        body("Stubborn sim:stop=ignore sim:duration=0.8 sim:chunks=8"),
        on_event,
    )
    answer, state = after_stop
    assert answer["stopped"] is True
    assert state["is_running"] is True
    assert state["execution_status"] == "executing"
    assert kinds(seen).count("chunk") == 8
    assert seen[-1]["data"]["status"] == "completed"
    assert seen[-1]["data"]["is_manually_stopped"] is False


async def test_it_stops_late_with_sim_stop_slow(base: str, client: httpx.AsyncClient) -> None:
    marks: dict[str, Any] = {}

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and "sent" not in marks:
            url = conv_url(base, event["task_id"])
            marks["sent"] = time.monotonic()
            marks["answer"] = (await client.post(f"{url}/stop", json={})).json()
            marks["state"] = (await client.get(f"{url}/run-state")).json()
        if event["type"] == "task_finished":
            marks["finished"] = time.monotonic()

    seen = await events(
        client,
        invoke_url(base),
        body("Slow sim:stop=slow sim:stop_delay=3 sim:duration=20 sim:chunks=200"),
        on_event,
    )
    assert marks["answer"]["stopped"] is True
    assert marks["state"]["is_running"] is True
    # Only a lower bound: "late" is provable on a busy machine, "on time" is not.
    assert marks["finished"] - marks["sent"] >= 2.5
    assert seen[-1]["data"]["status"] == "stopped"


async def test_it_drops_the_stream_but_keeps_generating_with_sim_drop_stream(
    base: str, client: httpx.AsyncClient
) -> None:
    seen = await events(
        client, invoke_url(base), body("Flaky sim:drop_stream sim:duration=1 sim:chunks=10")
    )
    assert "task_finished" not in kinds(seen)
    assert kinds(seen).count("chunk") == 5
    url = conv_url(base, seen[1]["task_id"])
    state = (await client.get(f"{url}/run-state")).json()
    assert state["is_running"] is True
    assert state["execution_status"] == "executing"

    async def finished() -> bool:
        return not (await client.get(f"{url}/run-state")).json()["is_running"]

    await wait_for(finished)
    state = (await client.get(f"{url}/run-state")).json()
    assert state["execution_status"] == "completed"
    record = (await client.get(f"{base}/v1/tasks/{seen[1]['task_id']}")).json()
    assert record["status"] == "completed"
    assert record["result"].startswith(text_of(seen))
    assert len(record["result"]) > len(text_of(seen))


async def test_it_fails_mid_stream_with_sim_fail_error(
    base: str, client: httpx.AsyncClient
) -> None:
    seen = await events(
        client, invoke_url(base), body("Doomed sim:fail=error sim:duration=0.4 sim:chunks=6")
    )
    assert kinds(seen).count("chunk") == 3
    assert seen[-1]["type"] == "task_finished"
    assert seen[-1]["data"]["status"] == "failed"
    assert "failure" in seen[-1]["data"]["result"]


@pytest.mark.parametrize(("kind", "status"), [("rate_limit", 429), ("server_error", 500)])
async def test_it_fails_the_first_three_calls_with_sim_fail(
    base: str, client: httpx.AsyncClient, kind: str, status: int
) -> None:
    payload = body(f"Busy {uuid.uuid4()} sim:fail={kind} sim:duration=0.2 sim:chunks=2")
    for _ in range(3):
        response = await client.post(invoke_url(base), json=payload)
        assert response.status_code == status
        assert isinstance(response.json()["detail"], str)
        if status == 429:
            assert response.headers["retry-after"] == "1"
    seen = await events(client, invoke_url(base), payload)
    assert seen[-1]["data"]["status"] == "completed"


async def test_it_limits_free_keys_to_100_requests_a_minute(base: str) -> None:
    headers = {"x-api-key": f"sim-free-{uuid.uuid4().hex}"}
    url = f"{conv_url(base, 'nope')}/run-state"
    async with httpx.AsyncClient(timeout=10, headers=headers) as free:
        for _ in range(100):
            assert (await free.get(url)).status_code == 404
        response = await free.get(url)
        assert response.status_code == 429
        assert response.json() == {"detail": "Rate limit exceeded"}
        assert int(response.headers["retry-after"]) >= 1


async def test_it_answers_unknown_routes_and_methods_like_fastapi(
    base: str, client: httpx.AsyncClient
) -> None:
    response = await client.get(f"{base}/v1/nothing/here")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    response = await client.get(invoke_url(base))
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}


# --- Sub-tasks (sim:subtask) ------------------------------------------------------------------


def child_id_of(seen: list[dict[str, Any]]) -> str:
    return next(e["data"]["id"] for e in seen if e["type"] == "sub_task_created")


async def test_it_runs_an_async_sub_task_on_after_the_routers_task_finished(
    base: str, client: httpx.AsyncClient
) -> None:
    states: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "task_finished":
            # Only the sub-task is working now: what run-state and the records say.
            router, child = event["task_id"], event["data"]["sub_executions"][0]
            states.append((await client.get(f"{conv_url(base, router)}/run-state")).json())
            records.append((await client.get(f"{base}/v1/tasks/{child}")).json())

    seen = await events(
        client,
        invoke_url(base),
        body("Audit supplier contracts sim:subtask=async sim:duration=0.4 sim:chunks=4"),
        on_event,
    )

    assert kinds(seen) == (
        ["connected", "task_created", "task_updated", "chunk", "chunk", "chunk"]
        + ["sub_agent_trigger", "sub_task_created", "task_finished", "sub_task_updated"]
        + ["chunk"] * 4
        + ["sub_task_finished"]
    )
    router, child = seen[1]["task_id"], child_id_of(seen)
    assert child != router
    # Lifecycle events carry the router's id with the sub-task as data; its text its own id.
    for index, event in enumerate(seen[1:], start=1):
        expected = child if event["type"] == "chunk" and index > 9 else router
        assert event["task_id"] == expected, event
    ack = "".join(e["data"] for e in seen[3:6])
    assert "worker agent" in ack
    trigger = seen[6]["data"]
    assert trigger["agent_id"] == f"{AGENT}-worker"
    assert trigger["query"].startswith("Audit supplier contracts")
    created, finished, updated, done = (seen[i]["data"] for i in (7, 8, 9, 14))
    assert created["status"] == "pending"
    assert created["parent_execution"] == router
    assert finished["id"] == router
    assert finished["status"] == "completed"
    assert finished["result"] == ack
    assert finished["parent_execution"] is None
    assert finished["sub_executions"] == [child]
    assert finished["finished_sub_executions"] == []
    assert updated["status"] == "executing"
    assert done["status"] == "completed"
    assert done["result"] == "".join(e["data"] for e in seen[10:14])
    assert "Audit supplier contracts" in done["result"]

    # While only the sub-task ran (our assumption): not `is_running`, but an active child.
    assert states[0]["is_running"] is False
    assert states[0]["active_child_id"] == child
    assert states[0]["execution_status"] == "completed"
    assert records[0]["parent_execution"] == router
    assert records[0]["status"] in ("pending", "executing")

    state = (await client.get(f"{conv_url(base, router)}/run-state")).json()
    assert (state["is_running"], state["active_child_id"]) == (False, None)
    record = (await client.get(f"{base}/v1/tasks/{child}")).json()
    assert record["status"] == "completed"
    assert record["result"] == done["result"]
    parent = (await client.get(f"{base}/v1/tasks/{router}")).json()
    assert parent["sub_executions"] == parent["finished_sub_executions"] == [child]


async def test_it_runs_a_sync_sub_task_inline_before_the_router_finishes(
    base: str, client: httpx.AsyncClient
) -> None:
    seen = await events(
        client, invoke_url(base), body("Inline sim:subtask=sync sim:duration=0.3 sim:chunks=3")
    )

    assert kinds(seen) == (
        ["connected", "task_created", "task_updated", "chunk", "chunk", "chunk"]
        + ["sub_agent_trigger", "sub_task_created", "sub_task_updated"]
        + ["chunk"] * 3
        + ["sub_task_finished", "task_finished"]
    )
    child = child_id_of(seen)
    assert [e["task_id"] for e in seen if e["type"] == "chunk"][3:] == [child] * 3
    finished = seen[-1]["data"]
    assert finished["status"] == "completed"
    assert finished["sub_executions"] == finished["finished_sub_executions"] == [child]


async def test_it_stops_an_async_sub_task_after_its_router_answered(
    sim: Any, base: str, client: httpx.AsyncClient
) -> None:
    stop: dict[str, Any] = {}

    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and event["task_id"] != seen[1]["task_id"] and not stop:
            url = f"{conv_url(base, seen[1]['task_id'])}/stop"
            stop["response"] = await client.post(url, json={"clear_queue": True})
            stop["state"] = (await client.get(url.replace("/stop", "/run-state"))).json()

    seen = await events(
        client, invoke_url(base), body("Long audit sim:subtask=async sim:duration=20"), on_event
    )

    router, child = seen[1]["task_id"], child_id_of(seen)
    assert stop["response"].json()["stopped"] is True
    # Confirmed by the time the call returned: nothing runs, no child is active.
    assert (stop["state"]["is_running"], stop["state"]["active_child_id"]) == (False, None)
    assert seen[-1]["type"] == "sub_task_finished"  # then the stream closed
    assert seen[-1]["task_id"] == router
    assert seen[-1]["data"]["status"] == "stopped"
    assert seen[-1]["data"]["is_manually_stopped"] is True
    record = (await client.get(f"{base}/v1/tasks/{child}")).json()
    assert record["status"] == "stopped"
    assert record["result"] == "".join(
        e["data"] for e in seen if e["type"] == "chunk" and e["task_id"] == child
    )
    # The router had answered before the stop: its own record is unchanged.
    assert (await client.get(f"{base}/v1/tasks/{router}")).json()["status"] == "completed"
    assert len(sim.stop_calls(router, "xpander")) == 1


async def test_it_stops_the_router_and_its_sub_task_together(
    base: str, client: httpx.AsyncClient
) -> None:
    async def on_event(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "sub_task_updated":
            url = f"{conv_url(base, seen[1]['task_id'])}/stop"
            assert (await client.post(url, json={"clear_queue": True})).status_code == 200

    seen = await events(
        client, invoke_url(base), body("Inline sim:subtask=sync sim:duration=20"), on_event
    )

    assert kinds(seen)[-2:] == ["sub_task_finished", "task_finished"]
    assert seen[-2]["data"]["status"] == seen[-1]["data"]["status"] == "stopped"
    assert seen[-1]["data"]["is_manually_stopped"] is True


async def test_it_drops_the_stream_while_the_sub_task_works(
    base: str, client: httpx.AsyncClient
) -> None:
    seen = await events(
        client,
        invoke_url(base),
        body("Flaky sim:subtask=async sim:drop_stream sim:duration=1 sim:chunks=10"),
    )

    router, child = seen[1]["task_id"], child_id_of(seen)
    assert "task_finished" in kinds(seen)
    assert "sub_task_finished" not in kinds(seen)
    assert [e["task_id"] for e in seen if e["type"] == "chunk"][3:] == [child] * 5
    state = (await client.get(f"{conv_url(base, router)}/run-state")).json()
    assert (state["is_running"], state["active_child_id"]) == (False, child)

    async def child_done() -> bool:
        record = (await client.get(f"{base}/v1/tasks/{child}")).json()
        return bool(record["status"] == "completed")

    await wait_for(child_done)
    state = (await client.get(f"{conv_url(base, router)}/run-state")).json()
    assert state["active_child_id"] is None
    parent = (await client.get(f"{base}/v1/tasks/{router}")).json()
    assert parent["finished_sub_executions"] == [child]


async def test_it_fails_only_the_sub_task_with_sim_fail_subtask(
    base: str, client: httpx.AsyncClient
) -> None:
    seen = await events(
        client,
        invoke_url(base),
        body("Doomed sim:subtask=async sim:fail=subtask sim:duration=0.4 sim:chunks=4"),
    )
    assert seen[-1]["type"] == "sub_task_finished"
    assert seen[-1]["data"]["status"] == "failed"
    assert next(e for e in seen if e["type"] == "task_finished")["data"]["status"] == "completed"


# --- The official SDK's event model -------------------------------------------------------------

# xpander-ai/xpander-sdk, src/xpander_sdk/modules/tasks/sub_modules/task.py (v2.0.266):
#     class TaskUpdateEvent(XPanderSharedModel):   # a plain pydantic BaseModel
#         type: TaskUpdateEventType
#         task_id: str
#         organization_id: str
#         time: datetime
#         data: Any
# Every field is required and none is Optional: `"task_id": null` fails `string_type`, and
# `Task.aevents()` lets that error end the iteration. pydantic is not installed here, so the
# same checks are made by hand. The values of TaskUpdateEventType are the newer
# src/xpander_sdk/models/events.py (the one with `connected` and the sub-task events).
SDK_EVENT_TYPES = {
    "connected",
    "task_created",
    "task_updated",
    "task_finished",
    "chunk",
    "auth_event",
    "tool_call_request",
    "tool_call_result",
    "sub_agent_trigger",
    "think",
    "analyze",
    "plan_updated",
    "task_compactization",
    "context_status",
    "agent_gateway_decision",
    "gateway_steer_applied",
    "ask_user_questions",
    "sub_task_created",
    "sub_task_updated",
    "sub_task_finished",
    "invite_member",
    "member_invited",
    "ask_for_secret",
    "secret_saved",
    "live_surface_created",
    "inline_card",
}
# AgentExecutionStatus (src/xpander_sdk/modules/tasks/models/task.py).
SDK_STATUSES = {"pending", "executing", "paused", "error", "failed", "completed", "stopped"}


def sdk_datetime(value: Any) -> bool:
    # pydantic's datetime accepts ISO 8601 with a "Z"; so does fromisoformat since 3.11.
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def sdk_event_errors(event: dict[str, Any]) -> list[str]:
    """What the SDK's TaskUpdateEvent (and, for task events, its Task) would reject."""
    errors = [f"{name}: missing" for name in SDK_FIELDS if name not in event]
    if event.get("type") not in SDK_EVENT_TYPES:
        errors.append(f"type: {event.get('type')!r} is not a TaskUpdateEventType")
    for name in ("task_id", "organization_id"):
        if name in event and not isinstance(event[name], str):
            errors.append(f"{name}: {event[name]!r} is not a string")
    if "time" in event and not sdk_datetime(event["time"]):
        errors.append(f"time: {event['time']!r} is not a datetime")
    if str(event.get("type")).startswith(("task_", "sub_task_")):
        # Task: id, agent_id, organization_id: str; input; created_at: datetime (required).
        task = event.get("data")
        if not isinstance(task, dict):
            return [*errors, "data: not a Task"]
        for name in ("id", "agent_id", "organization_id"):
            if not isinstance(task.get(name), str):
                errors.append(f"data.{name}: {task.get(name)!r} is not a string")
        if not isinstance(task.get("input"), dict):
            errors.append("data.input: missing")
        if not sdk_datetime(task.get("created_at")):
            errors.append("data.created_at: not a datetime")
        if task.get("status") not in SDK_STATUSES:
            errors.append(f"data.status: {task.get('status')!r}")
        if not isinstance(task.get("parent_execution"), str | None):
            errors.append("data.parent_execution: not a string or null")
        if not all(isinstance(s, str) for s in task.get("sub_executions") or []):
            errors.append("data.sub_executions: not a list of strings")
    return errors


SDK_FIELDS = ("type", "task_id", "organization_id", "time", "data")


def test_it_checks_events_the_way_the_sdk_model_does() -> None:
    # The check itself rejects what the SDK rejects (our old `connected`), or it proves nothing.
    ok = {"type": "chunk", "task_id": "", "organization_id": "o", "time": "2026-03-23T00:46:03Z"}
    assert sdk_event_errors({**ok, "data": "x"}) == []
    assert sdk_event_errors({**ok, "type": "connected", "task_id": None, "data": None}) == [
        "task_id: None is not a string"
    ]
    assert sdk_event_errors(ok) == ["data: missing"]
    assert sdk_event_errors({**ok, "data": "x", "type": "content_chunk"})
    assert sdk_event_errors({**ok, "data": "x", "time": "yesterday"})


async def test_it_streams_only_events_the_sdk_model_accepts(
    base: str, client: httpx.AsyncClient
) -> None:
    streams = [
        await events(client, invoke_url(base), body("Plain sim:duration=0.2 sim:chunks=2")),
        await events(client, invoke_url(base), body("A sim:subtask=async sim:duration=0.2")),
        await events(client, invoke_url(base), body("S sim:subtask=sync sim:duration=0.2")),
        await events(client, invoke_url(base), body("F sim:fail=error sim:duration=0.2")),
    ]
    conversation_id = streams[0][1]["task_id"]

    async def steer_then_stop(event: dict[str, Any], seen: list[dict[str, Any]]) -> None:
        if event["type"] == "chunk" and kinds(seen).count("chunk") == 1:
            url = conv_url(base, conversation_id)
            await client.post(f"{url}/messages", json={"text": "shorter", "mode": "steer"})
            await client.post(f"{url}/stop", json={"clear_queue": True})

    # Continuing a conversation: `connected` carries its id.
    continued = await events(
        client,
        invoke_url(base),
        body("More sim:subtask=async sim:duration=20", conversation_id),
        steer_then_stop,
    )
    assert continued[0]["type"] == "connected"
    assert continued[0]["task_id"] == conversation_id
    assert "gateway_steer_applied" in kinds(continued)
    assert streams[0][0]["task_id"] == ""  # a new conversation: no id yet, still a string
    drained = await events(client, f"{conv_url(base, conversation_id)}/drain/stream", None)
    assert kinds(drained) == ["connected"]

    for seen in [*streams, continued, drained]:
        for event in seen:
            assert sdk_event_errors(event) == [], event
