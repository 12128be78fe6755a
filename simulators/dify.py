"""A faithful Dify chat-app Service API (shared/providers/dify.md §8), served over real HTTP.

One `POST /chat-messages` = one *task* and one stored *message*. Generation runs as an asyncio
task per message that appends answer deltas to the message; the HTTP response (streaming or
blocking) only reads them. That split is what Dify itself has (a worker thread publishes to a
queue the HTTP pipeline drains), and it is what lets a dropped connection (`sim:drop_stream`)
leave the message generating, and the history endpoint show an answer still being written.

Apps are keys: `sim-…` is a Chatbot (`chat`), `sim-agent-…` an Agent (`agent-chat`, deltas
arrive as `agent_message`), `sim-workflow-…` a Workflow app (chat routes answer
`not_chat_app`), `sim-disabled-…` an app whose API is switched off (403).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from .core import DIRECTIVE, Directives, TransientFaults, bearer_key, json_response, key_is_valid
from .core import record as record_request

PROVIDER = "dify"
DEFAULT_DURATION = 20.0
CHUNKS_PER_SECOND = 15
MAX_CHUNKS = 20_000
PING_INTERVAL = 10.0  # base_app_queue_manager: a ping every 10 s of run time
TASK_OWNER_TTL = 1800.0  # the "task T belongs to user U" record lives 30 minutes
DEFAULT_STOP_DELAY = 3.0
DEFAULT_USER = "DEFAULT-USER"  # what Dify calls the end user of a GET without `user`

BAD_JSON_TYPE = (
    "Did not attempt to load JSON data because the request Content-Type was not 'application/json'."
)
INTERNAL_ERROR = (
    "The server encountered an internal error and was unable to complete your request. "
    "Either the server is overloaded or there is an error in the application."
)
QUOTA_EXCEEDED = (
    "Your quota for Dify Hosted Model Provider has been exhausted. Please go to Settings -> "
    "Model Provider to complete your own provider credentials."
)
STREAM_FAILURE = "[sim] Server Unavailable Error, the model provider failed mid-answer."

faults = TransientFaults()


# --- state ------------------------------------------------------------------------------------


@dataclass
class Message:
    """A stored message, which is also the task generating it (Dify keeps both 1:1)."""

    id: str
    task_id: str
    conversation: Conversation
    query: str
    directives: Directives
    chunks: list[str]
    mode: str
    parent_message_id: str | None
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    status: str = "normal"
    error: str | None = None
    done: bool = False
    latency: float | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def answer(self) -> str:
        # Also what history shows for a message still generating: the answer so far.
        return "".join(self.parts)

    @property
    def interval(self) -> float:
        return self.directives.number("duration", DEFAULT_DURATION) / max(1, len(self.chunks))

    @property
    def owner_alive(self) -> bool:
        return time.monotonic() - self.started < TASK_OWNER_TTL

    def notify(self) -> None:
        # A fresh Event per change: readers grab the current one and wait on it, so no
        # wake-up is lost and no lock is needed.
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def emit(self, delta: str) -> None:
        self.parts.append(delta)
        self.notify()

    def end(self, error: str | None = None) -> None:
        if self.done:
            return
        if error is not None:
            self.status, self.error = "error", error
        self.latency = time.monotonic() - self.started
        self.done = True
        self.notify()

    def usage(self) -> dict[str, Any]:
        """Dify's usage object, priced like its docs' example (prices are decimal strings)."""
        prompt_tokens = max(1, len(self.query) // 4)
        completion_tokens = max(0, len(self.answer) // 4)
        prompt_price = Decimal(prompt_tokens) * Decimal("0.001") * Decimal("0.001")
        completion_price = Decimal(completion_tokens) * Decimal("0.002") * Decimal("0.001")
        latency = self.latency if self.latency is not None else time.monotonic() - self.started
        return {
            "prompt_tokens": prompt_tokens,
            "prompt_unit_price": "0.001",
            "prompt_price_unit": "0.001",
            "prompt_price": f"{prompt_price:.7f}",
            "completion_tokens": completion_tokens,
            "completion_unit_price": "0.002",
            "completion_price_unit": "0.001",
            "completion_price": f"{completion_price:.7f}",
            "total_tokens": prompt_tokens + completion_tokens,
            "total_price": f"{prompt_price + completion_price:.7f}",
            "currency": "USD",
            "latency": round(latency, 6),
        }

    def as_history(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "conversation_id": self.conversation.id,
            "parent_message_id": self.parent_message_id,
            "inputs": self.conversation.inputs,
            "query": self.query,
            "answer": self.answer,
            "status": self.status,
            "error": self.error,
            "message_files": [],
            "feedback": None,
            "retriever_resources": [],
            "agent_thoughts": [],
            "created_at": self.created_at,
        }


@dataclass
class Conversation:
    id: str
    api_key: str
    user: str
    name: str
    inputs: dict[str, Any]
    created_at: int = field(default_factory=lambda: int(time.time()))
    updated_at: int = 0
    messages: list[Message] = field(default_factory=list)

    def as_item(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "inputs": self.inputs,
            "status": "normal",
            "introduction": "",
            "created_at": self.created_at,
            "updated_at": self.updated_at or self.created_at,
        }


conversations: dict[str, Conversation] = {}
tasks: dict[str, Message] = {}
# Strong references to generation tasks: the event loop keeps only weak ones.
_running: set[asyncio.Task[None]] = set()


# --- errors and request checks ----------------------------------------------------------------


def error(status: int, code: str, message: str, **headers: str) -> JsonResponse:
    """Dify's error envelope (libs/external_api.py): `status` mirrors the HTTP status."""
    return json_response({"code": code, "message": message, "status": status}, status, **headers)


