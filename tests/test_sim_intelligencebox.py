"""The IntelligenceBox simulator over real HTTP: chat stream, stop, stream-status, faults."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

KEY = "sim-box-key"
HEADERS = {"x-api-key": KEY}


@pytest.fixture
def box(sim: Any) -> str:
    return f"{sim.url}/sim/intelligencebox"


def chat_id() -> str:
    return f"run-{uuid.uuid4()}"


def body(prompt: str, cid: str, box: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "messages": [{"role": "user", "content": prompt}],
        "boxAddress": box,
        **extra,
    }


async def stream(
    client: httpx.AsyncClient, box: str, payload: dict[str, Any]
) -> list[dict[str, Any]]:
    """All parts of one chat stream, until the server closes it."""
    parts = []
    async with aconnect_sse(
        client, "POST", f"{box}/api/ai/chat", json=payload, headers=HEADERS
    ) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for event in source.aiter_sse():
            parts.append(json.loads(event.data))
    return parts


async def status_of(client: httpx.AsyncClient, box: str, cid: str) -> dict[str, Any]:
    r = await client.get(f"{box}/api/ai/chat/{cid}/stream-status", headers=HEADERS)
    assert r.status_code == 200
    return r.json()


async def wait_status(
    client: httpx.AsyncClient, box: str, cid: str, wanted: str, timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        current = await status_of(client, box, cid)
        if current["status"] == wanted or time.monotonic() > deadline:
            assert current["status"] == wanted, current
            return current
        await asyncio.sleep(0.05)


def text(parts: list[dict[str, Any]]) -> str:
    return "".join(p["textDelta"] for p in parts if p["type"] == "text-delta")


async def test_it_answers_health_without_a_key(box: str) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{box}/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_it_streams_a_completion_and_marks_it_completed(box: str, sim: Any) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        parts = await stream(
            client, box, body("Solar panels on barns sim:duration=0.5 sim:chunks=8", cid, box)
        )
        final = await status_of(client, box, cid)
    assert [p["type"] for p in parts] == ["text-delta"] * 8 + ["finish"]
    assert parts[-1]["finishReason"] == "stop"
    assert set(parts[-1]["usage"]) == {"promptTokens", "completionTokens", "totalTokens"}
    answer = text(parts)
    assert "Solar panels on barns" in answer
    assert "sim:" not in answer
    assert len(answer) > 300
    assert final["status"] == "completed"
    assert final["isActive"] is False
    assert final["messageCount"] == 9
    assert final["startTime"].endswith("Z")
    assert final["lastActivity"] >= final["startTime"]
    logged = [r for r in sim.requests("intelligencebox") if r["path"].endswith("/api/ai/chat")]
    assert any(r["body"]["id"] == cid for r in logged)


async def test_it_accepts_a_bearer_key_and_takes_directives_from_the_last_user_message(
    box: str,
) -> None:
    cid = chat_id()
    payload = {
        "id": cid,
        "boxAddress": box,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Old question sim:fail=error"},
            {"role": "assistant", "content": "Old answer."},
            {"role": "user", "content": "Tea gardens sim:duration=0.3 sim:chunks=3"},
        ],
    }
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream(
            "POST",
            f"{box}/api/ai/chat",
            json=payload,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as r,
    ):
        assert r.status_code == 200
        raw = "".join([chunk async for chunk in r.aiter_text()])
    lines = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: ")]
    assert [p["type"] for p in lines] == ["text-delta"] * 3 + ["finish"]
    assert "Tea gardens" in text(lines)


async def test_it_rejects_bad_keys(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient() as client:
        for headers in ({}, {"x-api-key": "key-real-one"}, {"Authorization": "Bearer nope"}):
            r = await client.post(f"{box}/api/ai/chat", json=body("x", cid, box), headers=headers)
            assert r.status_code == 401
            assert r.json() == {"error": "Unauthorized"}
        r = await client.post(f"{box}/api/ai/chat/{cid}/stop", headers={"x-api-key": "bad"})
        assert r.status_code == 401
        r = await client.get(f"{box}/api/ai/chat/{cid}/stream-status")
        assert r.status_code == 401
        r = await client.get(f"{box}/api/public/assistants")
        assert r.status_code == 401


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "boxAddress": "b"}, "id"),
        ({"id": 7, "messages": [{"role": "user", "content": "x"}], "boxAddress": "b"}, "id"),
        ({"id": "a", "boxAddress": "b"}, "messages"),
        ({"id": "a", "messages": [], "boxAddress": "b"}, "messages"),
        ({"id": "a", "messages": [{"role": "bot", "content": "x"}], "boxAddress": "b"}, "role"),
        ({"id": "a", "messages": [{"role": "user", "content": 3}], "boxAddress": "b"}, "content"),
        ({"id": "a", "messages": [{"role": "user", "content": "x"}]}, "boxAddress"),
        (
            {"id": "a", "messages": [{"role": "user", "content": "x"}], "boxAddress": 1},
            "boxAddress",
        ),
    ],
)
async def test_it_validates_the_chat_request(box: str, payload: dict[str, Any], field: str) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{box}/api/ai/chat", json=payload, headers=HEADERS)
    assert r.status_code == 400
    assert field in r.json()["error"]


async def test_it_rejects_a_body_that_is_not_json(box: str) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{box}/api/ai/chat",
            content=b"{not json",
            headers={**HEADERS, "Content-Type": "application/json"},
        )
    assert r.status_code == 400
    assert "error" in r.json()


async def test_it_stops_mid_stream_without_finish_and_keeps_the_partial_text(box: str) -> None:
    cid = chat_id()
    parts: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(
            client,
            "POST",
            f"{box}/api/ai/chat",
            json=body("Long essay sim:duration=30", cid, box),
            headers=HEADERS,
        ) as source:
            events = source.aiter_sse()
            for _ in range(3):
                parts.append(json.loads((await anext(events)).data))
            running = await status_of(client, box, cid)
            assert running["status"] == "active"
            assert running["isActive"] is True
            assert running["messageCount"] >= 3
            r = await client.post(f"{box}/api/ai/chat/{cid}/stop", headers=HEADERS)
            assert r.status_code == 200
            assert r.json() == {"success": True, "message": "Stream stopped successfully"}
            async with asyncio.timeout(10):
                parts.extend([json.loads(e.data) async for e in events])
        assert all(p["type"] == "text-delta" for p in parts)
        assert 3 <= len(parts) < 450
        assert text(parts).startswith("## Long essay")
        final = await status_of(client, box, cid)
        assert final["status"] == "aborted"
        assert final["isActive"] is False
        assert final["messageCount"] == len(parts)
        # A second stop finds nothing to stop.
        again = await client.post(f"{box}/api/ai/chat/{cid}/stop", headers=HEADERS)
        assert again.status_code == 404
        assert again.json() == {"success": False, "message": "No active stream found"}


async def test_it_answers_stop_for_finished_and_unknown_ids_with_no_active_stream(
    box: str,
) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        await stream(client, box, body("Quick sim:duration=0.2 sim:chunks=2", cid, box))
        for target in (cid, "never-seen"):
            r = await client.post(f"{box}/api/ai/chat/{target}/stop", headers=HEADERS)
            assert r.status_code == 404
            assert r.json() == {"success": False, "message": "No active stream found"}
        assert (await status_of(client, box, cid))["status"] == "completed"


async def test_it_reports_unknown_ids_as_not_found(box: str) -> None:
    async with httpx.AsyncClient() as client:
        assert await status_of(client, box, "no-such-chat") == {
            "status": "not_found",
            "isActive": False,
        }


async def test_it_forgets_terminal_records_after_the_keep_time(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        await stream(
            client, box, body("Brief sim:duration=0.1 sim:chunks=1 sim:keep=0.2", cid, box)
        )
        assert (await status_of(client, box, cid))["status"] == "completed"
        await wait_status(client, box, cid, "not_found", timeout=5)


async def test_it_ignores_stops_with_stop_ignore(box: str) -> None:
    cid = chat_id()
    parts: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(
            client,
            "POST",
            f"{box}/api/ai/chat",
            json=body("Stubborn sim:stop=ignore sim:duration=1 sim:chunks=10", cid, box),
            headers=HEADERS,
        ) as source:
            events = source.aiter_sse()
            parts.append(json.loads((await anext(events)).data))
            r = await client.post(f"{box}/api/ai/chat/{cid}/stop", headers=HEADERS)
            assert r.json() == {"success": True, "message": "Stream stopped successfully"}
            assert (await status_of(client, box, cid))["status"] == "active"
            parts.extend([json.loads(e.data) async for e in events])
        assert [p["type"] for p in parts] == ["text-delta"] * 10 + ["finish"]
        assert (await status_of(client, box, cid))["status"] == "completed"


async def test_it_ends_the_stream_late_with_stop_slow(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(
            client,
            "POST",
            f"{box}/api/ai/chat",
            json=body("Slow sim:stop=slow sim:stop_delay=3 sim:duration=20", cid, box),
            headers=HEADERS,
        ) as source:
            events = source.aiter_sse()
            await anext(events)
            r = await client.post(f"{box}/api/ai/chat/{cid}/stop", headers=HEADERS)
            assert r.json()["success"] is True
            stopped_at = time.monotonic()
            assert (await status_of(client, box, cid))["status"] == "active"
            rest = [json.loads(e.data) async for e in events]
            waited = time.monotonic() - stopped_at
        # Only a lower bound: "late" is provable on a busy machine, "on time" is not.
        assert waited >= 2.5
        assert rest
        assert all(p["type"] == "text-delta" for p in rest)
        assert (await status_of(client, box, cid))["status"] == "aborted"


async def test_it_drops_the_stream_but_keeps_generating(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        parts = await stream(
            client, box, body("Dropped sim:drop_stream sim:duration=1 sim:chunks=10", cid, box)
        )
        assert [p["type"] for p in parts] == ["text-delta"] * 5
        assert (await status_of(client, box, cid))["status"] == "active"
        done = await wait_status(client, box, cid, "completed")
    assert done["messageCount"] == 11


async def test_it_fails_the_first_three_calls_with_rate_limit_then_streams(box: str) -> None:
    cid = chat_id()
    payload = body(f"Busy box {cid} sim:fail=rate_limit sim:duration=0.2 sim:chunks=2", cid, box)
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(3):
            r = await client.post(f"{box}/api/ai/chat", json=payload, headers=HEADERS)
            assert r.status_code == 429
            assert r.headers["Retry-After"] == "1"
            assert "error" in r.json()
        assert (await status_of(client, box, cid))["status"] == "not_found"
        parts = await stream(client, box, payload)
        assert parts[-1]["type"] == "finish"
        assert (await status_of(client, box, cid))["status"] == "completed"


async def test_it_fails_the_first_three_calls_with_server_error(box: str) -> None:
    cid = chat_id()
    payload = body(f"Broken box {cid} sim:fail=server_error sim:duration=0.2", cid, box)
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(3):
            r = await client.post(f"{box}/api/ai/chat", json=payload, headers=HEADERS)
            assert r.status_code == 500
            assert "error" in r.json()
        parts = await stream(client, box, payload)
    assert parts[-1]["type"] == "finish"


async def test_it_fails_mid_stream_with_an_error_event(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        parts = await stream(
            client, box, body("Doomed sim:fail=error sim:duration=0.5 sim:chunks=6", cid, box)
        )
        final = await status_of(client, box, cid)
    assert [p["type"] for p in parts] == ["text-delta"] * 3 + ["error"]
    assert parts[-1] == {"type": "error", "error": "Model unavailable"}
    assert final["status"] == "error"
    assert final["isActive"] is False


async def test_it_overwrites_an_active_id_leaving_the_older_stream_unreachable(
    box: str,
) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(
            client,
            "POST",
            f"{box}/api/ai/chat",
            json=body("First sim:duration=1.5 sim:chunks=15", cid, box),
            headers=HEADERS,
        ) as first:
            older = first.aiter_sse()
            await anext(older)
            second = await stream(
                client, box, body("Second sim:duration=0.1 sim:chunks=1", cid, box)
            )
            assert "Second" in text(second)
            # The registry now shows the newer, finished chat: nothing left to stop.
            assert (await status_of(client, box, cid))["status"] == "completed"
            r = await client.post(f"{box}/api/ai/chat/{cid}/stop", headers=HEADERS)
            assert r.json()["success"] is False
            rest = [json.loads(e.data) async for e in older]
        assert rest[-1]["type"] == "finish"


async def test_it_emits_tool_parts_for_knowledge_base_chats(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        folders = (await client.get(f"{box}/api/public/vectors", headers=HEADERS)).json()
        vector_id = folders["vectors"][0]["id"]
        parts = await stream(
            client,
            box,
            body("Policies sim:duration=0.2 sim:chunks=2", cid, box, vector=[vector_id]),
        )
    assert [p["type"] for p in parts] == [
        "tool-call",
        "tool-result",
        "text-delta",
        "text-delta",
        "finish",
    ]
    assert parts[0]["toolCallId"] == parts[1]["toolCallId"]
    assert parts[1]["args"]["vectorIds"] == [vector_id]


async def test_it_serves_the_discovery_endpoints(box: str) -> None:
    async with httpx.AsyncClient() as client:
        listed = (await client.get(f"{box}/api/public/assistants", headers=HEADERS)).json()
        first = listed["assistants"][0]
        assert {"id", "name", "handle", "vectorIds", "vectors", "createdAt"} <= set(first)
        one = await client.get(f"{box}/api/public/assistants/{first['id']}", headers=HEADERS)
        assert one.json()["assistant"]["builtInTools"]["webSearch"] is True
        missing = await client.get(f"{box}/api/public/assistants/nope", headers=HEADERS)
        assert missing.status_code == 404
        vectors = (await client.get(f"{box}/api/public/vectors", headers=HEADERS)).json()
        vid = vectors["vectors"][0]["id"]
        detail = (await client.get(f"{box}/api/public/vectors/{vid}", headers=HEADERS)).json()
        assert detail["vector"]["topK"] == 5


async def test_it_aborts_generation_when_the_client_disconnects(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(
            client,
            "POST",
            f"{box}/api/ai/chat",
            json=body("Abandoned sim:duration=30", cid, box),
            headers=HEADERS,
        ) as source:
            await anext(source.aiter_sse())
        # Leaving the block closed the connection mid-stream.
        final = await wait_status(client, box, cid, "aborted", timeout=5)
    assert final["isActive"] is False


# --- sim:format=ui: the AI SDK UI message stream ---------------------------------------------


async def raw_stream(
    client: httpx.AsyncClient, box: str, payload: dict[str, Any]
) -> tuple[httpx.Headers, list[str]]:
    """The response headers and the raw SSE frames (blank-line separated) of one chat."""
    async with client.stream("POST", f"{box}/api/ai/chat", json=payload, headers=HEADERS) as r:
        assert r.status_code == 200
        raw = "".join([chunk async for chunk in r.aiter_text()])
    # Every frame, [DONE] included, is one `data:` line and a blank line.
    assert raw.endswith("\n\n")
    return r.headers, raw.removesuffix("\n\n").split("\n\n")


def chunks_of(frames: list[str]) -> list[dict[str, Any]]:
    """The JSON chunks of UI stream frames, checking they are written as the SDK writes them
    (`data: ` + compact JSON, one line)."""
    parts = []
    for frame in frames:
        assert frame.startswith("data: ")
        assert "\n" not in frame
        part = json.loads(frame[6:])
        assert frame[6:] == json.dumps(part, separators=(",", ":"))
        parts.append(part)
    return parts


def ui_text(parts: list[dict[str, Any]]) -> str:
    return "".join(p["delta"] for p in parts if p["type"] == "text-delta")


async def test_it_speaks_the_ui_message_stream_with_format_ui(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        headers, frames = await raw_stream(
            client,
            box,
            body("Harbour cranes sim:format=ui sim:duration=0.4 sim:chunks=4", cid, box),
        )
        final = await status_of(client, box, cid)
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert frames[-1] == "data: [DONE]"
    parts = chunks_of(frames[:-1])
    assert [p["type"] for p in parts] == [
        "start",
        "start-step",
        "text-start",
        *["text-delta"] * 4,
        "text-end",
        "finish-step",
        "finish",
    ]
    block = parts[2]["id"]
    assert all(p["id"] == block for p in parts[2:8])
    assert all(set(p) == {"type", "id", "delta"} for p in parts[3:7])
    assert parts[-1] == {"type": "finish", "finishReason": "stop"}
    assert ui_text(parts).startswith("## Harbour cranes")
    assert final["status"] == "completed"
    assert final["messageCount"] == len(parts)


async def test_it_keeps_the_legacy_format_by_default_and_with_format_legacy(box: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for prompt in ("Plain sim:duration=0.2 sim:chunks=2", "Old sim:format=legacy sim:chunks=2"):
            headers, frames = await raw_stream(
                client, box, body(f"{prompt} sim:duration=0.2", chat_id(), box)
            )
            assert "x-vercel-ai-ui-message-stream" not in headers
            assert "data: [DONE]" not in frames
            assert [p["type"] for p in chunks_of(frames)] == ["text-delta"] * 2 + ["finish"]


async def test_it_ends_a_stopped_ui_stream_with_abort_then_done(box: str) -> None:
    cid = chat_id()
    seen: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(
            client,
            "POST",
            f"{box}/api/ai/chat",
            json=body("Long essay sim:format=ui sim:duration=30", cid, box),
            headers=HEADERS,
        ) as source:
            events = source.aiter_sse()
            while seen.count("text-delta") < 2:
                seen.append(json.loads((await anext(events)).data)["type"])
            r = await client.post(f"{box}/api/ai/chat/{cid}/stop", headers=HEADERS)
            assert r.json() == {"success": True, "message": "Stream stopped successfully"}
            async with asyncio.timeout(10):
                rest = [e.data async for e in events]
        final = await status_of(client, box, cid)
    assert rest[-1] == "[DONE]"
    tail = [json.loads(data) for data in rest[:-1]]
    assert tail[-1] == {"type": "abort", "reason": "This operation was aborted"}
    # The abort is the last chunk: no text-end, finish-step or finish anywhere.
    assert {p["type"] for p in tail[:-1]} <= {"text-delta"}
    assert final["status"] == "aborted"
    assert final["messageCount"] == len(seen) + len(tail)


async def test_it_sends_error_then_a_finish_with_reason_error_in_the_ui_stream(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        _, frames = await raw_stream(
            client,
            box,
            body("Doomed sim:format=ui sim:fail=error sim:duration=0.5 sim:chunks=6", cid, box),
        )
        final = await status_of(client, box, cid)
    assert frames[-1] == "data: [DONE]"
    parts = chunks_of(frames[:-1])
    assert [p["type"] for p in parts] == [
        "start",
        "start-step",
        "text-start",
        *["text-delta"] * 3,
        "error",
        "finish-step",
        "finish",
    ]
    assert parts[-3] == {"type": "error", "errorText": "Model unavailable"}
    assert parts[-1] == {"type": "finish", "finishReason": "error"}
    assert final["status"] == "error"


async def test_it_sends_tool_pairs_in_their_own_step_in_the_ui_stream(box: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        _, frames = await raw_stream(
            client,
            box,
            body("Ports sim:format=ui sim:tools sim:duration=0.2 sim:chunks=2", chat_id(), box),
        )
    parts = chunks_of(frames[:-1])
    assert [p["type"] for p in parts] == [
        "start",
        "start-step",
        "tool-input-available",
        "tool-output-available",
        "finish-step",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    call, result = parts[2], parts[3]
    assert call["toolCallId"] == result["toolCallId"]
    assert call["toolName"] == "webSearch"
    assert call["input"] == {"query": "Ports"}
    assert "results" in result["output"]


async def test_it_drops_a_ui_stream_without_done(box: str) -> None:
    cid = chat_id()
    async with httpx.AsyncClient(timeout=10) as client:
        _, frames = await raw_stream(
            client,
            box,
            body("Dropped sim:format=ui sim:drop_stream sim:duration=1 sim:chunks=10", cid, box),
        )
        assert (await status_of(client, box, cid))["status"] == "active"
        await wait_status(client, box, cid, "completed")
    assert "data: [DONE]" not in frames
    parts = chunks_of(frames)
    assert [p["type"] for p in parts][-5:] == ["text-delta"] * 5
    assert "finish" not in {p["type"] for p in parts}
