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
    "time_to_first_token",
    "time_to_generate",
}
UUID_NIL = "00000000-0000-0000-0000-000000000000"


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


async def history(
    api: httpx.AsyncClient, conversation_id: str, user: str = "alice", **kw: Any
) -> Any:
    r = await api.get("/messages", params={"conversation_id": conversation_id, "user": user}, **kw)
    assert r.status_code == 200, r.text
    return r.json()


async def stop(
    api: httpx.AsyncClient, task_id: str, user: str = "alice", **kw: Any
) -> httpx.Response:
    return await api.post(f"/chat-messages/{task_id}/stop", json={"user": user}, **kw)


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
    assert {d["from_variable_selector"] for d in deltas} == {None}
    assert end["event"] == "message_end"
    # EasyUI's message_end: files null without files, annotation_reply null, full usage.
    assert end["files"] is None
    assert list(end["metadata"]) == ["annotation_reply", "retriever_resources", "usage"]
    assert end["metadata"]["annotation_reply"] is None
    usage = end["metadata"]["usage"]
    assert set(usage) == USAGE_FIELDS
    assert usage["currency"] == "USD"
    assert all(isinstance(usage[k], str) for k in USAGE_FIELDS if k.endswith(("price", "_unit")))
    assert (usage["time_to_first_token"], usage["time_to_generate"]) == (None, None)
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
    # orjson's compact output: no spaces after separators, non-ASCII written raw.
    for block in blocks:
        if block.startswith("data: "):
            text = block.removeprefix("data: ")
            assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


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
    names = [e["event"] for e in data(events)]
    assert set(names) == {"agent_thought", "agent_message", "message_end"}
    assert names[-1] == "message_end"
    assert "message" not in names  # agent-chat sends no closing full answer
    thoughts = data(events, "agent_thought")
    assert thoughts[-1]["thought"] == "".join(e["answer"] for e in data(events, "agent_message"))
    # AgentChatAppGenerator raises a ValueError: invalid_param, not bad_request.
    r = await api.post(
        "/chat-messages", json=body("Agent", response_mode="blocking"), headers=agent
    )
    assert (r.status_code, r.json()) == (
        400,
        {
            "code": "invalid_param",
            "message": "Agent Chat App does not support blocking mode",
            "status": 400,
        },
    )
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
        ({"query": "\x00"}, 400, "invalid_param", "query is required"),
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


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"inputs": None}, "inputs", "Field required [type=missing"),
        ({"inputs": []}, "inputs", "Input should be a valid dictionary [type=dict_type"),
        ({"query": None}, "query", "Field required [type=missing"),
        ({"query": 7}, "query", "Input should be a valid string [type=string_type"),
        ({"files": "x"}, "files", "Input should be a valid list [type=list_type"),
        (
            {"response_mode": "fast"},
            "response_mode",
            "Input should be 'blocking' or 'streaming' [type=literal_error",
        ),
        (
            {"conversation_id": "42"},
            "conversation_id",
            "Value error, conversation_id must be a valid UUID [type=value_error",
        ),
    ],
)
async def test_it_refuses_a_malformed_payload_in_pydantics_words(api, change, field, problem):
    # ChatRequestPayload.model_validate: a ValidationError is a ValueError, so invalid_param
    # with pydantic's own text (not a message of Dify's).
    payload = {k: v for k, v in (body("Validate me") | change).items() if v is not None}
    r = await api.post("/chat-messages", json=payload)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_param"
    lines = r.json()["message"].split("\n")
    assert lines[:2] == ["1 validation error for ChatRequestPayload", field]
    assert lines[2].startswith(f"  {problem}")


async def test_it_accepts_files_null_as_the_official_sdk_sends(api):
    events = await events_of(api, body("With files null sim:duration=0.1", files=None))
    assert data(events)[-1]["event"] == "message_end"


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
    ("kind", "status", "code", "message"),
    [
        # AppInvokeQuotaExceededError subclasses ValueError: the ValueError handler wins.
        ("rate_limit", 400, "invalid_param", "Too many requests. Please try again later."),
        ("rate_limit_429", 429, "too_many_requests", "Too many requests. Please try again later."),
        ("server_error", 500, "internal_server_error", "Internal Server Error"),
    ],
)
async def test_it_fails_the_first_three_calls_then_streams(api, kind, status, code, message):
    payload = body(unique(f"Flaky sim:fail={kind} sim:duration=0.1"))
    for _ in range(3):
        r = await api.post("/chat-messages", json=payload)
        assert r.status_code == status
        assert r.json()["code"] == code
        assert r.json()["status"] == status
        assert r.json()["message"].startswith(message)
        assert "retry-after" not in r.headers  # Dify never sends one
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
    # handle_error saves no partial text (this test used to expect the partial answer).
    assert stored["answer"] == ""

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
    # Dify writes the answer only when the reply ends (this test used to expect the answer
    # so far).
    assert (during["status"], during["answer"]) == ("normal", "")

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
    # _save_message saves the partial text, stripped.
    assert stored["data"][0]["answer"] == first["answer"].strip()
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
    cases: list[dict[str, Any]] = [{"json": {}}, {"json": {"user": ""}}]
    for kwargs in cases:
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