def app_mode(key: str) -> str:
    if key.startswith("sim-agent-"):
        return "agent-chat"
    if key.startswith("sim-workflow-"):
        return "workflow"
    return "chat"


def _guard(request: HttpRequest, method: str) -> tuple[str, JsonResponse | None]:
    """Log the call, then Dify's checks in Dify's order: routing (method), then the token
    (service_api/wraps.py: header shape, scheme, key, app state)."""
    record_request(PROVIDER, request, bearer_key(request))
    if request.method != method:
        return "", error(
            405, "method_not_allowed", "The method is not allowed for the requested URL."
        )
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if not header or not key.strip():
        return "", unauthorized("Authorization header must be provided and start with 'Bearer'")
    if scheme.lower() != "bearer":
        return "", unauthorized("Authorization scheme must be 'Bearer'")
    key = key.strip()
    if not key_is_valid(key):
        return "", unauthorized("Access token is invalid")
    if key.startswith("sim-disabled-"):
        return key, error(403, "forbidden", "The app's API service has been disabled.")
    return key, None


def unauthorized(message: str) -> JsonResponse:
    return error(401, "unauthorized", message, WWW_Authenticate='Bearer realm="api"')


def _json_body(request: HttpRequest) -> dict[str, Any] | JsonResponse:
    """Flask's `request.get_json()`: wrong content type or broken JSON is a 400."""
    if request.content_type != "application/json":
        return error(400, "bad_request", BAD_JSON_TYPE)
    try:
        body = json.loads(request.body or b"")
    except ValueError as exc:
        return error(400, "bad_request", f"Failed to decode JSON object: {exc}")
    if not isinstance(body, dict):
        return error(400, "bad_request", "The request body must be a JSON object.")
    return body


def _user_of(value: Any) -> str | None:
    # wraps.py: `if not user_id and required: raise ValueError(...)`, then `str(user_id)`.
    return str(value) if value not in (None, "") else None


def _not_chat_app() -> JsonResponse:
    return error(400, "not_chat_app", "Please check if your app mode matches the right API route.")


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _limit(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return 20
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 1 <= value <= 100 else None


# --- the text ---------------------------------------------------------------------------------

POINTS = (
    "**Start with the question behind the question.** Decide what a good answer to "
    "*{topic}* would let you do, and judge every source against that.",
    "**Prefer primary sources.** Specifications, datasets and the people who built the "
    "thing beat summaries of summaries.",
    "**Compare at least three options.** A single recommendation about {topic} is an "
    "opinion; three side by side are a decision.",
    "**Write down the trade-offs.** Cost, time and risk rarely point the same way, and the "
    "notes make the choice easy to revisit.",
    "**Check how recent it is.** Advice about {topic} ages quickly; note the date of "
    "everything you rely on.",
    "**Try the smallest real test.** A one-hour experiment settles more than a week of reading.",
)


def topic_of(query: str) -> str:
    return " ".join(DIRECTIVE.sub(" ", query).split())[:120] or "your question"


def answer_text(topic: str, chunks: int) -> str:
    """A deterministic Markdown answer, long enough for ~6 characters per chunk."""
    lines = [f"### {topic}\n\n", f"Here is a practical way to approach **{topic}**.\n\n"]
    length = sum(map(len, lines))
    n = 0
    while length < max(500, 6 * chunks):
        line = f"{n + 1}. " + POINTS[n % len(POINTS)].format(topic=topic) + "\n"
        lines.append(line)
        length += len(line)
        n += 1
    lines.append("\n_Answered by the Runbrake Dify simulator._")
    return "".join(lines)


def split(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text)))
    cuts = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


