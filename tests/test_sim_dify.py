"""The Dify simulator over real HTTP: stream events, stop semantics, history, faults."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

KEY = "sim-acme-dify"
AUTH = {"Authorization": f"Bearer {KEY}"}
USAGE_FIELDS = {
    "prompt_tokens",
    "prompt_unit_price",
    "prompt_price_unit",
    "prompt_price",
    "completion_tokens",
    "completion_unit_price",
    "completion_price_unit",
    "completion_price",
    "total_tokens",
    "total_price",
    "currency",
    "latency",
}


@pytest.fixture
async def api(sim: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"{sim.url}/sim/dify/v1", headers=AUTH, timeout=15
    ) as client:
        yield client


def body(query: str, user: str = "alice", **extra: Any) -> dict[str, Any]:
    return {"query": query, "inputs": {}, "user": user, "response_mode": "streaming", **extra}


def unique(words: str) -> str:
    """Fault counts are kept per (key, user, query): every test gets its own query."""
    return f"{words} {uuid.uuid4().hex[:8]}"


async def events_of(api: httpx.AsyncClient, payload: dict[str, Any], **kw: Any) -> list[Any]:
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload, **kw) as source:
        assert source.response.status_code == 200
        return [sse async for sse in source.aiter_sse()]


def data(events: list[Any], name: str | None = None) -> list[dict[str, Any]]:
    parsed = [json.loads(e.data) for e in events if e.event != "ping"]
    return [p for p in parsed if name is None or p["event"] == name]


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> Any:
    """Poll a real condition until it holds (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def history(api: httpx.AsyncClient, conversation_id: str, user: str = "alice") -> Any:
    r = await api.get("/messages", params={"conversation_id": conversation_id, "user": user})
    assert r.status_code == 200, r.text
    return r.json()


async def stop(api: httpx.AsyncClient, task_id: str, user: str = "alice") -> httpx.Response:
    return await api.post(f"/chat-messages/{task_id}/stop", json={"user": user})


# --- streaming -------------------------------------------------------------------------------


async def test_it_streams_message_deltas_then_message_end(api, sim):
    async with aconnect_sse(
        api, "POST", "/chat-messages", json=body("Quantum computing sim:duration=0.5")
    ) as source:
        response = source.response
        events = [sse async for sse in source.aiter_sse()]
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"

    parsed = data(events)
    deltas, end = parsed[:-1], parsed[-1]
    assert len(deltas) == 8  # round(0.5 * 15)
    assert {d["event"] for d in deltas} == {"message"}
    first = deltas[0]
    for field in ("task_id", "message_id", "conversation_id"):
        uuid.UUID(first[field])
    assert first["id"] == first["message_id"]
    for event in parsed:
        for field in ("task_id", "id", "message_id", "conversation_id", "created_at"):
            assert event[field] == first[field]
    assert end["event"] == "message_end"
    assert set(end["metadata"]["usage"]) == USAGE_FIELDS
    assert end["metadata"]["usage"]["currency"] == "USD"
    answer = "".join(d["answer"] for d in deltas)
    assert answer.startswith("### Quantum computing\n\n")
    assert "sim:" not in answer
    assert len(answer) > 300
    assert any(r["path"].endswith("/chat-messages") for r in sim.requests("dify"))


async def test_it_writes_difys_wire_format_with_bare_pings(api):
    payload = body("Pings sim:duration=0.7 sim:chunks=3 sim:ping_interval=0.2")
    async with api.stream("POST", "/chat-messages", json=payload) as response:
        raw = "".join([text async for text in response.aiter_text()])
    blocks = raw.split("\n\n")
    assert blocks[-1] == ""
    blocks = blocks[:-1]
    assert all(b == "event: ping" or b.startswith("data: {") for b in blocks)
    assert blocks.count("event: ping") >= 2
    assert json.loads(blocks[-1].removeprefix("data: "))["event"] == "message_end"


async def test_it_answers_in_one_json_in_blocking_mode(api):
    r = await api.post("/chat-messages", json=body("Blocking sim:duration=0.2", response_mode=None))
    assert r.status_code == 200
    answer = r.json()
    assert answer["event"] == "message"
    assert answer["mode"] == "chat"
    assert answer["id"] == answer["message_id"]
    uuid.UUID(answer["task_id"])
    assert answer["answer"].startswith("### Blocking")
    assert set(answer["metadata"]["usage"]) == USAGE_FIELDS
    again = await api.post(
        "/chat-messages",
        json=body("Follow up sim:duration=0.1", response_mode="blocking")
        | {"conversation_id": answer["conversation_id"]},
    )
    assert again.json()["conversation_id"] == answer["conversation_id"]


async def test_it_waits_before_the_first_event_with_sim_delay(api):
    started = time.monotonic()
    async with aconnect_sse(
        api, "POST", "/chat-messages", json=body("Slow start sim:delay=0.6 sim:duration=0.1")
    ) as source:
        first = await anext(source.aiter_sse())
        assert time.monotonic() - started >= 0.55
        assert json.loads(first.data)["event"] == "message"


async def test_it_streams_agent_messages_for_agent_apps(api):
    agent = {"Authorization": "Bearer sim-agent-acme"}
    events = await events_of(api, body("Agent sim:duration=0.2"), headers=agent)
    assert {e["event"] for e in data(events)} == {"agent_message", "message_end"}
    r = await api.post(
        "/chat-messages", json=body("Agent", response_mode="blocking"), headers=agent
    )
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"
    info = await api.get("/info", headers=agent)
    assert info.json()["mode"] == "agent-chat"


# --- errors before the stream ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status", "message"),
    [
        (None, 401, "Authorization header must be provided and start with 'Bearer'"),
        ("Bearer", 401, "Authorization header must be provided and start with 'Bearer'"),
        ("Basic sim-acme-dify", 401, "Authorization scheme must be 'Bearer'"),
        ("Bearer app-not-a-sim-key", 401, "Access token is invalid"),
        ("Bearer sim-disabled-acme", 403, "The app's API service has been disabled."),
    ],
)
async def test_it_answers_auth_errors_with_difys_exact_bodies(sim, authorization, status, message):
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(base_url=f"{sim.url}/sim/dify/v1") as client:
        for call in (
            client.post("/chat-messages", json=body("x"), headers=headers),
            client.post("/chat-messages/abc/stop", json={"user": "alice"}, headers=headers),
            client.get("/messages", params={"conversation_id": str(uuid.uuid4())}, headers=headers),
            client.get("/info", headers=headers),
        ):
            r = await call
            code = "unauthorized" if status == 401 else "forbidden"
            assert (r.status_code, r.json()) == (
                status,
                {"code": code, "message": message, "status": status},
            )


