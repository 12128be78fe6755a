"""The xpander.ai client against the Agent Gateway's wire sequences, replayed over a real
socket (tests/fixtures/xpander/README.md names each one's source): a turn is over only when
its router and every sub-task it started have ended."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
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
)
from runs.providers.errors import ProviderError
from runs.providers.xpander import XpanderProvider
from tests.wire import Answer, Replay, event_of, finished, fixture

INVOKE = "/v1/agents/agt-1/gateway/invoke/stream"
CONV = "c0ffee00-1111-4222-8333-444455556666"
SUB = "5b7a5c00-aaaa-4bbb-8ccc-dddd0000eeee"
STATE = f"/v1/agents/agt-1/gateway/conversations/{CONV}/run-state"
STOP = f"/v1/agents/agt-1/gateway/conversations/{CONV}/stop"
ACK = (
    "I've started a background check of all 40 supplier contracts; "
    "I'll post the findings here when it's done."
)
CHILD_1 = "Contract 17 renews automatically on 1 March. "
CHILD = CHILD_1 + "3 of 40 contracts auto-renew: #4, #17, #31."


@pytest.fixture
async def xpander(replay: Replay) -> AsyncIterator[XpanderProvider]:
    provider = XpanderProvider(
        ProviderConfig(
            base_url=replay.url,
            api_key="k",
            options={"agent_id": "agt-1", "poll_interval": 0},
            allow_private=True,
        )
    )
    yield provider
    await provider.aclose()


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    # Bounded: a client that waits for an end the provider never sends fails, not hangs.
    async with asyncio.timeout(10):
        return [event async for event in events]


async def run_against(replay: Replay, xpander: XpanderProvider, body: bytes) -> list[Event]:
    replay.on("POST", INVOKE, Answer.sse(body))
    return await collect(xpander.run("Check our supplier contracts", {}))


def sse(name: str) -> bytes:
    return fixture(f"xpander/{name}")


def until(body: bytes, kind: str, nth: int = 1) -> bytes:
    """The stream cut right after its `nth` event of `kind` (the connection then closes)."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    seen = 0
    for index, event in enumerate(events):
        if json.loads(event.removeprefix(b"data: "))["type"] == kind:
            seen += 1
            if seen == nth:
                return b"\n\n".join(events[: index + 1]) + b"\n\n"
    raise AssertionError(f"no {kind} #{nth}")


def text(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, OutputDelta))


def task(
    id: str, status: str, *, result: str | None = None, subs: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "id": id,
        "status": status,
        "result": result,
        "parent_execution": None if id == CONV else CONV,
        "sub_executions": list(subs),
        "finished_sub_executions": [],
    }


def router_answered() -> dict[str, Any]:
    """The router's record once it has answered, its sub-task not listed as finished."""
    return task(CONV, "completed", result=ACK, subs=(SUB,))


def run_state(*, running: bool = False, child: str | None = None) -> Answer:
    return Answer.json(
        {
            "conversation_id": CONV,
            "is_running": running,
            "is_steerable": False,
            "steer_target": "none",
            "active_child_id": child,
            "queue_depth": 0,
            "queued_messages": [],
            "execution_status": "executing" if running else "completed",
            "conversation_state": "regular",
        }
    )


# --- The stream --------------------------------------------------------------------------------


async def test_it_reads_a_simple_turn(replay: Replay, xpander: XpanderProvider) -> None:
    events = await run_against(replay, xpander, sse("simple_turn.sse"))

    assert events[0] == Started(CONV, refs={"agent_id": "agt-1"})
    assert Running("executing") in events
    assert text(events) == "Paris has about 2.1 million residents."
    end = finished(events)
    assert (end.status, end.provider_status, end.via) == (COMPLETED, "completed", "stream")
    assert end.output == "Paris has about 2.1 million residents."
    (request,) = replay.received
    assert request.headers["x-api-key"] == "k"
    assert "authorization" not in request.headers
    assert request.json() == {"input": {"text": "Check our supplier contracts"}}


async def test_it_is_not_finished_at_the_routers_task_finished_while_a_sub_task_works(
    replay: Replay, xpander: XpanderProvider
) -> None:
    events = await run_against(replay, xpander, sse("async_subtask.sse"))

    end = finished(events)
    assert (end.status, end.provider_status, end.via) == (COMPLETED, "completed", "stream")
    # The router's answer, then the sub-task's text as its own paragraph.
    assert text(events) == f"{ACK}\n\n{CHILD}"
    assert end.output == f"{ACK}\n\n{CHILD}"
    # Between the router's answer and the end: the run says what it waits for.
    waiting = events.index(Running("completed; waiting for 1 sub-task", progress="2"))
    assert events.index(OutputDelta("\n\n")) == waiting + 2  # after "sub-task executing"
    assert events.index(OutputDelta(CHILD_1)) == waiting + 3
    assert xpander.known_children[CONV] == {SUB: "completed"}
    assert len(replay.received) == 1  # the stream said it all: no status reads


