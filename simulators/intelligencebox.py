"""A faithful IntelligenceBox Box Server chat API (shared/providers/intelligencebox.md §5),
served over real HTTP.

The chat stream speaks one of two formats (`sim:format=`): `legacy`, the default, is the SSE
of AI SDK v4 stream parts that the box's docs show (`text-delta` with `textDelta`); `ui` is the
AI SDK v5+ UI message stream its current docs point to, framed as the SDK writes it.

The box keys streams by the *client's* chat id in a registry that the stop and
stream-status endpoints read. Generation runs as an asyncio task per chat that appends
stream parts to the chat's state; the HTTP response only replays those parts. That split is
what lets a dropped connection (`sim:drop_stream`) leave the chat generating, and lets an
overwritten id leave the older stream running but unreachable, as the contract describes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from .core import (
    Directives,
    TransientFaults,
    bearer_key,
    json_response,
    key_is_valid,
    parse_body,
    record,
)

PROVIDER = "intelligencebox"
DEFAULT_DURATION = 20.0
CHUNKS_PER_SECOND = 15
MAX_CHUNKS = 20_000
TERMINAL_TTL = 600.0  # terminal records stay queryable for 10 minutes (contract Assumption)
ROLES = ("user", "assistant", "system")

faults = TransientFaults()


class Legacy:
    """AI SDK v4 `fullStream` parts as SSE, as the box's docs and Postman collection show
    them (the error's and tools' fields and `usage` are the contract's Assumptions)."""

    name = "legacy"
    headers: dict[str, str] = {}
    # The SSE stream simply ends; the docs show no end marker.
    closing = b""

    def opening(self) -> list[dict[str, Any]]:
        return []

    def tool_call(self, call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"type": "tool-call", "toolCallId": call_id, "toolName": name, "args": args}

    def tool_result(
        self, call_id: str, name: str, args: dict[str, Any], result: Any
    ) -> dict[str, Any]:
        return {
            "type": "tool-result",
            "toolCallId": call_id,
            "toolName": name,
            "args": args,
            "result": result,
        }

    def next_step(self) -> list[dict[str, Any]]:
        return []

    def text_start(self) -> list[dict[str, Any]]:
        return []

    def text(self, chunk: str) -> dict[str, Any]:
        return {"type": "text-delta", "textDelta": chunk}

    def failure(self, message: str) -> list[dict[str, Any]]:
        # Contract Assumption: the error ends the stream.
        return [{"type": "error", "error": message}]

    def finish(self, usage: dict[str, int]) -> list[dict[str, Any]]:
        return [{"type": "finish", "finishReason": "stop", "usage": usage}]

    def abort(self) -> list[dict[str, Any]]:
        # Contract Assumption: a stopped chat's stream ends with no terminal part.
        return []


class UiMessageStream:
    """The AI SDK v5+ UI message stream as `streamText(...).toUIMessageStreamResponse()`
    writes it (vercel/ai ai@6.0.264: packages/ai/src/generate-text/stream-text.ts,
    ui-message-stream/json-to-sse-transform-stream.ts, ui-message-stream-headers.ts)."""

    name = "ui"
    # UI_MESSAGE_STREAM_HEADERS, less `connection: keep-alive`, which the HTTP server owns.
    headers = {"x-vercel-ai-ui-message-stream": "v1"}
    # JsonToSseTransformStream.flush: written whenever the stream closes normally.
    closing = b"data: [DONE]\n\n"
    text_id = "txt-0"

    def opening(self) -> list[dict[str, Any]]:
        # No messageId or metadata: the SDK adds them only when the server asks for them.
        return [{"type": "start"}, {"type": "start-step"}]

    def tool_call(self, call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "tool-input-available",
            "toolCallId": call_id,
            "toolName": name,
            "input": args,
        }

    def tool_result(
        self, call_id: str, name: str, args: dict[str, Any], result: Any
    ) -> dict[str, Any]:
        return {"type": "tool-output-available", "toolCallId": call_id, "output": result}

    def next_step(self) -> list[dict[str, Any]]:
        # The tool results go back to the model, whose next step writes the answer.
        return [{"type": "finish-step"}, {"type": "start-step"}]

    def text_start(self) -> list[dict[str, Any]]:
        return [{"type": "text-start", "id": self.text_id}]

    def text(self, chunk: str) -> dict[str, Any]:
        return {"type": "text-delta", "id": self.text_id, "delta": chunk}

    def failure(self, message: str) -> list[dict[str, Any]]:
        # An in-band model error is not the end: the step and the message still finish
        # (stream-text.test.ts snapshots). Assumption (ours): the box passes the real message
        # on rather than the SDK's default "An error occurred.".
        return [
            {"type": "error", "errorText": message},
            {"type": "finish-step"},
            {"type": "finish", "finishReason": "error"},
        ]

    def finish(self, usage: dict[str, int]) -> list[dict[str, Any]]:
        # No usage: the SDK sends it only if the server adds it as message metadata.
        return [
            {"type": "text-end", "id": self.text_id},
            {"type": "finish-step"},
            {"type": "finish", "finishReason": "stop"},
        ]

    def abort(self) -> list[dict[str, Any]]:
        # What streamText enqueues when its abort signal fires, the stream's last chunk
        # (no text-end, finish-step or finish); the reason of a bare AbortController.abort().
        return [{"type": "abort", "reason": "This operation was aborted"}]


WIRES: dict[str, Legacy | UiMessageStream] = {"legacy": Legacy(), "ui": UiMessageStream()}


def iso_z(epoch: float) -> str:
    """The documented timestamp form, `2024-01-15T10:30:05.123Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Chat:
    chat_id: str
    prompt: str
    directives: Directives
    chunks: list[str]
    prompt_tokens: int
    tools: list[tuple[str, dict[str, Any], Any]] = field(default_factory=list)
    wire: Legacy | UiMessageStream = field(default_factory=Legacy)
    status: str = "active"
    start_time: float = field(default_factory=time.time)
    last_activity: float = 0.0
    ended_at: float | None = None
    parts: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.last_activity = self.start_time

    @property
    def done(self) -> bool:
        return self.status != "active"

    @property
    def interval(self) -> float:
        return self.directives.number("duration", DEFAULT_DURATION) / max(1, len(self.chunks))

    @property
    def keep(self) -> float:
        return self.directives.number("keep", TERMINAL_TTL, hi=86_400)

    def notify(self) -> None:
        # A fresh Event per change: readers grab the current one and wait on it, so no
        # wake-up is lost and no lock is needed (callers may be plain loop callbacks).
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def emit(self, part: dict[str, Any]) -> bool:
        if self.done:
            return False
        self.parts.append(part)
        self.last_activity = time.time()
        self.notify()
        return True

    def end(self, status: str) -> None:
        if self.done:
            return
        self.status = status
        self.ended_at = time.time()
        self.notify()

    def abort(self) -> None:
        """What the box's AbortController does: generation stops now, without `finish`."""
        if self.done:
            return
        self.aborted()
        if self.task is not None:
            self.task.cancel()

    def aborted(self) -> None:
        """Generation was aborted: the wire's last words (if any), then status `aborted`."""
        if self.done:
            return
        for part in self.wire.abort():
            self.emit(part)
        self.end("aborted")

    def as_status(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "isActive": self.status == "active",
            "startTime": iso_z(self.start_time),
            "lastActivity": iso_z(self.last_activity),
            "messageCount": len(self.parts),
        }


# The box's stream registry: chat id -> the chat that currently owns that id.
registry: dict[str, Chat] = {}
# Strong references to the generation tasks (the loop keeps only weak ones), including those
# of chats whose id was taken over by a newer chat.
_tasks: set[asyncio.Task[None]] = set()


def _prune() -> None:
    now = time.time()
    for chat_id, chat in list(registry.items()):
        if chat.ended_at is not None and now - chat.ended_at > chat.keep:
            del registry[chat_id]


# --- generation ---------------------------------------------------------------------------


async def _generate(chat: Chat) -> None:
    """Produce the chat's parts at the requested pace, independent of any HTTP reader."""
    wire = chat.wire
    try:
        delay = chat.directives.number("delay", 0.0)
        if delay:
            await asyncio.sleep(delay)
        for part in wire.opening():
            chat.emit(part)
        for n, (name, args, result) in enumerate(chat.tools, start=1):
            call_id = f"call_{n}"
            chat.emit(wire.tool_call(call_id, name, args))
            await asyncio.sleep(min(chat.interval, 0.2))
            chat.emit(wire.tool_result(call_id, name, args, result))
        if chat.tools:
            for part in wire.next_step():
                chat.emit(part)
        for part in wire.text_start():
            chat.emit(part)
        total = len(chat.chunks)
        fail_after = max(1, total // 2) if chat.directives.get("fail") == "error" else None
        for index, chunk in enumerate(chat.chunks, start=1):
            if not chat.emit(wire.text(chunk)):
                return
            if index == fail_after:
                for part in wire.failure("Model unavailable"):
                    chat.emit(part)
                chat.end("error")
                return
            await asyncio.sleep(chat.interval)
        completion = max(1, len("".join(chat.chunks)) // 4)
        usage = {
            "promptTokens": chat.prompt_tokens,
            "completionTokens": completion,
            "totalTokens": chat.prompt_tokens + completion,
        }
        for part in wire.finish(usage):
            chat.emit(part)
        chat.end("completed")
    except asyncio.CancelledError:
        # Cancelled by a stop (already marked aborted) or by server shutdown.
        chat.aborted()
        raise


def _frame(part: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(part, separators=(',', ':'))}\n\n".encode()


async def _replay(chat: Chat) -> AsyncIterator[bytes]:
    """The HTTP side: replay the chat's parts as SSE until the chat ends (or the connection
    is dropped on purpose). An aborted chat ends here with no `finish` (after `abort` and
    `[DONE]` in the UI message stream)."""
    drop_after = max(1, len(chat.chunks) // 2) if "drop_stream" in chat.directives.values else 0
    sent = deltas = 0
    over = False
    try:
        while True:
            while sent < len(chat.parts):
                part = chat.parts[sent]
                sent += 1
                yield _frame(part)
                if part["type"] == "text-delta":
                    deltas += 1
                    if deltas == drop_after:
                        # sim:drop_stream: the connection ends with no terminal event while
                        # the chat keeps generating server-side.
                        over = True
                        return
            if chat.done:
                over = True
                if chat.wire.closing:
                    yield chat.wire.closing
                return
            await chat._changed.wait()
    finally:
        # The client went away mid-stream (the generator was closed or cancelled): like a
        # request-bound AbortController, that aborts generation. Only the on-purpose drop
        # above keeps it going, and a box that ignores stops ignores this too.
        if not over and chat.directives.get("stop") != "ignore":
            chat.abort()


# --- text -----------------------------------------------------------------------------------

TOKEN = re.compile(r"\S+\s*")


def topic_of(prompt: str) -> str:
    words = [w for w in prompt.split() if not w.startswith("sim:")]
    return " ".join(words)[:120].strip() or "your question"


def answer_chunks(prompt: str, count: int) -> list[str]:
    """A deterministic Markdown answer about the prompt's topic, cut into `count` chunks."""
    topic = topic_of(prompt)
    text = (
        f"## {topic}\n\n"
        f"Here is a short overview of **{topic}**, based on the documents on this box.\n\n"
        "1. **Context** - the question touches several connected areas, so it helps to "
        "separate the facts from the open points first.\n"
        "2. **Key facts** - the most reliable sources agree on the main figures; the newer "
        "reports add detail but do not change the picture.\n"
        "3. **Open points** - a few details depend on assumptions that are worth checking "
        "with the people who own the data.\n\n"
        "In short: start from the key facts, keep the open points visible, and revisit them "
        "when new material arrives.\n"
    )
    extra = 0
    while len(TOKEN.findall(text)) < count:
        extra += 1
        text += (
            f"\n### Further note {extra}\n\nAnother angle on {topic}: the same sources "
            "suggest reviewing the assumptions one by one, comparing them with recent "
            "figures, and writing down what changed and why it matters.\n"
        )
    tokens = TOKEN.findall(text)
    # Spread the tokens evenly over `count` non-empty chunks.
    base, rest = divmod(len(tokens), count)
    chunks, start = [], 0
    for i in range(count):
        size = base + (1 if i < rest else 0)
        chunks.append("".join(tokens[start : start + size]))
        start += size
    return chunks


# --- HTTP -----------------------------------------------------------------------------------


def fail(status: int, message: str, **headers: str) -> JsonResponse:
    return json_response({"error": message}, status, **headers)


def _api_key(request: HttpRequest) -> str:
    return request.headers.get("x-api-key", "").strip() or bearer_key(request)


def _guard(request: HttpRequest, method: str) -> JsonResponse | None:
    """Log the call, then the checks every authenticated endpoint makes: method, key."""
    key = _api_key(request)
    record(PROVIDER, request, key)
    if request.method != method:
        return fail(405, "Method not allowed")
    if not key_is_valid(key):
        return fail(401, "Unauthorized")
    return None


def _fault(identity: Any, directives: Directives) -> JsonResponse | None:
    kind = directives.get("fail")
    if not faults.take(identity, kind):
        return None
    if kind == "rate_limit":
        return fail(429, "Too many requests", Retry_After="1")
    return fail(500, "Internal server error")


def _validate(body: Any) -> str | None:
    """The error message for a malformed chat request, or None."""
    if not isinstance(body, dict):
        return "Request body must be a JSON object"
    if not isinstance(body.get("id"), str) or not body["id"].strip():
        return "id is required and must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages is required and must be a non-empty array"
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            return "each message needs a role (user, assistant or system) and a string content"
    if not isinstance(body.get("boxAddress"), str) or not body["boxAddress"].strip():
        return "boxAddress is required and must be a string"
    if "assistantId" in body and not isinstance(body["assistantId"], str | None):
        return "assistantId must be a string"
    vector = body.get("vector")
    if vector is not None and (
        not isinstance(vector, list) or not all(isinstance(v, str) for v in vector)
    ):
        return "vector must be an array of strings"
    return None


def _tools(
    prompt: str, directives: Directives, body: dict[str, Any]
) -> list[tuple[str, dict[str, Any], Any]]:
    """Informational tool parts: a knowledge-base search when folders are given (RAG), a
    web search on `sim:tools`."""
    tools: list[tuple[str, dict[str, Any], Any]] = []
    topic = topic_of(prompt)
    if body.get("vector"):
        tools.append(
            (
                "searchKnowledgeBase",
                {"query": topic, "vectorIds": body["vector"]},
                {"documents": [{"title": f"Notes on {topic}", "score": 0.87}]},
            )
        )
    if "tools" in directives.values:
        tools.append(
            (
                "webSearch",
                {"query": topic},
                {"results": [{"title": f"{topic} - overview", "url": "https://example.com/a"}]},
            )
        )
    return tools


@csrf_exempt
async def health(request: HttpRequest) -> JsonResponse:
    record(PROVIDER, request, _api_key(request))
    if request.method != "GET":
        return fail(405, "Method not allowed")
    return json_response({"status": "ok"})


@csrf_exempt
async def chat(request: HttpRequest) -> HttpResponseBase:
    if refused := _guard(request, "POST"):
        return refused
    if request.content_type != "application/json":
        return fail(400, "Content-Type must be application/json")
    try:
        body = parse_body(request)
    except ValueError:
        return fail(400, "Invalid JSON body")
    if problem := _validate(body):
        return fail(400, problem)
    messages = body["messages"]
    # The directives (and the topic) come from the new turn: the last user message.
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    directives = Directives.parse(prompt)
    identity = ("chat", _api_key(request), prompt)
    if fault := _fault(identity, directives):
        return fault
    duration = directives.number("duration", DEFAULT_DURATION)
    count = int(
        directives.number(
            "chunks", max(1, round(duration * CHUNKS_PER_SECOND)), lo=1, hi=MAX_CHUNKS
        )
    )
    run = Chat(
        chat_id=body["id"],
        prompt=prompt,
        directives=directives,
        chunks=answer_chunks(prompt, count),
        prompt_tokens=max(1, sum(len(m["content"]) for m in messages) // 4),
        wire=WIRES.get(directives.get("format"), WIRES["legacy"]),
    )
    run.tools = _tools(prompt, directives, body)
    _prune()
    # Reusing an active id overwrites the entry: the older chat keeps generating (its task
    # and its reader are untouched) but stop and stream-status now see only the new one.
    registry[run.chat_id] = run
    faults.carry(identity, run.chat_id)
    run.task = asyncio.get_running_loop().create_task(_generate(run))
    _tasks.add(run.task)
    run.task.add_done_callback(_tasks.discard)
    response = StreamingHttpResponse(_replay(run), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    for name, value in run.wire.headers.items():
        response[name] = value
    return response


def _lookup(request: HttpRequest, chat_id: str, method: str) -> Chat | JsonResponse | None:
    if refused := _guard(request, method):
        return refused
    _prune()
    found = registry.get(chat_id)
    if found is not None and (fault := _fault(found.chat_id, found.directives)):
        return fault
    return found


@csrf_exempt
async def stop(request: HttpRequest, chat_id: str) -> JsonResponse:
    found = _lookup(request, chat_id, "POST")
    if isinstance(found, JsonResponse):
        return found
    if found is None or found.done:
        return json_response({"success": False, "message": "No active stream found"}, 404)
    mode = found.directives.get("stop")
    if mode == "slow":
        # The abort lands late: the chat stays active and keeps streaming until then.
        delay = found.directives.number("stop_delay", 3.0, hi=600)
        asyncio.get_running_loop().call_later(delay, found.abort)
    elif mode != "ignore":
        # sim:stop=ignore: the box says it stopped, but generation carries on to its end.
        found.abort()
    return json_response({"success": True, "message": "Stream stopped successfully"})


@csrf_exempt
async def stream_status(request: HttpRequest, chat_id: str) -> JsonResponse:
    found = _lookup(request, chat_id, "GET")
    if isinstance(found, JsonResponse):
        return found
    if found is None:
        return json_response({"status": "not_found", "isActive": False})
    return json_response(found.as_status())


# --- discovery (canned) ---------------------------------------------------------------------

ASSISTANTS: list[dict[str, Any]] = [
    {
        "id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "name": "Research Helper",
        "handle": "research",
        "description": "Answers questions from the company knowledge base.",
        "instructions": "Answer concisely and cite the documents you used.",
        "icon": "book",
        "color": "#3366ff",
        "vectorIds": ["b3f1c2d4-0a1e-4c5f-9d7a-2e8b6c4f1a90"],
        "vectors": [{"id": "b3f1c2d4-0a1e-4c5f-9d7a-2e8b6c4f1a90", "name": "Handbook"}],
        "createdAt": "2025-01-10T09:00:00.000Z",
        "builtInTools": {"webSearch": True, "calculator": True, "codeInterpreter": False},
    },
    {
        "id": "1f0e4a2b-9c3d-4e5f-8a6b-7c8d9e0f1a2b",
        "name": "Writer",
        "handle": "writer",
        "description": "Drafts and edits texts.",
        "instructions": "Write clear, friendly prose.",
        "icon": "pen",
        "color": "#ff9933",
        "vectorIds": [],
        "vectors": [],
        "createdAt": "2025-02-03T14:30:00.000Z",
        "builtInTools": {"webSearch": False, "calculator": False, "codeInterpreter": False},
    },
]

VECTORS = [
    {
        "id": "b3f1c2d4-0a1e-4c5f-9d7a-2e8b6c4f1a90",
        "name": "Handbook",
        "description": "Company handbook and policies.",
        "folder": "/handbook",
        "iconName": "folder",
        "accentColor": "#22aa66",
        "createdAt": "2025-01-08T08:00:00.000Z",
        "topK": 5,
        "filter": None,
        "strategy": "similarity",
    },
]


@csrf_exempt
async def assistants(request: HttpRequest) -> JsonResponse:
    if refused := _guard(request, "GET"):
        return refused
    listed = [{k: v for k, v in a.items() if k != "builtInTools"} for a in ASSISTANTS]
    return json_response({"assistants": listed})


@csrf_exempt
async def assistant(request: HttpRequest, assistant_id: str) -> JsonResponse:
    if refused := _guard(request, "GET"):
        return refused
    found = next((a for a in ASSISTANTS if a["id"] == assistant_id), None)
    if found is None:
        return fail(404, "Assistant not found")
    return json_response({"assistant": found})


@csrf_exempt
async def vectors(request: HttpRequest) -> JsonResponse:
    if refused := _guard(request, "GET"):
        return refused
    keys = ("id", "name", "description", "folder", "iconName", "accentColor", "createdAt")
    return json_response({"vectors": [{k: v[k] for k in keys} for v in VECTORS]})


@csrf_exempt
async def vector(request: HttpRequest, vector_id: str) -> JsonResponse:
    if refused := _guard(request, "GET"):
        return refused
    found = next((v for v in VECTORS if v["id"] == vector_id), None)
    if found is None:
        return fail(404, "Vector not found")
    keys = ("id", "name", "description", "folder", "topK", "filter", "strategy")
    return json_response({"vector": {k: found[k] for k in keys}})


urlpatterns = [
    path("health", health, name="intelligencebox-health"),
    path("api/ai/chat", chat, name="intelligencebox-chat"),
    path("api/ai/chat/<str:chat_id>/stop", stop, name="intelligencebox-stop"),
    path(
        "api/ai/chat/<str:chat_id>/stream-status",
        stream_status,
        name="intelligencebox-stream-status",
    ),
    path("api/public/assistants", assistants, name="intelligencebox-assistants"),
    path("api/public/assistants/<str:assistant_id>", assistant, name="intelligencebox-assistant"),
    path("api/public/vectors", vectors, name="intelligencebox-vectors"),
    path("api/public/vectors/<str:vector_id>", vector, name="intelligencebox-vector"),
]