@pytest.mark.parametrize(
    ("change", "status", "code", "message"),
    [
        ({"user": None}, 400, "invalid_param", "Arg user must be provided."),
        ({"user": ""}, 400, "invalid_param", "Arg user must be provided."),
        ({"query": ""}, 400, "invalid_param", "query is required"),
        ({"query": None}, 400, "invalid_param", "query is required"),
        ({"inputs": None}, 400, "invalid_param", "inputs is required"),
        ({"inputs": []}, 400, "invalid_param", "inputs must be an object"),
        (
            {"response_mode": "fast"},
            400,
            "invalid_param",
            "response_mode must be 'streaming' or 'blocking'",
        ),
        ({"conversation_id": "42"}, 400, "invalid_param", "conversation_id must be a valid UUID"),
        ({"conversation_id": str(uuid.uuid4())}, 404, "not_found", "Conversation Not Exists."),
    ],
)
async def test_it_validates_the_chat_request(api, change, status, code, message):
    payload = {k: v for k, v in (body("Validate me") | change).items() if v is not None}
    r = await api.post("/chat-messages", json=payload)
    assert (r.status_code, r.json()) == (
        status,
        {"code": code, "message": message, "status": status},
    )


async def test_it_hides_another_users_conversation(api):
    events = await events_of(api, body("Mine sim:duration=0.1"))
    conversation_id = data(events)[0]["conversation_id"]
    r = await api.post(
        "/chat-messages", json=body("Theirs", user="mallory", conversation_id=conversation_id)
    )
    assert r.status_code == 404
    assert r.json()["message"] == "Conversation Not Exists."
    r = await api.get("/messages", params={"conversation_id": conversation_id, "user": "mallory"})
    assert r.status_code == 404


async def test_it_refuses_bodies_that_are_not_json(api):
    r = await api.post("/chat-messages", content="query=x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"
    r = await api.post(
        "/chat-messages", content="{broken", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"


async def test_it_refuses_chat_routes_for_a_workflow_app(api):
    workflow = {"Authorization": "Bearer sim-workflow-acme"}
    for r in (
        await api.post("/chat-messages", json=body("x"), headers=workflow),
        await api.post("/chat-messages/abc/stop", json={"user": "alice"}, headers=workflow),
    ):
        assert r.status_code == 400
        assert r.json()["code"] == "not_chat_app"


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("rate_limit", 429, "too_many_requests"), ("server_error", 500, "internal_server_error")],
)
async def test_it_fails_the_first_three_calls_then_streams(api, kind, status, code):
    payload = body(unique(f"Flaky sim:fail={kind} sim:duration=0.1"))
    for _ in range(3):
        r = await api.post("/chat-messages", json=payload)
        assert r.status_code == status
        assert r.json()["code"] == code
        assert r.json()["status"] == status
        if kind == "rate_limit":
            assert r.headers["retry-after"] == "1"
    events = await events_of(api, payload)
    assert data(events)[-1]["event"] == "message_end"