async def test_it_shows_sub_task_progress_as_changing_progress_markers(
    replay: Replay, xpander: XpanderProvider
) -> None:
    events = await run_against(replay, xpander, sse("async_subtask.sse"))

    reports = [(e.provider_status, e.progress) for e in events if isinstance(e, Running)]
    assert reports == [
        ("executing", None),
        ("sub-task triggered", "1"),
        ("sub-task pending", "2"),
        ("completed; waiting for 1 sub-task", "2"),
        ("sub-task executing", "3"),
        ("sub-task completed", "4"),
    ]


async def test_it_reads_sub_task_events_mirrored_under_the_routers_task_id(
    replay: Replay, xpander: XpanderProvider
) -> None:
    events = await run_against(replay, xpander, sse("async_subtask_mirrored.sse"))

    end = finished(events)
    assert end.status == COMPLETED
    # The sub-task's `task_created`/`task_finished` under the router's id are not the router's.
    assert end.provider_status == "completed"
    assert text(events) == f"{ACK}\n\n{CHILD}"
    assert end.output == f"{ACK}\n\n{CHILD}"


async def test_it_keeps_the_status_of_the_router_when_a_sub_task_fails_and_says_so(
    replay: Replay, xpander: XpanderProvider
) -> None:
    body = sse("async_subtask.sse")
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[1]
    failed = last.replace(b'"status":"completed"', b'"status":"failed"')
    events = await run_against(replay, xpander, body.replace(last, failed))

    assert Running("sub-task failed", progress="4") in events
    end = finished(events)
    assert (end.status, end.provider_status) == (COMPLETED, "completed; 1 sub-task failed")
    assert end.error is None


async def test_it_ends_a_stopped_turn_with_the_partial_text(
    replay: Replay, xpander: XpanderProvider
) -> None:
    events = await run_against(replay, xpander, sse("stopped_turn.sse"))

    end = finished(events)
    assert (end.status, end.provider_status, end.via) == (STOPPED, "stopped", "stream")
    first = "I've started a background check of all 40 supplier contracts; "
    assert end.output == f"{first}Checking the first "


async def test_it_ignores_the_events_of_a_drained_follow_up_turn(
    replay: Replay, xpander: XpanderProvider
) -> None:
    body = sse("async_subtask.sse")
    router_end = until(body, "task_finished")
    follow_up = "d1ed0000-2222-4333-8444-555566667777"
    other = (
        f'data: {{"type":"task_created","task_id":"{follow_up}","organization_id":"o",'
        f'"time":"2026-03-23T00:47:00Z","data":{{"id":"{follow_up}","status":"pending",'
        f'"parent_execution":null}}}}\n\n'
        f'data: {{"type":"chunk","task_id":"{follow_up}","organization_id":"o",'
        f'"time":"2026-03-23T00:47:01Z","data":"And the queued question."}}\n\n'
    ).encode()
    events = await run_against(replay, xpander, router_end + other + body[len(router_end) :])

    assert "queued question" not in text(events)
    assert finished(events).output == f"{ACK}\n\n{CHILD}"


async def test_it_settles_on_turn_finished_when_task_finished_comes_first(
    replay: Replay, xpander: XpanderProvider
) -> None:
    events = await run_against(replay, xpander, sse("turn_events.sse"))

    end = finished(events)
    assert end.status == COMPLETED
    assert end.output == "Paris has about 2.1 million residents (2024)."  # turn_finished's


async def test_it_does_not_take_task_finished_for_the_end_of_an_open_turn(
    replay: Replay, xpander: XpanderProvider
) -> None:
    events = await run_against(replay, xpander, until(sse("turn_events.sse"), "task_finished"))

    # The stream closed before turn_finished: the watcher follows the run through its status.
    assert events[-1] == StreamEnded()
    assert not any(isinstance(e, Finished) for e in events)


# --- A lost stream, followed through run-state and the task records ---------------------------