# --- generation -------------------------------------------------------------------------------


async def _pause(message: Message, seconds: float) -> bool:
    """Wait `seconds`, or less if a stop lands: True when the message must stop now."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(message.stop_requested.wait(), seconds)
    return message.stop_requested.is_set()


async def _generate(message: Message) -> None:
    """Dify's worker: publish deltas at the requested pace until done, stopped or failed.

    A stop makes the worker abort at its next publication; the pipeline then saves the
    partial answer (status stays `normal`) and the stream ends with an ordinary
    `message_end`. Nothing here depends on an HTTP reader being connected."""
    try:
        if await _pause(message, message.directives.number("delay", 0.0)):
            return
        fail = message.directives.get("fail") == "error"
        fail_after = max(1, len(message.chunks) // 2)
        for index, chunk in enumerate(message.chunks, start=1):
            message.emit(chunk)
            if fail and index == fail_after:
                message.end(STREAM_FAILURE)
                return
            if await _pause(message, message.interval):
                return
    finally:
        # Stopped, completed, or cancelled at shutdown: the message keeps what it has.
        message.end()


# --- SSE --------------------------------------------------------------------------------------


def _frame(payload: dict[str, Any]) -> bytes:
    # base_app_generator.convert_to_event_stream: `data: <json>\n\n` per event.
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _common(message: Message, event: str) -> dict[str, Any]:
    # The converter puts these four first, then the event's own fields.
    return {
        "event": event,
        "conversation_id": message.conversation.id,
        "message_id": message.id,
        "created_at": message.created_at,
    }


def _delta_event(message: Message, delta: str) -> dict[str, Any]:
    event = "agent_message" if message.mode == "agent-chat" else "message"
    return {
        **_common(message, event),
        "task_id": message.task_id,
        "id": message.id,
        "answer": delta,
    }


def _end_event(message: Message) -> dict[str, Any]:
    if message.status == "error":
        # Stream-time failures carry the error envelope and, alone among events, no task_id.
        return {
            **_common(message, "error"),
            "code": "completion_request_error",
            "message": message.error,
            "status": 400,
        }
    return {
        **_common(message, "message_end"),
        "task_id": message.task_id,
        "id": message.id,
        "metadata": {"usage": message.usage(), "retriever_resources": []},
    }


async def _stream(message: Message) -> AsyncIterator[bytes]:
    """The HTTP side: replay the message's deltas as SSE, with a ping every 10 s of run
    time, until the terminal event (or until the connection is dropped on purpose)."""
    ping_every = message.directives.number("ping_interval", PING_INTERVAL, lo=0.05)
    next_ping = message.started + ping_every
    drop_after = (
        max(1, len(message.chunks) // 2) if "drop_stream" in message.directives.values else 0
    )
    sent = 0
    while True:
        while sent < len(message.parts):
            yield _frame(_delta_event(message, message.parts[sent]))
            sent += 1
            if sent == drop_after:
                # sim:drop_stream: the connection ends with no terminal event while the
                # message keeps generating. (A clean EOF: under ASGI an exception here does
                # not reset the socket, daphne just leaves it hanging.)
                return
        if message.done:
            yield _frame(_end_event(message))
            return
        now = time.monotonic()
        if now >= next_ping:
            yield b"event: ping\n\n"
            while next_ping <= now:
                next_ping += ping_every
            continue
        changed = message._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), next_ping - now)


# --- views ------------------------------------------------------------------------------------


@csrf_exempt
async def chat_messages(request: HttpRequest) -> HttpResponseBase:
    key, refused = _guard(request, "POST")
    if refused:
        return refused
    body = _json_body(request)
    if isinstance(body, JsonResponse):
        return body
    user = _user_of(body.get("user"))
    if user is None:
        return error(400, "invalid_param", "Arg user must be provided.")
    mode = app_mode(key)
    if mode == "workflow":
        return _not_chat_app()
    query = body.get("query")
    query = query.replace("\x00", "") if isinstance(query, str) else ""
    if not query:
        return error(400, "invalid_param", "query is required")
    inputs = body.get("inputs")
    if inputs is None:
        return error(400, "invalid_param", "inputs is required")
    if not isinstance(inputs, dict):
        return error(400, "invalid_param", "inputs must be an object")
    response_mode = body.get("response_mode") or "blocking"
    if response_mode not in ("streaming", "blocking"):
        return error(400, "invalid_param", "response_mode must be 'streaming' or 'blocking'")
    conversation_id = body.get("conversation_id") or ""
    if conversation_id and not (isinstance(conversation_id, str) and _is_uuid(conversation_id)):
        return error(400, "invalid_param", "conversation_id must be a valid UUID")
    if not isinstance(body.get("files", []), list):
        return error(400, "invalid_param", "files must be a list")
    auto_name = body.get("auto_generate_name", True)
    if not isinstance(auto_name, bool):
        return error(400, "invalid_param", "auto_generate_name must be a boolean")
    if mode == "agent-chat" and response_mode == "blocking":
        return error(400, "bad_request", "Agent Chat App does not support blocking mode")

    directives = Directives.parse(query)
    identity = ("chat", key, user, query)
    if refused := _fault(identity, directives):
        return refused

    if conversation_id:
        conversation = conversations.get(str(uuid.UUID(conversation_id)))
        # Another user's (or another app's) conversation is as absent as an unknown one.
        if conversation is None or conversation.api_key != key or conversation.user != user:
            return error(404, "not_found", "Conversation Not Exists.")
    else:
        topic = topic_of(query)
        conversation = Conversation(
            id=str(uuid.uuid4()),
            api_key=key,
            user=user,
            name=topic[:40] if auto_name else "New conversation",
            inputs=inputs,
        )
        conversations[conversation.id] = conversation

    message = _start(conversation, query, directives, mode)
    faults.carry(identity, message.task_id)
    if response_mode == "streaming":
        response = StreamingHttpResponse(_stream(message), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    # Blocking: the answer arrives whole; the stop flag is honoured internally, but the client
    # only learns the task_id now, when there is nothing left to stop.
    while not message.done:
        await message._changed.wait()
    if message.status == "error":
        return error(400, "completion_request_error", message.error or STREAM_FAILURE)
    return json_response(
        {
            "event": "message",
            "task_id": message.task_id,
            "id": message.id,
            "message_id": message.id,
            "conversation_id": conversation.id,
            "mode": mode,
            "answer": message.answer,
            "metadata": {"usage": message.usage(), "retriever_resources": []},
            "created_at": message.created_at,
        }
    )


def _fault(identity: Any, directives: Directives) -> JsonResponse | None:
    kind = directives.get("fail")
    if kind == "quota":
        return error(400, "provider_quota_exceeded", QUOTA_EXCEEDED)
    if kind == "plan_limit":
        # Dify Cloud's plan quota: a 429 that retrying does not cure.
        return error(429, "rate_limit_error", "Rate Limit Error")
    if not faults.take(identity, kind):
        return None
    if kind == "rate_limit":
        # The per-app concurrency ceiling (APP_MAX_ACTIVE_REQUESTS): retry with backoff.
        return error(
            429, "too_many_requests", "Too many requests. Please try again later.", Retry_After="1"
        )
    return error(500, "internal_server_error", INTERNAL_ERROR)


def _start(conversation: Conversation, query: str, directives: Directives, mode: str) -> Message:
    duration = directives.number("duration", DEFAULT_DURATION)
    default_chunks = max(1, round(duration * CHUNKS_PER_SECOND))
    count = int(directives.number("chunks", default_chunks, lo=1, hi=MAX_CHUNKS))
    previous = conversation.messages[-1].id if conversation.messages else None
    message = Message(
        id=str(uuid.uuid4()),
        task_id=str(uuid.uuid4()),
        conversation=conversation,
        query=query,
        directives=directives,
        chunks=split(answer_text(topic_of(query), count), count),
        mode=mode,
        parent_message_id=previous,
    )
    conversation.messages.append(message)
    conversation.updated_at = message.created_at
    tasks[message.task_id] = message
    message.task = asyncio.create_task(_generate(message))
    _running.add(message.task)
    message.task.add_done_callback(_running.discard)
    return message


@csrf_exempt
async def stop(request: HttpRequest, task_id: str) -> JsonResponse:
    key, refused = _guard(request, "POST")
    if refused:
        return refused
    body = _json_body(request)
    if isinstance(body, JsonResponse):
        return body
    user = _user_of(body.get("user"))
    if user is None:
        return error(400, "invalid_param", "Arg user must be provided.")
    if app_mode(key) == "workflow":
        return _not_chat_app()
    message = tasks.get(task_id)
    # app_task_service.stop_task: an unknown or expired task, another user's (or app's) task,
    # a finished one or a repeated stop changes nothing, and the answer is the same success.
    if (
        message is not None
        and message.conversation.api_key == key
        and message.conversation.user == user
        and message.owner_alive
        and not message.done
    ):
        mode = message.directives.get("stop")
        if mode == "slow":
            delay = message.directives.number("stop_delay", DEFAULT_STOP_DELAY, hi=600)
            asyncio.get_running_loop().call_later(delay, message.stop_requested.set)
        elif mode != "ignore":
            message.stop_requested.set()
    return json_response({"result": "success"})


@csrf_exempt
async def messages(request: HttpRequest) -> JsonResponse:
    key, refused = _guard(request, "GET")
    if refused:
        return refused
    user = _user_of(request.GET.get("user")) or DEFAULT_USER
    if app_mode(key) == "workflow":
        return _not_chat_app()
    conversation_id = request.GET.get("conversation_id")
    if not conversation_id:
        return error(400, "invalid_param", "conversation_id is required")
    if not _is_uuid(conversation_id):
        return error(400, "invalid_param", "conversation_id must be a valid UUID")
    first_id = request.GET.get("first_id") or None
    if first_id is not None and not _is_uuid(first_id):
        return error(400, "invalid_param", "first_id must be a valid UUID")
    limit = _limit(request.GET.get("limit"))
    if limit is None:
        return error(400, "invalid_param", "limit must be between 1 and 100")
    conversation = conversations.get(str(uuid.UUID(conversation_id)))
    if conversation is None or conversation.api_key != key or conversation.user != user:
        return error(404, "not_found", "Conversation Not Exists.")
    newest_first = conversation.messages[::-1]
    if first_id is not None:
        # first_id is the oldest message the client already holds: page to older ones.
        ids = [m.id for m in newest_first]
        if str(uuid.UUID(first_id)) not in ids:
            return error(404, "not_found", "First Message Not Exists.")
        newest_first = newest_first[ids.index(str(uuid.UUID(first_id))) + 1 :]
    page = newest_first[:limit]
    return json_response(
        {
            "limit": limit,
            "has_more": len(newest_first) > limit,
            "data": [m.as_history() for m in page],
        }
    )


SORTS = {
    "created_at": (lambda c: c.created_at, False),
    "-created_at": (lambda c: c.created_at, True),
    "updated_at": (lambda c: c.updated_at, False),
    "-updated_at": (lambda c: c.updated_at, True),
}


@csrf_exempt
async def conversation_list(request: HttpRequest) -> JsonResponse:
    key, refused = _guard(request, "GET")
    if refused:
        return refused
    user = _user_of(request.GET.get("user")) or DEFAULT_USER
    if app_mode(key) == "workflow":
        return _not_chat_app()
    limit = _limit(request.GET.get("limit"))
    if limit is None:
        return error(400, "invalid_param", "limit must be between 1 and 100")
    sort_by = request.GET.get("sort_by") or "-updated_at"  # Assumption (contract §5)
    if sort_by not in SORTS:
        return error(
            400,
            "invalid_param",
            "sort_by must be one of created_at, -created_at, updated_at, -updated_at",
        )
    sort_key, reverse = SORTS[sort_by]
    # Insertion order breaks ties (timestamps are whole seconds), newest first when reversed.
    mine = [c for c in conversations.values() if c.api_key == key and c.user == user]
    ordered = sorted(mine[::-1] if reverse else mine, key=sort_key, reverse=reverse)
    last_id = request.GET.get("last_id") or None
    if last_id is not None:
        ids = [c.id for c in ordered]
        if last_id not in ids:
            return error(404, "not_found", "Last Conversation Not Exists.")
        ordered = ordered[ids.index(last_id) + 1 :]
    return json_response(
        {
            "limit": limit,
            "has_more": len(ordered) > limit,
            "data": [c.as_item() for c in ordered[:limit]],
        }
    )


@csrf_exempt
async def info(request: HttpRequest) -> JsonResponse:
    key, refused = _guard(request, "GET")
    if refused:
        return refused
    return json_response(
        {
            "name": "Runbrake Dify simulator",
            "description": "A simulated Dify app for Runbrake's development and tests.",
            "tags": [],
            "mode": app_mode(key),
            "author_name": "Runbrake",
        }
    )


urlpatterns = [
    path("chat-messages", chat_messages, name="dify-chat-messages"),
    path("chat-messages/<str:task_id>/stop", stop, name="dify-stop"),
    path("messages", messages, name="dify-messages"),
    path("conversations", conversation_list, name="dify-conversations"),
    path("info", info, name="dify-info"),
]