async def test_it_refuses_quota_errors_every_time(api):
    for fail, status, code in (
        ("quota", 400, "provider_quota_exceeded"),
        ("plan_limit", 429, "rate_limit_error"),
    ):
        for _ in range(4):
            r = await api.post("/chat-messages", json=body(f"Broke sim:fail={fail}"))
            assert (r.status_code, r.json()["code"]) == (status, code)


# --- failures in the stream ------------------------------------------------------------------


async def test_it_sends_an_error_event_halfway_with_sim_fail_error(api):
    events = await events_of(api, body("Doomed sim:fail=error sim:duration=0.4 sim:chunks=6"))
    parsed = data(events)
    assert [e["event"] for e in parsed] == ["message"] * 3 + ["error"]
    failure = parsed[-1]
    assert "task_id" not in failure
    assert failure["code"] == "completion_request_error"
    assert failure["status"] == 400
    assert failure["message_id"] == parsed[0]["message_id"]
    stored = (await history(api, failure["conversation_id"]))["data"][0]
    assert stored["status"] == "error"
    assert stored["error"] == failure["message"]
    assert stored["answer"] == "".join(e["answer"] for e in parsed[:3])

    r = await api.post(
        "/chat-messages", json=body("Doomed sim:fail=error sim:duration=0.2", response_mode=None)
    )
    assert r.status_code == 400
    assert r.json()["code"] == "completion_request_error"


async def test_it_drops_the_stream_halfway_and_keeps_generating(api):
    reference = await events_of(api, body("Dropped topic sim:duration=0.1 sim:chunks=6"))
    full = "".join(e["answer"] for e in data(reference, "message"))

    payload = body("Dropped topic sim:duration=1.2 sim:chunks=6 sim:drop_stream")
    events = await events_of(api, payload)
    parsed = data(events)
    assert [e["event"] for e in parsed] == ["message"] * 3  # no message_end
    conversation_id = parsed[0]["conversation_id"]

    during = (await history(api, conversation_id))["data"][0]
    assert during["status"] == "normal"
    assert len(during["answer"]) < len(full)

    async def finished() -> bool:
        return (await history(api, conversation_id))["data"][0]["answer"] == full

    await eventually(finished)


# --- stop ------------------------------------------------------------------------------------


async def test_it_stops_mid_stream_with_message_end_and_keeps_the_partial_answer(api):
    # Five seconds between chunks: only a stop that wakes the generator ends this in time.
    payload = body("Long answer sim:duration=20 sim:chunks=4")
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload) as source:
        events = source.aiter_sse()
        first = json.loads((await anext(events)).data)
        r = await stop(api, first["task_id"])
        assert (r.status_code, r.json()) == (200, {"result": "success"})
        rest = data([sse async for sse in events])
    # No second chunk (due 5 s later): the stop woke the generator, not the next tick.
    assert [e["event"] for e in rest] == ["message_end"]
    end = rest[0]
    assert end["task_id"] == first["task_id"]
    assert end["metadata"]["usage"]["completion_tokens"] == len(first["answer"]) // 4

    stored = await history(api, first["conversation_id"])
    assert stored["data"][0]["answer"] == first["answer"]
    assert stored["data"][0]["status"] == "normal"
    assert stored["data"][0]["error"] is None
    # A second stop of the now finished task: the same success, nothing else.
    assert (await stop(api, first["task_id"])).json() == {"result": "success"}


async def test_it_answers_success_to_stops_that_change_nothing(api):
    assert (await stop(api, str(uuid.uuid4()))).json() == {"result": "success"}
    assert (await stop(api, "not-even-a-uuid")).json() == {"result": "success"}

    payload = body("Not yours sim:duration=0.6 sim:chunks=6")
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload) as source:
        events = source.aiter_sse()
        first = json.loads((await anext(events)).data)
        r = await stop(api, first["task_id"], user="mallory")
        assert (r.status_code, r.json()) == (200, {"result": "success"})
        other_app = await api.post(
            f"/chat-messages/{first['task_id']}/stop",
            json={"user": "alice"},
            headers={"Authorization": "Bearer sim-other-app"},
        )
        assert other_app.json() == {"result": "success"}
        rest = data([sse async for sse in events])
    # Neither stop touched alice's task: it ran to its natural end.
    assert [e["event"] for e in rest] == ["message"] * 5 + ["message_end"]