async def test_it_lists_history_oldest_first_with_no_answer_until_the_end(api):
    # Both used to be the other way round (newest first, the answer so far), as our old
    # contract said; Dify's pagination_by_first_id reverses each page, and _save_message
    # writes the answer only when the reply ends.
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
        oldest, newest = page["data"]
        assert newest["id"] == seen["message_id"]
        assert newest["query"] == "Second question sim:duration=2 sim:chunks=20"
        assert (newest["status"], newest["answer"], newest["error"]) == ("normal", "", None)
        assert oldest["answer"] == first_answer.strip()
        assert {oldest["parent_message_id"], newest["parent_message_id"]} == {UUID_NIL}
        assert list(newest) == [
            "id",
            "conversation_id",
            "parent_message_id",
            "inputs",
            "query",
            "answer",
            "feedback",
            "retriever_resources",
            "created_at",
            "agent_thoughts",
            "message_files",
            "status",
            "error",
            "extra_contents",
        ]
        for field in ("message_files", "retriever_resources", "agent_thoughts", "extra_contents"):
            assert newest[field] == []
        await stop(api, seen["task_id"], user=user)
        rest = [sse async for sse in events]
    assert data(rest)[-1]["event"] == "message_end"
    streamed = seen["answer"] + "".join(e["answer"] for e in data(rest, "message"))
    after = (await history(api, conversation_id, user))["data"][-1]
    assert after["answer"] == streamed.strip()  # the partial text, once stopped

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
    assert older.json()["has_more"] is False


async def test_it_lists_no_messages_for_an_empty_conversation_id(api):
    r = await api.get("/messages", params={"conversation_id": "", "user": "alice", "limit": 5})
    assert (r.status_code, r.json()) == (200, {"limit": 5, "has_more": False, "data": []})


@pytest.mark.parametrize(
    ("params", "field", "problem"),
    [
        ({}, "conversation_id", "Field required [type=missing"),
        ({"conversation_id": "42"}, "conversation_id", "Value error, conversation_id must be"),
        ({"conversation_id": "", "limit": "0"}, "limit", "Input should be greater than or equal"),
        ({"conversation_id": "", "limit": "101"}, "limit", "Input should be less than or equal"),
        ({"conversation_id": "", "first_id": "x"}, "first_id", "Value error, first_id must be"),
    ],
)
async def test_it_refuses_a_malformed_history_query_in_pydantics_words(api, params, field, problem):
    r = await api.get("/messages", params={"user": "alice", **params})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_param"
    lines = r.json()["message"].split("\n")
    assert lines[:2] == ["1 validation error for MessageListQuery", field]
    assert lines[2].startswith(f"  {problem}")


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


async def test_it_describes_each_kind_of_app_by_its_key(api):
    for key, mode in (
        ("sim-agent-acme", "agent-chat"),
        ("sim-newagent-acme", "agent"),
        ("sim-chatflow-acme", "advanced-chat"),
        ("sim-workflow-acme", "workflow"),
    ):
        r = await api.get("/info", headers={"Authorization": f"Bearer {key}"})
        assert r.json()["mode"] == mode


async def test_it_serves_the_app_parameters(api):
    r = await api.get("/parameters", params={"user": "alice"})
    assert r.status_code == 200
    assert r.json()["user_input_form"] == []
    assert "system_parameters" in r.json()


# --- message_file ----------------------------------------------------------------------------


async def test_it_labels_chat_text_message_file_once_the_message_has_a_file(api):
    # get_message_event_type: text chunks of a message with a file go out as message_file
    # carrying `answer` (the 1.12 trace in LangBot #1964).
    events = await events_of(api, body("Vision sim:message_file sim:duration=0.3 sim:chunks=4"))
    parsed = data(events)
    assert [e["event"] for e in parsed] == ["message"] + ["message_file"] * 3 + ["message_end"]
    for chunk in parsed[1:4]:
        assert set(chunk) == {
            "event",
            "conversation_id",
            "message_id",
            "created_at",
            "task_id",
            "id",
            "answer",
            "from_variable_selector",
        }
    text = "".join(e["answer"] for e in parsed[:4])
    assert text.startswith("### Vision")
    end = parsed[-1]
    assert [f["transfer_method"] for f in end["files"]] == ["remote_url"]
    stored = (await history(api, end["conversation_id"]))["data"][-1]
    assert stored["answer"] == text.strip()
    assert [f["belongs_to"] for f in stored["message_files"]] == ["user"]