async def test_it_follows_a_lost_stream_until_the_sub_task_has_ended(
    replay: Replay, xpander: XpanderProvider
) -> None:
    events = await run_against(replay, xpander, until(sse("async_subtask.sse"), "task_finished"))
    assert events[-1] == StreamEnded()
    assert not any(isinstance(e, Finished) for e in events)

    # run-state: first the child shows as active; then nothing does, although the child's own
    # record still says it works (the reading where is_running ignores async sub-tasks).
    replay.on("GET", STATE, run_state(child=SUB), run_state())
    replay.on(
        "GET", f"/v1/tasks/{CONV}", Answer.json(task(CONV, "completed", result=ACK, subs=(SUB,)))
    )
    replay.on(
        "GET",
        f"/v1/tasks/{SUB}",
        Answer.json(task(SUB, "executing")),
        Answer.json(task(SUB, "completed", result=CHILD)),
    )
    followed = await collect(xpander.follow(CONV, {"agent_id": "agt-1"}))

    end = finished(followed)
    assert (end.status, end.provider_status, end.via) == (COMPLETED, "completed", "status")
    assert end.output == f"{ACK}\n\n{CHILD}"
    assert [event_of(Running, e).provider_status for e in followed[:-1]] == [
        "completed; waiting for sub-task",
        "completed; waiting for sub-task",
    ]
    assert len(replay.requests_to("GET", STATE)) == 3
    assert len(replay.requests_to("GET", f"/v1/tasks/{SUB}")) == 2


async def test_it_follows_a_sub_task_it_learns_only_from_the_routers_record(
    replay: Replay, xpander: XpanderProvider
) -> None:
    # A fresh process: nothing learned from a stream; run-state alone would say idle.
    replay.on("GET", STATE, run_state())
    replay.on(
        "GET", f"/v1/tasks/{CONV}", Answer.json(task(CONV, "completed", result=ACK, subs=(SUB,)))
    )
    replay.on(
        "GET",
        f"/v1/tasks/{SUB}",
        Answer.json(task(SUB, "pending")),
        Answer.json(task(SUB, "failed", result="The contracts share was unreachable.")),
    )
    followed = await collect(xpander.follow(CONV, {"agent_id": "agt-1"}))

    end = finished(followed)
    assert (end.status, end.provider_status) == (COMPLETED, "completed; 1 sub-task failed")
    assert end.output == f"{ACK}\n\nThe contracts share was unreachable."


async def test_it_waits_out_a_failing_status_read_while_following(
    replay: Replay, xpander: XpanderProvider
) -> None:
    busy = Answer.json({"detail": "Internal Server Error"}, status=500, **{"Retry-After": "0"})
    replay.on("GET", STATE, busy, busy, run_state())
    replay.on("GET", f"/v1/tasks/{CONV}", Answer.json(task(CONV, "completed", result=ACK)))

    followed = await collect(xpander.follow(CONV, {"agent_id": "agt-1"}))

    assert [type(e).__name__ for e in followed] == ["Waiting", "Finished"]  # one per episode
    assert finished(followed).output == ACK
    assert len(replay.requests_to("GET", STATE)) == 3


async def test_it_treats_a_sub_task_the_router_lists_as_finished_as_ended(
    replay: Replay, xpander: XpanderProvider
) -> None:
    record = task(CONV, "completed", result=ACK, subs=(SUB,))
    record["finished_sub_executions"] = [SUB]
    replay.on("GET", STATE, run_state())
    replay.on("GET", f"/v1/tasks/{CONV}", Answer.json(record))
    replay.on("GET", f"/v1/tasks/{SUB}", Answer.json({"detail": "Task not found"}, status=404))

    result = await xpander.status(CONV)

    assert (result.terminal, result.provider_status) == (COMPLETED, "completed")


async def test_it_reads_the_older_status_words_as_aliases(
    replay: Replay, xpander: XpanderProvider
) -> None:
    replay.on("GET", STATE, run_state())
    replay.on(
        "GET",
        f"/v1/tasks/{CONV}",
        Answer.json(task(CONV, "running")),
        Answer.json(task(CONV, "cancelled")),
    )
    assert (await xpander.status(CONV)).terminal is None
    assert (await xpander.status(CONV)).terminal == STOPPED


# --- Stop ---------------------------------------------------------------------------------------