async def test_it_refuses_a_stop_without_user_or_json(api):
    for kwargs in (
        {"json": {}},
        {"json": {"user": ""}},
    ):
        r = await api.post("/chat-messages/abc/stop", **kwargs)
        assert (r.status_code, r.json()) == (
            400,
            {"code": "invalid_param", "message": "Arg user must be provided.", "status": 400},
        )
    r = await api.post("/chat-messages/abc/stop", content=b"user=alice")
    assert r.status_code == 400
    assert r.json()["code"] == "bad_request"
    r = await api.post("/chat-messages/abc/stop", content=b"")
    assert r.status_code == 400
    r = await api.get("/chat-messages/abc/stop")
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"


async def test_it_ignores_the_stop_with_sim_stop_ignore(api):
    payload = body("Stubborn sim:stop=ignore sim:duration=0.6 sim:chunks=6")
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload) as source:
        events = source.aiter_sse()
        first = json.loads((await anext(events)).data)
        assert (await stop(api, first["task_id"])).json() == {"result": "success"}
        rest = data([sse async for sse in events])
    assert [e["event"] for e in rest] == ["message"] * 5 + ["message_end"]


async def test_it_ends_late_after_a_stop_with_sim_stop_slow(api):
    payload = body("Sluggish sim:stop=slow sim:stop_delay=3 sim:duration=20 sim:chunks=300")
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload) as source:
        events = source.aiter_sse()
        first = json.loads((await anext(events)).data)
        assert (await stop(api, first["task_id"])).json() == {"result": "success"}
        stopped_at = time.monotonic()
        rest = data([sse async for sse in events])
    elapsed = time.monotonic() - stopped_at
    assert elapsed >= 2.5  # a lower bound only: "late" is provable on a busy machine
    assert rest[-1]["event"] == "message_end"
    assert 2 <= len(rest) < 300  # kept generating during the delay, then ended early


# --- history ---------------------------------------------------------------------------------


async def test_it_lists_history_newest_first_with_the_answer_so_far(api):
    user = unique("history-user")
    one = await events_of(api, body("First question sim:duration=0.1", user=user))
    conversation_id = data(one)[0]["conversation_id"]
    first_answer = "".join(e["answer"] for e in data(one, "message"))

    payload = body(
        "Second question sim:duration=2 sim:chunks=20", user=user, conversation_id=conversation_id
    )
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload) as source:
        events = source.aiter_sse()
        seen = json.loads((await anext(events)).data)
        page = await history(api, conversation_id, user)
        assert page["limit"] == 20
        assert page["has_more"] is False
        newest, oldest = page["data"]
        assert newest["id"] == seen["message_id"]
        assert newest["query"] == "Second question sim:duration=2 sim:chunks=20"
        assert newest["status"] == "normal"
        assert newest["answer"].startswith(seen["answer"])  # the answer so far
        assert newest["parent_message_id"] == oldest["id"]
        assert oldest["answer"] == first_answer
        assert oldest["parent_message_id"] is None
        for field in ("message_files", "retriever_resources", "agent_thoughts"):
            assert newest[field] == []
        await stop(api, seen["task_id"], user=user)
        rest = [sse async for sse in events]
    assert data(rest)[-1]["event"] == "message_end"

    paged = await api.get(
        "/messages", params={"conversation_id": conversation_id, "user": user, "limit": 1}
    )
    assert paged.json()["has_more"] is True
    assert [m["id"] for m in paged.json()["data"]] == [newest["id"]]
    older = await api.get(
        "/messages",
        params={"conversation_id": conversation_id, "user": user, "first_id": newest["id"]},
    )
    assert [m["id"] for m in older.json()["data"]] == [oldest["id"]]


async def test_it_lists_the_users_conversations_most_recent_first(api):
    user = unique("lister")
    ids = []
    for topic in ("Alpha", "Beta"):
        events = await events_of(api, body(f"{topic} sim:duration=0.1", user=user))
        ids.append(data(events)[0]["conversation_id"])
    r = await api.get("/conversations", params={"user": user})
    listing = r.json()
    assert listing["has_more"] is False
    assert [c["id"] for c in listing["data"]] == ids[::-1]
    item = listing["data"][0]
    assert item["name"] == "Beta"
    assert item["status"] == "normal"
    assert set(item) == {
        "id",
        "name",
        "inputs",
        "status",
        "introduction",
        "created_at",
        "updated_at",
    }
    r = await api.get("/conversations", params={"user": user, "sort_by": "created_at"})
    assert [c["id"] for c in r.json()["data"]] == ids
    r = await api.get("/conversations", params={"user": unique("nobody")})
    assert r.json()["data"] == []
    r = await api.get("/conversations", params={"user": user, "sort_by": "name"})
    assert r.status_code == 400


async def test_it_describes_the_app(api):
    r = await api.get("/info")
    assert r.status_code == 200
    assert r.json() | {"name": "", "description": ""} == {
        "name": "",
        "description": "",
        "tags": [],
        "mode": "chat",
        "author_name": "Runbrake",
    }