# --- New Agent -------------------------------------------------------------------------------

NEW_AGENT = {"Authorization": "Bearer sim-newagent-acme"}


async def test_it_streams_a_new_agent_reply_then_one_closing_message(api):
    payload = body("Commute sim:duration=0.3 sim:chunks=4")
    del payload["response_mode"]  # New Agent streams when response_mode is omitted
    events = await events_of(api, payload, headers=NEW_AGENT)
    parsed = data(events)
    names = [e["event"] for e in parsed]
    assert names == ["agent_thought", "agent_message"] * 4 + ["message", "message_end"]
    deltas = "".join(e["answer"] for e in data(events, "agent_message"))
    closing = parsed[-2]
    assert closing["answer"] == deltas  # the whole answer again: replace, never append
    assert closing["from_variable_selector"] is None
    assert len({e["id"] for e in data(events, "agent_thought")}) == 1  # one answer row
    stored = (await history(api, closing["conversation_id"], headers=NEW_AGENT))["data"][-1]
    assert stored["answer"] == deltas.strip()

    r = await api.post(
        "/chat-messages", json=body("Blocking", response_mode="blocking"), headers=NEW_AGENT
    )
    assert (r.status_code, r.json()["code"]) == (400, "bad_request")


async def test_it_ends_a_stopped_new_agent_reply_without_a_closing_message(api):
    payload = body("Long agent sim:duration=20 sim:chunks=4")
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload, headers=NEW_AGENT) as s:
        events = s.aiter_sse()
        thought = json.loads((await anext(events)).data)
        first = json.loads((await anext(events)).data)
        assert (thought["event"], first["event"]) == ("agent_thought", "agent_message")
        await stop(api, first["task_id"], headers=NEW_AGENT)
        rest = data([sse async for sse in events])
    assert [e["event"] for e in rest] == ["message_end"]
    stored = (await history(api, first["conversation_id"], headers=NEW_AGENT))["data"][-1]
    assert stored["answer"] == first["answer"].strip()


async def test_it_sends_a_new_agent_tool_file_then_the_closing_answer_as_message_file(api):
    events = await events_of(
        api, body("Chart sim:message_file sim:duration=0.2 sim:chunks=2"), headers=NEW_AGENT
    )
    parsed = data(events)
    names = [e["event"] for e in parsed]
    assert names[:3] == ["agent_thought", "agent_thought", "message_file"]
    assert names[-2:] == ["message_file", "message_end"]
    made = parsed[2]
    assert (made["type"], made["belongs_to"]) == ("image", "assistant")
    assert "answer" not in made
    assert "/files/tools/" in made["url"]
    deltas = "".join(e["answer"] for e in data(events, "agent_message"))
    assert parsed[-2]["answer"] == deltas
    assert parsed[-1]["files"][0]["related_id"] == made["id"]


# --- Chatflow --------------------------------------------------------------------------------

CHATFLOW = {"Authorization": "Bearer sim-chatflow-acme"}


async def raw_blocks(api: httpx.AsyncClient, payload: dict[str, Any], **kw: Any) -> list[str]:
    async with api.stream("POST", "/chat-messages", json=payload, **kw) as response:
        raw = "".join([text async for text in response.aiter_text()])
    assert raw.endswith("\n\n")
    return raw.split("\n\n")[:-1]


async def test_it_streams_a_chatflow_and_closes_at_workflow_finished(api):
    blocks = await raw_blocks(api, body("Memo sim:duration=0.3 sim:chunks=3"), headers=CHATFLOW)
    assert blocks[0] == "event: ping"  # at once, before anything else
    parsed = [json.loads(b.removeprefix("data: ")) for b in blocks if b != "event: ping"]
    names = [e["event"] for e in parsed]
    assert names[:4] == ["workflow_started", "node_started", "node_finished", "node_started"]
    assert names[-2:] == ["message_end", "workflow_finished"]  # message_end first
    assert names.count("message") == 3
    deltas = [e for e in parsed if e["event"] == "message"]
    assert {tuple(d["from_variable_selector"]) for d in deltas} == {("1782899000001", "text")}
    started = parsed[0]
    assert started["data"]["reason"] == "initial"
    assert started["workflow_run_id"] == parsed[-1]["workflow_run_id"]
    nodes = [e["data"]["title"] for e in parsed if e["event"] == "node_started"]
    assert nodes == ["Start", "LLM", "Answer"]
    finished = parsed[-1]["data"]
    text = "".join(d["answer"] for d in deltas)
    assert (finished["status"], finished["error"]) == ("succeeded", None)
    assert finished["outputs"] == {"answer": text}
    end = parsed[-2]
    assert end["files"] == []
    assert isinstance(end["metadata"]["usage"]["time_to_first_token"], float)
    stored = (await history(api, end["conversation_id"], headers=CHATFLOW))["data"][-1]
    assert stored["answer"] == text