async def test_it_confirms_a_stop_only_when_the_sub_task_has_ended(
    replay: Replay, xpander: XpanderProvider
) -> None:
    replay.on("POST", STOP, Answer.json({}))  # the documented 200 body: no fields at all
    replay.on("GET", STATE, run_state())
    replay.on(
        "GET", f"/v1/tasks/{CONV}", Answer.json(task(CONV, "completed", result=ACK, subs=(SUB,)))
    )
    replay.on(
        "GET",
        f"/v1/tasks/{SUB}",
        Answer.json(task(SUB, "executing")),
        Answer.json(task(SUB, "stopped", result="Contract 17 renews")),
    )

    answer = await xpander.stop(CONV, {})
    assert answer.terminal is None  # `{}` is an acceptance that proves nothing
    assert answer.provider_status == "stop accepted"
    (stop,) = replay.requests_to("POST", STOP)
    assert stop.json() == {"clear_queue": True}
    assert stop.headers["x-api-key"] == "k"

    # run-state says nothing runs, but the sub-task still works: not stopped yet.
    still = await xpander.status(CONV)
    assert (still.terminal, still.provider_status) == (None, "completed; waiting for sub-task")
    # Now the sub-task has stopped: the router had answered, the stop took its work.
    done = await xpander.status(CONV)
    assert (done.terminal, done.provider_status) == (STOPPED, "completed; sub-task stopped")


@pytest.mark.parametrize("answer", [{"stopped": False}, {"stopped": True}, []])
async def test_it_never_reads_the_stop_answers_fields(
    replay: Replay, xpander: XpanderProvider, answer: Any
) -> None:
    replay.on("POST", STOP, Answer.json(answer))

    result = await xpander.stop(CONV, {"clear_queue": False})

    assert result.terminal is None
    assert replay.requests_to("POST", STOP)[0].json() == {"clear_queue": False}
    assert replay.requests_to("GET", STATE) == []


def failed_turn() -> bytes:
    """A turn that streams some text, then its router fails with an error result."""
    return (
        until(sse("simple_turn.sse"), "chunk")
        + (
            f'data: {{"type":"task_finished","task_id":"{CONV}","organization_id":"o",'
            f'"time":"2026-03-23T00:47:00Z","data":{{"id":"{CONV}","status":"error",'
            f'"result":"Model provider timed out."}}}}\n\n'
        ).encode()
    )


async def test_it_reports_a_failed_router_with_its_result(
    replay: Replay, xpander: XpanderProvider
) -> None:
    end = finished(await run_against(replay, xpander, failed_turn()))
    assert (end.status, end.provider_status) == (FAILED, "error")
    assert end.error == "xpander.ai reported the turn error: Model provider timed out."


async def test_it_keeps_the_streamed_text_of_a_failed_router_not_its_error_result(
    replay: Replay, xpander: XpanderProvider
) -> None:
    # Found by the chaos soak: a failed turn's `result` is its error message, and taking it
    # for the run's final text threw away what had streamed (invariant 6).
    events = await run_against(replay, xpander, failed_turn())
    streamed = "".join(e.text for e in events if isinstance(e, OutputDelta))
    end = finished(events)
    assert streamed
    assert end.status == FAILED
    assert end.output is None  # the watcher keeps what streamed as the run's text
    assert "Model provider timed out." in (end.error or "")


# --- Ids in URL paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agent_id", ["../../../../internal/admin?x=", "agt/1", "..", "agt-1\r\nX-Evil: 1"]
)
async def test_it_refuses_an_agent_id_that_leaves_its_path_segment(
    replay: Replay, xpander: XpanderProvider, agent_id: str
) -> None:
    with pytest.raises(ProviderError) as error:
        await collect(xpander.run("Hello", {"agent_id": agent_id}))
    assert error.value.code == "VALIDATION_ERROR"
    assert "cannot be sent to xpander.ai" in error.value.message
    with pytest.raises(ProviderError) as error:
        await xpander.stop(CONV, {"agent_id": agent_id})
    assert error.value.code == "VALIDATION_ERROR"
    assert replay.received == []  # the key went nowhere


@pytest.mark.parametrize("conversation_id", ["../admin", "a/b", "c0ffee\x00", "c0ffee\x7f"])
async def test_it_refuses_a_conversation_id_that_leaves_its_path_segment(
    replay: Replay, xpander: XpanderProvider, conversation_id: str
) -> None:
    for call in (
        xpander.stop(conversation_id, {}),
        xpander.status(conversation_id),
        collect(xpander.follow(conversation_id, {"agent_id": "agt-1"})),
    ):
        with pytest.raises(ProviderError) as error:
            await call
        assert error.value.code == "VALIDATION_ERROR"
    assert replay.received == []


async def test_it_quotes_every_path_segment(replay: Replay, xpander: XpanderProvider) -> None:
    invoke = "/v1/agents/agt%201%3Fx%23y/gateway/invoke/stream"
    stop = "/v1/agents/agt-1/gateway/conversations/c%3Fd%20e/stop"
    replay.on("POST", re.escape(invoke), Answer.sse(b""))
    replay.on("POST", re.escape(stop), Answer.json({}))

    assert await collect(xpander.run("Hello", {"agent_id": "agt 1?x#y"})) == [StreamEnded()]
    await xpander.stop("c?d e", {})

    assert [r.path for r in replay.received] == [invoke, stop]


