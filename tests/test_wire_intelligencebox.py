"""The IntelligenceBox client against the wire sequences of both stream formats (the older
`textDelta` SSE and the AI SDK UI message stream), replayed over a real socket
(tests/fixtures/intelligencebox/README.md names each one's source)."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from runs.providers.base import (
    COMPLETED,
    FAILED,
    STOPPED,
    Event,
    Finished,
    OutputDelta,
    ProviderConfig,
    Running,
    Started,
    StreamEnded,
    Usage,
)
from runs.providers.intelligencebox import IntelligenceBoxProvider
from tests.wire import Answer, Replay, finished, fixture

CHAT = "/api/ai/chat"
# The headers the AI SDK sets on a UI message stream (ui-message-stream-headers.ts).
UI_HEADERS: dict[str, Any] = {"x-vercel-ai-ui-message-stream": "v1", "x-accel-buffering": "no"}


def box(replay: Replay) -> IntelligenceBoxProvider:
    return IntelligenceBoxProvider(
        ProviderConfig(base_url=replay.url, api_key="k", allow_private=True)
    )


async def run_against(replay: Replay, answer: Answer) -> list[Event]:
    replay.on("POST", CHAT, answer)
    provider = box(replay)
    try:
        # Bounded: a client that waits for an end the box never sends fails, not hangs.
        async with asyncio.timeout(10):
            return [event async for event in provider.run("Why do kestrels hover?", {})]
    finally:
        await provider.aclose()


def ui(name: str, **kwargs: Any) -> Answer:
    return Answer.sse(fixture(f"intelligencebox/{name}"), **kwargs, **UI_HEADERS)


def legacy(name: str) -> Answer:
    return Answer.sse(fixture(f"intelligencebox/{name}"))


def text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, OutputDelta))


def progress(events: list[Event]) -> list[str | None]:
    return [e.progress for e in events if isinstance(e, Running)]


# --- the older format ------------------------------------------------------------------------


async def test_it_reads_the_documented_legacy_stream_with_single_newlines(replay: Replay) -> None:
    events = await run_against(replay, legacy("legacy_completion.sse"))
    assert isinstance(events[0], Started)
    assert events[0].external_id.startswith("run-")
    assert text(events) == "Kestrels hover by beating their wings into the wind."
    end = finished(events)
    assert (end.status, end.provider_status, end.via) == (COMPLETED, "finish:stop", "stream")
    assert end.output is None  # the streamed text stands
    [sent] = replay.requests_to("POST", CHAT)
    assert sent.headers["x-api-key"] == "k"
    assert sent.json() == {
        "id": events[0].external_id,
        "messages": [{"role": "user", "content": "Why do kestrels hover?"}],
        "boxAddress": replay.url,
    }


async def test_it_reads_a_legacy_stream_that_never_sends_a_blank_line(replay: Replay) -> None:
    # The docs' example byte for byte: one newline after each event, then the end.
    raw = fixture("intelligencebox/legacy_completion.sse")
    answer = Answer(headers={"content-type": "text/event-stream"}, chunks=[raw])
    events = await run_against(replay, answer)
    assert text(events) == "Kestrels hover by beating their wings into the wind."
    assert finished(events).status == COMPLETED


async def test_it_counts_legacy_tool_steps_as_progress_and_takes_the_usage(
    replay: Replay,
) -> None:
    events = await run_against(replay, legacy("legacy_tools_usage.sse"))
    assert text(events) == "Boilers are serviced every twelve months."
    assert progress(events) == [None, "step 1", "step 2"]
    end = finished(events)
    assert end.status == COMPLETED
    assert end.usage == Usage(prompt_tokens=41, completion_tokens=12, total_tokens=53)


async def test_it_fails_a_legacy_error_in_the_box_s_own_words(replay: Replay) -> None:
    events = await run_against(replay, legacy("legacy_error.sse"))
    end = finished(events)
    assert end.status == FAILED
    assert end.error == "The IntelligenceBox reported an error: Vector store is offline"
    assert text(events) == "The invoices from"


# --- the AI SDK UI message stream ------------------------------------------------------------


async def test_it_assembles_the_text_of_a_ui_message_stream_and_completes(
    replay: Replay,
) -> None:
    events = await run_against(replay, ui("ui_completion.sse"))
    assert text(events) == "Kestrels hover by beating their wings into the wind."
    end = finished(events)
    assert (end.status, end.provider_status, end.via) == (COMPLETED, "finish:stop", "stream")
    assert end.usage is None


async def test_it_fails_a_ui_error_in_its_words_although_a_finish_follows(
    replay: Replay,
) -> None:
    events = await run_against(replay, ui("ui_error_then_finish.sse"))
    end = finished(events)
    assert end.status == FAILED
    assert end.error == (
        "The IntelligenceBox reported an error: Context length of 8192 tokens exceeded"
    )
    assert text(events) == "Summing the Q3"


async def test_it_says_the_box_gave_no_detail_for_the_sdk_s_generic_error(
    replay: Replay,
) -> None:
    end = finished(await run_against(replay, ui("ui_error_generic.sse")))
    assert end.status == FAILED
    assert end.error is not None
    assert "gave no detail" in end.error
    assert "None" not in end.error
    assert "An error occurred" not in end.error


async def test_it_takes_an_abort_chunk_as_the_box_s_word_that_the_run_stopped(
    replay: Replay,
) -> None:
    events = await run_against(replay, ui("ui_abort.sse"))
    end = finished(events)
    assert (end.status, end.provider_status, end.via) == (STOPPED, "abort", "stream")
    assert text(events) == "First, drain the radiator"


async def test_it_counts_ui_tool_chunks_as_progress_and_keeps_text_blocks_apart(
    replay: Replay,
) -> None:
    events = await run_against(replay, ui("ui_tools.sse"))
    # Tool input, output, sources and data chunks add no text; the two steps' blocks stay
    # apart.
    assert text(events) == "Let me check the tide tables.\n\nHigh tide is at 14:05."
    # tool-input-available and tool-output-available (not the input's deltas).
    assert progress(events) == [None, "step 1", "step 2"]
    end = finished(events)
    assert end.status == COMPLETED
    assert end.usage == Usage(prompt_tokens=230, completion_tokens=18, total_tokens=248)


async def test_it_ends_the_stream_at_done_without_waiting_for_the_connection_to_close(
    replay: Replay,
) -> None:
    # The box keeps the connection open after [DONE]: the client must not wait for more.
    events = await run_against(replay, ui("ui_done_without_finish.sse", hold=True))
    assert isinstance(events[-1], StreamEnded)
    assert not [e for e in events if isinstance(e, Finished)]
    assert text(events) == "The committee met"


# --- hostile or unfamiliar chunks -------------------------------------------------------------


def stream_of(*lines: str) -> Answer:
    return Answer.sse("".join(f"data: {line}\n\n" for line in lines).encode(), **UI_HEADERS)


@pytest.mark.parametrize(
    ("finish", "status", "provider_status", "usage"),
    [
        # ai@5.0.0 to 5.0.91: finish has no finishReason; still a normal end.
        ('{"type":"finish"}', COMPLETED, "finish", None),
        ('{"type":"finish","finishReason":"length"}', COMPLETED, "finish:length", None),
        # A finish that says error with no error chunk before it.
        ('{"type":"finish","finishReason":"error"}', FAILED, "finish:error", None),
        # A reason too long or odd for our records is not taken.
        ('{"type":"finish","finishReason":"' + "x" * 300 + '"}', COMPLETED, "finish", None),
        ('{"type":"finish","finishReason":{"a":1}}', COMPLETED, "finish", None),
        # Token counts that are not plain non-negative integers are dropped.
        (
            '{"type":"finish","usage":{"promptTokens":"12","completionTokens":3.5,'
            '"totalTokens":true}}',
            COMPLETED,
            "finish",
            None,
        ),
        (
            '{"type":"finish","usage":{"promptTokens":-4,"completionTokens":7}}',
            COMPLETED,
            "finish",
            Usage(completion_tokens=7),
        ),
        (
            '{"type":"finish","messageMetadata":{"totalTokens":99}}',
            COMPLETED,
            "finish",
            Usage(total_tokens=99),
        ),
        ('{"type":"finish","messageMetadata":"lots"}', COMPLETED, "finish", None),
    ],
)
async def test_it_reads_a_finish_by_its_fields_and_trusts_no_value(
    replay: Replay, finish: str, status: str, provider_status: str, usage: Usage | None
) -> None:
    events = await run_against(
        replay, stream_of('{"type":"text-delta","id":"t","delta":"ok"}', finish)
    )
    end = finished(events)
    assert (end.status, end.provider_status, end.usage) == (status, provider_status, usage)
    assert text(events) == "ok"


async def test_it_ignores_unknown_chunks_and_text_that_is_not_a_string(replay: Replay) -> None:
    events = await run_against(
        replay,
        stream_of(
            '{"type":"text-delta","id":"t","delta":"kept"}',
            '{"type":"a-chunk-from-the-future","delta":"not text"}',
            '{"type":"text-delta","id":"t","delta":{"evil":true}}',
            '{"type":"text-delta","textDelta":["nope"]}',
            '"just a string"',
            "not json at all",
            '{"type":"reasoning-delta","id":"r","delta":"thinking"}',
            '{"type":"finish","finishReason":"stop"}',
        ),
    )
    assert text(events) == "kept"
    assert finished(events).status == COMPLETED


@pytest.mark.parametrize(
    ("chunk", "words"),
    [
        ('{"type":"error","error":{"message":"GPU out of memory"}}', "GPU out of memory"),
        ('{"type":"error"}', "gave no detail"),
        ('{"type":"error","errorText":42}', "gave no detail"),
        ('{"type":"error","errorText":"' + "a" * 2000 + '"}', "a" * 500 + "…"),
    ],
)
async def test_it_words_every_error_chunk_without_leaking_none_or_floods(
    replay: Replay, chunk: str, words: str
) -> None:
    end = finished(await run_against(replay, stream_of(chunk)))
    assert end.status == FAILED
    assert end.error is not None
    assert words in end.error
    assert "None" not in end.error
    assert len(end.error) < 700


# --- after a lost stream ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("native", "status"), [("completed", COMPLETED), ("aborted", STOPPED), ("error", FAILED)]
)
async def test_it_follows_a_lost_chat_through_stream_status(
    replay: Replay, native: str, status: str
) -> None:
    replay.on(
        "GET",
        "/api/ai/chat/run-7/stream-status",
        Answer.json({"status": "active", "isActive": True, "messageCount": 12}),
        Answer.json({"status": native, "isActive": False, "messageCount": 30}),
    )
    provider = box(replay)
    try:
        async with asyncio.timeout(10):
            events = [e async for e in provider.follow("run-7", {})]
    finally:
        await provider.aclose()
    assert events[0] == Running("active", progress="12")
    end = finished(events)
    assert (end.status, end.provider_status, end.via) == (status, native, "status")


# --- leaving the stream ------------------------------------------------------------------------


@contextmanager
def left_to_the_garbage_collector() -> Iterator[list[str]]:
    """The names of async generators finalised without having been closed (the loop's
    finalizer hook only sees those)."""
    names: list[str] = []
    hooks = sys.get_asyncgen_hooks()

    def finalizer(agen: Any) -> None:
        names.append(agen.ag_code.co_name)
        if hooks.finalizer is not None:
            hooks.finalizer(agen)

    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalizer)
    try:
        yield names
    finally:
        sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=hooks.finalizer)


async def test_it_closes_the_stream_it_returns_from_on_a_finish(replay: Replay) -> None:
    # The box holds the connection open after the finish; the client ends the run there.
    with left_to_the_garbage_collector() as abandoned:
        events = await run_against(replay, ui("ui_completion.sse", hold=True))
        gc.collect()
    assert finished(events).status == COMPLETED
    assert "start_stream" not in abandoned


async def test_it_leaves_none_of_our_stream_generators_to_the_garbage_collector(
    replay: Replay,
) -> None:
    with left_to_the_garbage_collector() as abandoned:
        await run_against(replay, ui("ui_completion.sse", hold=True))
        gc.collect()
    assert {"run", "start_stream", "sse"}.isdisjoint(abandoned)