async def chatflow_stopped(api: httpx.AsyncClient, query: str, stopper: str) -> list[Any]:
    async with aconnect_sse(
        api, "POST", "/chat-messages", json=body(query), headers=CHATFLOW
    ) as source:
        events = source.aiter_sse()
        first = None
        async for sse in events:
            if sse.event != "ping" and json.loads(sse.data)["event"] == "message":
                first = json.loads(sse.data)
                break
        assert first is not None
        assert (await stop(api, first["task_id"], user=stopper, headers=CHATFLOW)).json() == {
            "result": "success"
        }
        return [first, *data([sse async for sse in events])]


async def test_it_stops_a_chatflow_with_workflow_finished_stopped_and_closes(api):
    first, *rest = await chatflow_stopped(api, "Long flow sim:duration=20 sim:chunks=4", "alice")
    # The reader returns on workflow_finished: the message_end published after it never
    # reaches the client.
    assert [e["event"] for e in rest] == ["workflow_finished"]
    assert (rest[0]["data"]["status"], rest[0]["data"]["error"]) == ("stopped", "Stopped by user.")
    stored = (await history(api, first["conversation_id"], headers=CHATFLOW))["data"][-1]
    assert (stored["status"], stored["answer"]) == ("normal", first["answer"])


async def test_it_aborts_a_chatflow_with_sim_stop_abort(api):
    first, *rest = await chatflow_stopped(
        api, "Abort flow sim:stop=abort sim:duration=20 sim:chunks=4", "alice"
    )
    assert [e["event"] for e in rest] == ["workflow_finished"]
    assert rest[0]["data"]["status"] == "failed"
    assert rest[0]["data"]["error"] == "Aborted: User requested stop"
    stored = (await history(api, first["conversation_id"], headers=CHATFLOW))["data"][-1]
    assert (stored["status"], stored["answer"]) == ("error", "")


async def test_it_aborts_a_chatflow_even_for_a_stop_from_another_user(api):
    # send_stop_command reaches the graph engine "without user validation".
    _first, *rest = await chatflow_stopped(api, "Flow sim:duration=20 sim:chunks=4", "mallory")
    assert rest[0]["data"]["error"] == "Aborted: User requested stop"


async def test_it_keeps_a_chatflow_stream_open_after_a_pre_run_error(api):
    started = time.monotonic()
    blocks = await raw_blocks(
        api,
        body("Broken flow sim:fail=prerun sim:idle_timeout=0.6 sim:ping_interval=0.2"),
        headers=CHATFLOW,
    )
    parsed = [json.loads(b.removeprefix("data: ")) for b in blocks if b != "event: ping"]
    # workflow_execute_task._publish_error_event: no code and no ids; then nothing terminal,
    # so Dify's reader waits until its idle timeout (dify #37197).
    assert parsed == [{"event": "error", "message": "query is required", "status": 500}]
    assert time.monotonic() - started >= 0.55
    assert blocks[0] == "event: ping"


# --- history while an agent works ------------------------------------------------------------


async def test_it_shows_an_agents_thoughts_growing_in_history(api):
    agent = {"Authorization": "Bearer sim-agent-acme"}
    payload = body("Thinking sim:duration=20 sim:chunks=4")
    async with aconnect_sse(api, "POST", "/chat-messages", json=payload, headers=agent) as source:
        events = source.aiter_sse()
        call = json.loads((await anext(events)).data)
        assert call["event"] == "agent_thought"
        stored = (await history(api, call["conversation_id"], headers=agent))["data"][-1]
        assert stored["answer"] == ""
        assert [t["tool"] for t in stored["agent_thoughts"]] == ["current_time"]
        assert stored["agent_thoughts"][0]["observation"] == ""
        await stop(api, call["task_id"], headers=agent)
        rest = data([sse async for sse in events])
    assert rest[-1]["event"] == "message_end"