async def test_it_never_puts_a_sub_task_id_from_the_stream_into_a_url(
    replay: Replay, xpander: XpanderProvider
) -> None:
    body = sse("async_subtask.sse").replace(SUB.encode(), b"../../admin")
    events = await run_against(replay, xpander, until(body, "task_finished"))
    # A sub-task that cannot be looked up is not waited for.
    assert finished(events).status == COMPLETED

    replay.on("GET", STATE, run_state(child="../../admin"))
    replay.on(
        "GET", f"/v1/tasks/{CONV}", Answer.json(task(CONV, "completed", subs=("../../admin",)))
    )
    result = await xpander.status(CONV)

    assert result.terminal == COMPLETED
    assert all("admin" not in r.path for r in replay.received)


async def test_it_falls_back_to_the_documented_invoke_stream_when_the_gateway_path_is_unknown(
    replay: Replay, xpander: XpanderProvider
) -> None:
    """The gateway's run-turn-stream path is our assumption (its page does not show it); a
    gateway that does not know it answers 404 before anything starts, and the documented
    Invoke Agent stream takes the same body and streams the same events."""
    replay.on("POST", INVOKE, Answer.json({"detail": "Not Found"}, status=404))
    replay.on("POST", "/v1/agents/agt-1/invoke/stream", Answer.sse(sse("simple_turn.sse")))
    events = await collect(xpander.run("What is the population of Paris?", {}))
    assert finished(events).status == COMPLETED
    assert [r.path for r in replay.received] == [INVOKE, "/v1/agents/agt-1/invoke/stream"]
    assert replay.received[0].json() == replay.received[1].json()


async def test_an_unknown_agent_is_a_404_in_words_after_both_paths(
    replay: Replay, xpander: XpanderProvider
) -> None:
    replay.on("POST", ".*", Answer.json({"detail": "Agent not found"}, status=404))
    with pytest.raises(ProviderError) as refused:
        await collect(xpander.run("hi", {}))
    assert refused.value.code == "NOT_FOUND"
    assert "Agent not found" in refused.value.message
    assert len(replay.received) == 2


async def test_a_sub_task_that_completed_although_the_router_stopped_is_not_a_stopped_run(
    replay: Replay, xpander: XpanderProvider
) -> None:
    """The stop reached the router but not the work it handed on: the sub-task ran (and was
    billed) to its end, so the run did not stop, and Runbrake must not say it did."""
    events = [e for e in sse("stopped_turn.sse").split(b"\n\n") if e.strip()]
    body = b""
    for event in events:
        parsed = json.loads(event.removeprefix(b"data: "))
        if parsed["type"] == "sub_task_finished":
            parsed["data"]["status"] = "completed"
            parsed["data"]["is_manually_stopped"] = False
        body += b"data: " + json.dumps(parsed).encode() + b"\n\n"
    end = finished(await run_against(replay, xpander, body))
    assert end.status == COMPLETED
    assert "completed despite the stop" in end.provider_status


async def test_a_sub_tasks_text_forwarded_under_the_routers_id_is_kept_from_its_result(
    replay: Replay, xpander: XpanderProvider
) -> None:
    """Which task id a forwarded sub-task chunk carries is not published: here its first chunk
    comes under the router's id before the router finishes, and would be lost with the
    router's own text. The sub-task's finished record holds its whole text."""

    def ev(kind: str, data: Any) -> bytes:
        event = {"type": kind, "task_id": CONV, "organization_id": "o", "time": "t", "data": data}
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    sub = {"id": SUB, "parent_execution": CONV, "status": "executing"}
    body = (
        ev("task_created", {"id": CONV, "status": "pending"})
        + ev("chunk", "R1 ")
        + ev("chunk", "R2.")
        + ev("sub_task_created", sub)
        + ev("chunk", "X1 sub-task found. ")
        + ev(
            "task_finished",
            {"id": CONV, "status": "completed", "result": "R1 R2.", "sub_executions": [SUB]},
        )
        + ev("chunk", "X2 more. ")
        + ev(
            "sub_task_finished",
            {**sub, "status": "completed", "result": "X1 sub-task found. X2 more."},
        )
    )
    end = finished(await run_against(replay, xpander, body))
    assert end.status == COMPLETED
    assert end.output == "R1 R2.\n\nX1 sub-task found. X2 more."
