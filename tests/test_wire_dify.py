"""The Dify client against wire sequences in the shapes Dify's source writes (tests/fixtures/
dify/), served over a real socket: the answer assembled exactly once, the status, the usage,
and following a lost stream through history."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from runs.providers import base
from runs.providers.base import (
    Event,
    Finished,
    OutputDelta,
    ProviderConfig,
    Running,
    Started,
    StreamEnded,
    Usage,
    Waiting,
)
from runs.providers.dify import DifyProvider
from runs.providers.errors import ProviderError
from tests.wire import Answer, finished, fixture

pytestmark = pytest.mark.asyncio

CHAT_PATH = "/chat-messages"
HISTORY_PATH = r"/messages\?.*"
REFS = {
    "conversation_id": "7d1e0000-0000-4000-8000-00000000c0a1",
    "message_id": "7d1e0000-0000-4000-8000-00000000c0a2",
    "user": "runbrake-user-7",
}


def dify(replay: Any, **options: Any) -> DifyProvider:
    return DifyProvider(
        ProviderConfig(base_url=replay.url, api_key="k", options=options, allow_private=True)
    )


async def drain(events: AsyncGenerator[Event], limit: float = 10.0) -> list[Event]:
    """Everything a run or follow yields, within `limit` seconds (a hang fails the test)."""
    out = []
    async with asyncio.timeout(limit):
        async for event in events:
            out.append(event)
    return out


def output_of(events: list[Event]) -> str:
    """The answer as the watcher assembles it: deltas, replacements, then Finished.output."""
    text = ""
    for event in events:
        if isinstance(event, OutputDelta):
            text = event.text if event.replace else text + event.text
        elif isinstance(event, Finished) and event.output is not None:
            text = event.output
    return text


async def run_fixture(replay: Any, name: str, **answer: Any) -> list[Event]:
    replay.on("POST", CHAT_PATH, Answer.sse(fixture(f"dify/{name}"), **answer))
    provider = dify(replay)
    try:
        return await drain(provider.run("Why does bread rise?", {"user": "runbrake-user-7"}))
    finally:
        await provider.aclose()


# --- the stream ------------------------------------------------------------------------------


async def test_it_assembles_a_chat_reply_once_with_its_usage(replay):
    events = await run_fixture(replay, "chat_stream.sse")
    assert events[0] == Started(
        "7d1e0000-0000-4000-8000-00000000c0a3",
        refs={
            "conversation_id": "7d1e0000-0000-4000-8000-00000000c0a1",
            "message_id": "7d1e0000-0000-4000-8000-00000000c0a2",
            "user": "runbrake-user-7",
        },
    )
    assert output_of(events) == "Bread rises because yeast makes gas. 🍞"
    assert events[-1] == Finished(
        "completed",
        "message_end",
        usage=Usage(
            prompt_tokens=21,
            completion_tokens=11,
            total_tokens=32,
            price="0.0000091",
            currency="USD",
        ),
    )
    sent = replay.requests_to("POST", CHAT_PATH)[0]
    assert sent.headers["authorization"] == "Bearer k"
    assert sent.json() == {
        "query": "Why does bread rise?",
        "inputs": {},
        "user": "runbrake-user-7",
        "response_mode": "streaming",
    }


async def test_it_ends_a_stopped_chat_reply_like_a_finished_one(replay):
    # Nothing marks a stop on the wire: the watcher turns this end after a stop into STOPPED.
    events = await run_fixture(replay, "chat_stopped_stream.sse")
    assert output_of(events) == "Start by checking the breaker"
    assert (finished(events).status, finished(events).provider_status) == (
        "completed",
        "message_end",
    )


async def test_it_keeps_text_that_arrives_as_message_file(replay):
    events = await run_fixture(replay, "chat_message_file_stream.sse")
    assert output_of(events) == "I see a blue logo with a bee on it."
    usage = finished(events).usage
    assert usage is not None
    assert usage.total_tokens == 649


async def test_it_assembles_an_agent_reply_from_agent_messages(replay):
    events = await run_fixture(replay, "agent_chat_stream.sse")
    assert output_of(events) == "Lisbon is sunny, 24 C."
    assert finished(events).usage == Usage(380, 8, 388, "0.0000618", "USD")


async def test_it_takes_a_new_agents_closing_message_as_the_answer_not_more_text(replay):
    events = await run_fixture(replay, "new_agent_stream.sse")
    assert output_of(events) == "Pack a jacket and an umbrella."  # once, not twice
    deltas = [e for e in events if isinstance(e, OutputDelta)]
    assert deltas[-1] == OutputDelta("Pack a jacket and an umbrella.", replace=True)
    assert finished(events).usage == Usage(900, 9, 909, "0", "USD")


async def test_it_keeps_a_stopped_new_agents_text_without_a_closing_message(replay):
    events = await run_fixture(replay, "new_agent_stopped_stream.sse")
    assert output_of(events) == "Pack a jacket "
    assert finished(events).provider_status == "message_end"


async def test_it_takes_a_new_agents_closing_message_file_as_the_answer(replay):
    events = await run_fixture(replay, "new_agent_message_file_stream.sse")
    # The tool's file event carries no text; the closing answer is labelled message_file.
    assert output_of(events) == "The plot is attached."
    assert finished(events).status == "completed"


async def test_it_follows_a_chatflow_and_returns_at_workflow_finished(replay):
    # hold: the server keeps the connection open after workflow_finished, as Dify may.
    events = await run_fixture(replay, "chatflow_stream.sse", hold=True)
    assert output_of(events) == "The memo sets Friday as the deadline."
    assert Running("node Summarise", progress=None) not in events
    nodes = [e for e in events if isinstance(e, Running) and e.provider_status.startswith("node")]
    assert [n.provider_status for n in nodes] == ["node Summarise", "node Summarise"]
    assert nodes[0].progress != nodes[1].progress  # started, then finished: progress
    assert events[-1] == Finished(
        "completed",
        "workflow_finished:succeeded",
        usage=Usage(48, 13, 61, "0.0000144", "USD"),
    )


@pytest.mark.parametrize(
    ("name", "status", "provider_status"),
    [
        ("chatflow_stopped_stream.sse", "stopped", "workflow_finished:stopped"),
        ("chatflow_aborted_stream.sse", "stopped", "workflow_finished:aborted"),
        ("chatflow_failed_stream.sse", "failed", "workflow_finished:failed"),
    ],
)
async def test_it_settles_a_chatflow_at_workflow_finished(replay, name, status, provider_status):
    events = await run_fixture(replay, name, hold=True)
    assert output_of(events) == "The memo sets"
    end = finished(events)
    assert (end.status, end.provider_status) == (status, provider_status)
    if status == "failed":
        assert end.error == ("Dify's chatflow ended failed: [openai] Incorrect API key provided")
    assert sum(isinstance(e, Finished) for e in events) == 1


async def test_it_fails_on_a_chatflows_pre_run_error_without_a_code(replay):
    # Dify keeps this stream open (dify #37197): the client must close it itself.
    events = await run_fixture(replay, "chatflow_prerun_error_stream.sse", hold=True)
    assert events == [
        Finished("failed", "error:pre-run", error="Dify reported an error: query is required")
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, Usage(21, 11, 32, "0.0000091", "USD")),
        (
            {"prompt_tokens": -1, "completion_tokens": True, "total_tokens": "32"},
            Usage(None, None, None, "0.0000091", "USD"),
        ),
        ({"prompt_tokens": 1.5, "total_tokens": 2**70}, Usage(None, 11, None, "0.0000091", "USD")),
        ({"total_price": "NaN"}, Usage(21, 11, 32, None, "USD")),
        ({"total_price": "Infinity"}, Usage(21, 11, 32, None, "USD")),
        ({"total_price": "-0.1"}, Usage(21, 11, 32, None, "USD")),
        ({"total_price": "1E+99999"}, Usage(21, 11, 32, None, "USD")),
        ({"total_price": "0E-7"}, Usage(21, 11, 32, "0.0000000", "USD")),
        ({"total_price": 0.1}, Usage(21, 11, 32, None, "USD")),
        ({"total_price": "twelve"}, Usage(21, 11, 32, None, "USD")),
        ({"currency": "US$"}, Usage(21, 11, 32, "0.0000091", None)),
        ({"currency": "<script>"}, Usage(21, 11, 32, "0.0000091", None)),
        ({"currency": 840}, Usage(21, 11, 32, "0.0000091", None)),
        (
            {
                "prompt_tokens": None,
                "completion_tokens": None,
                "total_tokens": None,
                "total_price": None,
                "currency": None,
            },
            None,
        ),
    ],
)
async def test_it_reads_usage_as_hostile_input(replay, change, expected):
    frames = fixture("dify/chat_stream.sse").decode().split("\n\n")
    end = json.loads(frames[-2].removeprefix("data: "))
    end["metadata"]["usage"] |= change
    frames[-2] = "data: " + json.dumps(end)
    replay.on("POST", CHAT_PATH, Answer.sse("\n\n".join(frames).encode()))
    provider = dify(replay)
    try:
        events = await drain(provider.run("x", {}))
    finally:
        await provider.aclose()
    assert finished(events).usage == expected


async def test_it_waits_out_difys_concurrency_limit_sent_as_400(replay, monkeypatch):
    monkeypatch.setattr(base, "backoff_delay", lambda attempt, **kw: 0.01)
    too_many = {
        "code": "invalid_param",
        "message": "Too many requests. Please try again later. The current maximum concurrent "
        "requests allowed for 3f0c0000-0000-4000-8000-000000000001 is 2.",
        "status": 400,
    }
    replay.on(
        "POST",
        CHAT_PATH,
        Answer.json(too_many, status=400),
        Answer.sse(fixture("dify/chat_stream.sse")),
    )
    provider = dify(replay)
    try:
        events = await drain(provider.run("x", {}))
    finally:
        await provider.aclose()
    assert isinstance(events[0], Waiting)
    assert "limit of concurrent runs" in events[0].reason
    assert finished(events).status == "completed"
    assert len(replay.requests_to("POST", CHAT_PATH)) == 2


async def test_it_does_not_retry_other_invalid_params(replay):
    refused = {"code": "invalid_param", "message": "query is required", "status": 400}
    replay.on("POST", CHAT_PATH, Answer.json(refused, status=400))
    provider = dify(replay)
    with pytest.raises(ProviderError) as caught:
        await drain(provider.run("x", {}))
    await provider.aclose()
    assert (caught.value.code, caught.value.retryable) == ("invalid_param", False)
    assert len(replay.requests_to("POST", CHAT_PATH)) == 1


async def test_it_reports_a_stream_that_ends_without_a_terminal_event(replay):
    frames = fixture("dify/chat_stream.sse").decode().split("\n\n")
    replay.on("POST", CHAT_PATH, Answer.sse(frames[0].encode()))
    provider = dify(replay)
    events = await drain(provider.run("x", {}))
    await provider.aclose()
    assert output_of(events) == "Bread rises because"
    assert events[-1] == StreamEnded()


async def test_it_refuses_a_task_id_that_leaves_its_path_segment_and_quotes_others(replay):
    replay.on("POST", r"/chat-messages/.*/stop", Answer.json({"result": "success"}))
    provider = dify(replay)
    with pytest.raises(ProviderError) as refused:
        await provider.stop("../../apps/1", {"user": "runbrake-user-7"})
    assert refused.value.code == "VALIDATION_ERROR"
    assert replay.received == []  # the key went nowhere
    result = await provider.stop("task 1?x", {"user": "runbrake-user-7"})
    await provider.aclose()
    assert result.terminal is None
    (sent,) = replay.requests_to("POST", r"/chat-messages/.*/stop")
    assert sent.path == "/chat-messages/task%201%3Fx/stop"
    assert sent.json() == {"user": "runbrake-user-7"}


# --- following a lost stream through history -------------------------------------------------


def history(name: str, **newest: Any) -> dict[str, Any]:
    page = json.loads(fixture(f"dify/{name}"))
    page["data"][-1] |= newest
    return page


async def follow(replay: Any, *pages: dict[str, Any], **options: Any) -> list[Event]:
    replay.on("GET", HISTORY_PATH, *(Answer.json(p) for p in pages))
    provider = dify(replay, poll_interval=0.01, **options)
    try:
        return await drain(provider.follow("task", REFS))
    finally:
        await provider.aclose()


async def test_it_keeps_following_while_history_shows_no_answer_then_takes_the_answer(replay):
    # Dify writes `answer` only when the reply ends: "" with status normal is still running.
    now = int(time.time())
    generating = history("history_generating.json", created_at=now)
    answered = history("history_answered.json", created_at=now)
    events = await follow(replay, generating, generating, generating, answered)
    assert events[:3] == [Running("generating")] * 3
    assert not any(isinstance(e, OutputDelta) for e in events)  # never an empty replace
    assert events[3:] == [
        Finished(
            "completed",
            "history:answer",
            output="Bread rises because yeast makes gas. 🍞",
            via="history",
        )
    ]
    for sent in replay.requests_to("GET", HISTORY_PATH):
        query = parse_qs(urlsplit(sent.path).query)
        assert query["conversation_id"] == [REFS["conversation_id"]]
        assert query["user"] == [REFS["user"]]
        assert int(query["limit"][0]) >= 20


async def test_it_fails_a_followed_run_that_history_shows_as_an_error(replay):
    events = await follow(replay, history("history_error.json", created_at=int(time.time())))
    assert events == [
        Finished(
            "failed",
            "history:error",
            error="Dify reported an error: [openai] Rate limit exceeded",
            via="history",
        )
    ]


async def test_it_ends_a_reply_with_no_answer_past_the_apps_max_execution_time(replay):
    # Stopped before its first word, or timed out: "" forever. Created 1,261 s ago, past
    # the default 1,200 s plus a minute to save.
    stale = history("history_generating.json", created_at=int(time.time()) - 1261)
    events = await follow(replay, stale)
    assert events == [Finished("completed", "history:no_answer", output=None, via="history")]


async def test_it_reads_the_max_execution_time_from_the_account(replay):
    recent = history("history_generating.json", created_at=int(time.time()) - 100)
    events = await follow(replay, recent, max_execution_seconds=30)
    assert finished(events).provider_status == "history:no_answer"
    replay.routes.clear()
    events = await follow(replay, recent, history("history_answered.json"))
    assert events[0] == Running("generating")  # 100 s is well within the default 1,200 s


async def test_it_shows_an_agents_thoughts_as_progress(replay):
    now = int(time.time())
    thought = {"id": "t1", "thought": "", "observation": "", "tool": "weather", "tool_input": "{}"}
    one = history("history_generating.json", created_at=now, agent_thoughts=[thought])
    observed = [thought | {"observation": '{"weather": "sunny"}'}]
    two = history("history_generating.json", created_at=now, agent_thoughts=observed)
    events = await follow(replay, one, one, two, history("history_answered.json"))
    progress = [e.progress for e in events if isinstance(e, Running)]
    assert progress[0] == progress[1] != progress[2]
    assert None not in progress


async def test_it_takes_a_paused_chatflows_saved_text_as_not_final(replay):
    now = int(time.time())
    paused = history("history_generating.json", created_at=now, answer="Half", status="paused")
    events = await follow(replay, paused, history("history_answered.json"))
    assert events[0] == Running("paused")
    assert finished(events).output == "Bread rises because yeast makes gas. 🍞"


async def test_it_pages_back_to_find_an_older_message(replay):
    # A page lists the newest messages OLDEST FIRST; older pages come with first_id = the
    # oldest id of the page. Our message is on the second page.
    newer = json.loads(fixture("dify/history_answered.json"))
    for item in newer["data"]:
        item["id"] = item["id"].replace("c0a", "fff")
    newer["has_more"] = True
    older = history("history_answered.json")
    replay.on("GET", r"/messages\?(?!.*first_id).*", Answer.json(newer))
    replay.on("GET", r"/messages\?.*first_id=.*", Answer.json(older))
    provider = dify(replay, poll_interval=0.01)
    try:
        events = await drain(provider.follow("task", REFS))
    finally:
        await provider.aclose()
    assert finished(events).output == "Bread rises because yeast makes gas. 🍞"
    (paged,) = replay.requests_to("GET", r"/messages\?.*first_id=.*")
    assert parse_qs(urlsplit(paged.path).query)["first_id"] == [newer["data"][0]["id"]]


async def test_it_says_so_when_history_no_longer_has_the_message(replay):
    empty = {"limit": 20, "has_more": False, "data": []}
    with pytest.raises(ProviderError) as caught:
        await follow(replay, empty)
    assert caught.value.code == "NOT_FOUND"


async def test_it_waits_out_a_failing_history_read(replay, monkeypatch):
    monkeypatch.setattr("runs.providers.dify.backoff_delay", lambda attempt, **kw: 0.01)
    broken = Answer.json({"code": "internal_server_error", "status": 500}, status=500)
    replay.on("GET", HISTORY_PATH, broken, broken, Answer.json(history("history_answered.json")))
    provider = dify(replay, poll_interval=0.01)
    try:
        events = await drain(provider.follow("task", REFS))
    finally:
        await provider.aclose()
    assert [type(e) for e in events] == [Waiting, Finished]
