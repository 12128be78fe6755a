"""A faithful xpander.ai Agent Gateway (shared/providers/xpander.md §6), served over real HTTP.

A conversation is a sequence of turns. Each turn's generation runs as an asyncio task that
appends TaskUpdateEvents to the turn; an HTTP stream only replays them. That split is what
lets a dropped connection (`sim:drop_stream`) leave the turn generating, lets `run-state` and
`GET /v1/tasks/{id}` see progress with no stream attached, and lets a preempting run-turn end
the old stream with the old turn's own `task_finished`.

The queue is drained by the live stream that owns the conversation (the run-turn or
drain stream attached now): when a turn ends, not stopped, and such a stream is attached, the
next queued message becomes the next turn on that same stream. With no stream attached (the
client went away, or `sim:drop_stream`), queued messages wait for *Drain Queue* or the next
run-turn, as they do after a stop.

`sim:subtask=async|sync` makes the router hand the work to a sub-task (its own task record,
`parent_execution` = the router) whose lifecycle and text are forwarded onto the router's
stream. An async sub-task keeps working after the router's `task_finished`, and the stream
stays open until it ends; a sync one runs inline before the router finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.urls import URLPattern, path, re_path
from django.views.decorators.csrf import csrf_exempt

from .core import Directives, TransientFaults, json_response, key_is_valid, record

PROVIDER = "xpander"
DEFAULT_DURATION = 20.0
CHUNKS_PER_SECOND = 15
DEFAULT_STOP_DELAY = 3.0
# With a sub-task, the router only acknowledges (in a few chunks, quickly); the sub-task does
# the work, over `sim:duration`.
ACK_CHUNKS = 3
ACK_SECONDS = 0.3
SUBTASK_MODES = ("sync", "async")
# The gateway family and its renamed "Conversations" twin: same operations, same semantics.
PREFIXES = ("gateway/conversations", "conversations")
OUTPUT_FORMATS = ("text", "markdown", "json", "voice")
THINK_MODES = ("default", "harder")
SOURCES = ("workbench", "sdk", "task", "assistant", "webhook", "mcp", "a2a", "telegram", "slack")
MODES = ("auto", "queue", "steer")
FAILURE = "Simulated agent failure: the model provider returned an error mid-answer."

faults = TransientFaults()


def _iso(epoch: float | None) -> str | None:
    # xpander's timestamps end in "Z" (see the contract's TaskUpdateEvent example).
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- rate limits ------------------------------------------------------------------------------


class KeyLimiter:
    """`sim-free-` keys: 100 requests a minute and 5,000 a day per key, all endpoints counted
    together (the legacy SDK reference's figures; the gateway documents none). Other `sim-`
    keys are unlimited."""

    WINDOWS = ((60.0, 100), (86_400.0, 5_000))

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    def retry_after(self, key: str) -> int | None:
        """None when the call is allowed (and counted); else whole seconds until it would be."""
        if not key.startswith("sim-free-"):
            return None
        now = time.monotonic()
        calls = self.calls.setdefault(key, [])
        while calls and calls[0] <= now - self.WINDOWS[-1][0]:
            calls.pop(0)
        for span, limit in self.WINDOWS:
            recent = [t for t in calls if t > now - span]
            if len(recent) >= limit:
                # The call is allowed again once the oldest of the last `limit` calls expires.
                return max(1, math.ceil(recent[-limit] + span - now))
        calls.append(now)
        return None


limiter = KeyLimiter()


# --- errors, FastAPI style ---------------------------------------------------------------------


def detail(status: int, message: str, **headers: str) -> JsonResponse:
    return json_response({"detail": message}, status, **headers)


def _loc_error(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def invalid(errors: list[dict[str, Any]]) -> JsonResponse:
    return json_response({"detail": errors}, 422)


def _choices(options: tuple[str, ...]) -> str:
    quoted = [f"'{option}'" for option in options]
    return f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}"


class Fields:
    """Pydantic-like field checks that collect every error, as FastAPI reports them."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def fail(self, loc: list[Any], msg: str, kind: str) -> None:
        self.errors.append(_loc_error(loc, msg, kind))

    def string(
        self, obj: dict[str, Any], name: str, loc: list[Any], *, nullable: bool = False
    ) -> Any:
        value = obj.get(name, None if nullable else "")
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            self.fail([*loc, name], "Input should be a valid string", "string_type")
            return None if nullable else ""
        return value

    def strings(self, obj: dict[str, Any], name: str, loc: list[Any]) -> list[str]:
        value = obj.get(name, [])
        if not isinstance(value, list):
            self.fail([*loc, name], "Input should be a valid list", "list_type")
            return []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.fail([*loc, name, index], "Input should be a valid string", "string_type")
        return [item for item in value if isinstance(item, str)]

    def mapping(self, obj: dict[str, Any], name: str, loc: list[Any]) -> dict[str, Any] | None:
        value = obj.get(name)
        if value is None or isinstance(value, dict):
            return value
        self.fail(
            [*loc, name],
            "Input should be a valid dictionary or object to extract fields from",
            "model_attributes_type",
        )
        return None

    def choice(self, obj: dict[str, Any], name: str, options: tuple[str, ...]) -> str:
        value = obj.get(name, options[0])
        if value in options:
            return str(value)
        self.fail([name], _choices(options), "enum")
        return options[0]

    def boolean(self, obj: dict[str, Any], name: str, default: bool) -> bool:
        # Strict on purpose: only JSON booleans (pydantic's lax mode would also take "yes"/1;
        # a client that relies on that is one the real service may treat differently).
        value = obj.get(name, default)
        if not isinstance(value, bool):
            self.fail([name], "Input should be a valid boolean", "bool_parsing")
            return default
        return value


def _json_body(request: HttpRequest) -> dict[str, Any] | JsonResponse:
    """The body as an object, or FastAPI's 422 for a missing, malformed or non-object body."""
    if not request.body.strip():
        return invalid([_loc_error([], "Field required", "missing")])
    try:
        body = json.loads(request.body)
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        return invalid([_loc_error([position], "JSON decode error", "json_invalid")])
    if not isinstance(body, dict):
        return invalid(
            [
                _loc_error(
                    [],
                    "Input should be a valid dictionary or object to extract fields from",
                    "model_attributes_type",
                )
            ]
        )
    return body


# --- state ------------------------------------------------------------------------------------


@dataclass
class QueuedMessage:
    id: str
    text: str
    files: list[str]
    user: dict[str, Any]
    idempotency_key: str | None
    enqueued: float = field(default_factory=time.time)

    def preview(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "files": self.files,
            "user": self.user,
            "enqueued_at": _iso(self.enqueued),
            "idempotency_key": self.idempotency_key,
        }

    def as_input(self) -> dict[str, Any]:
        """What the message becomes when it is run as a turn."""
        return {"text": self.text, "files": self.files, "user": self.user or None}


@dataclass(eq=False, kw_only=True)
class Work:
    """One execution (a router turn or a sub-task): its status, its text, and its stop."""

    status: str = "pending"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: str | None = None
    stop_reason: str | None = None  # "manual" (stop call) or "preempted" (a newer run-turn)
    parts: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def live(self) -> bool:
        return self.finished is None

    def say(self, piece: str) -> None:
        raise NotImplementedError

    def request_stop(self, reason: str, delay: float = 0.0) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._stop.set)
        else:
            self._stop.set()

    async def stop_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for a stop to take effect; True when it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        return self._stop.is_set()


@dataclass(eq=False, kw_only=True)
class Turn(Work):
    conversation: Conversation
    text: str
    files: list[str]
    user: dict[str, Any] | None
    output_format: str = "text"
    source: str = "sdk"
    events: list[dict[str, Any]] = field(default_factory=list)
    next: Turn | None = None  # the queued follow-up this turn's stream drains into
    child: SubTask | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.directives = Directives.parse(self.text)
        self.duration = self.directives.number("duration", DEFAULT_DURATION)
        default_chunks = max(1, round(self.duration * CHUNKS_PER_SECOND))
        count = int(self.directives.number("chunks", default_chunks, lo=1, hi=100_000))
        mode = self.directives.get("subtask")
        self.mode = mode if mode in SUBTASK_MODES else ""
        # The answer: the turn's own text, or with a sub-task the sub-task's.
        self.work_chunks = answer_chunks(self.text, count)
        self.chunks = ack_chunks(self.text) if self.mode else self.work_chunks

    @property
    def busy(self) -> bool:
        """The router still answering, or its sub-task still working."""
        return self.live or (self.child is not None and self.child.live)

    def as_task(self) -> dict[str, Any]:
        conversation = self.conversation
        return {
            # Continued turns reuse the conversation's id, as Invoke threads do.
            "id": conversation.id,
            "agent_id": conversation.agent_id,
            "organization_id": conversation.organization_id,
            "input": {"text": self.text, "files": self.files, "user": self.user},
            "status": self.status,
            "internal_status": None,
            "result": self.result,
            "created_at": _iso(self.created),
            "started_at": _iso(self.started),
            "paused_at": None,
            "finished_at": _iso(self.finished),
            "is_manually_stopped": self.status == "stopped" and self.stop_reason == "manual",
            "output_format": self.output_format,
            "source": self.source,
            "parent_execution": None,
            "sub_executions": [self.child.id] if self.child else [],
            "finished_sub_executions": [self.child.id]
            if self.child and not self.child.live
            else [],
            "tokens": {
                "prompt_tokens": len(self.text.split()),
                "completion_tokens": len(self.parts),
            },
        }

    def emit(self, kind: str, data: Any, *, task_id: str | None = None) -> None:
        self.events.append(self.conversation.event(kind, data, task_id=task_id))
        # Wake every reader waiting on the old event; later readers wait on the new one.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def say(self, piece: str) -> None:
        self.parts.append(piece)
        self.emit("chunk", piece)

    def request_stop(self, reason: str, delay: float = 0.0) -> None:
        # The documented stop: "the in-flight turn (router plus any child sub-execution)".
        super().request_stop(reason, delay)
        if self.child is not None and self.child.live:
            self.child.request_stop(reason, delay)

    async def settled(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.busy:
                    await self._changed.wait()

    def hand_off(self) -> SubTask:
        """Trigger the worker agent and create its sub-task (mirrored onto this stream)."""
        self.child = child = SubTask(turn=self, chunks=self.work_chunks)
        subtasks[child.id] = child
        self.emit(
            "sub_agent_trigger",
            {
                "id": str(uuid.uuid4()),
                "created_at": _iso(time.time()),
                "agent_id": child.agent_id,
                "query": topic_of(self.text),
                "files": [],
                "reasoning": None,
            },
        )
        self.emit("sub_task_created", child.as_task())
        return child

    def end(self, status: str) -> None:
        if not self.live:
            return
        if status == "stopped" and self.child is not None and self.child.live:
            # The child's stop is reported before the router's.
            self.child.end("stopped")
        self.status = status
        self.finished = time.time()
        self.result = FAILURE if status == "failed" else "".join(self.parts)
        conversation = self.conversation
        if (
            status != "stopped"
            and conversation.queue
            and conversation.owner is not None
            and conversation.current is self
        ):
            # The live stream drains the queue: the next message becomes the next turn on it.
            self.next = conversation.start_turn(**conversation.queue.pop(0).as_input())
        self.emit("task_finished", self.as_task())


@dataclass(eq=False, kw_only=True)
class SubTask(Work):
    """A sub-execution: its own task record, whose `parent_execution` is the router. Its
    `sub_task_*` events carry the router's task id with the sub-task as `data`; its text
    comes as `chunk`s under its own task id."""

    turn: Turn
    chunks: list[str]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def agent_id(self) -> str:
        return f"{self.turn.conversation.agent_id}-worker"

    def as_task(self) -> dict[str, Any]:
        conversation = self.turn.conversation
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "organization_id": conversation.organization_id,
            "input": {"text": topic_of(self.turn.text), "files": [], "user": None},
            "status": self.status,
            "internal_status": None,
            "result": self.result,
            "created_at": _iso(self.created),
            "started_at": _iso(self.started),
            "paused_at": None,
            "finished_at": _iso(self.finished),
            "is_manually_stopped": self.status == "stopped" and self.stop_reason == "manual",
            "output_format": "text",
            "source": "task",
            "parent_execution": conversation.id,
            "triggering_agent_id": conversation.agent_id,
            "sub_executions": [],
            "finished_sub_executions": [],
            "tokens": {"prompt_tokens": 0, "completion_tokens": len(self.parts)},
        }

    def say(self, piece: str) -> None:
        self.parts.append(piece)
        self.turn.emit("chunk", piece, task_id=self.id)

    def begin(self) -> None:
        self.status = "executing"
        self.started = time.time()
        self.turn.emit("sub_task_updated", self.as_task())

    def end(self, status: str) -> None:
        if not self.live:
            return
        self.status = status
        self.finished = time.time()
        self.result = FAILURE if status == "failed" else "".join(self.parts)
        self._stop.set()  # whoever ended it, its generation stops here
        self.turn.emit("sub_task_finished", self.as_task())


subtasks: dict[str, SubTask] = {}


@dataclass(eq=False)
class Conversation:
    id: str
    agent_id: str
    api_key: str
    organization_id: str
    turns: list[Turn] = field(default_factory=list)
    queue: list[QueuedMessage] = field(default_factory=list)
    answered: dict[str, dict[str, Any]] = field(default_factory=dict)  # idempotency keys
    owner: object | None = None  # the live stream that drains the queue, if any

    @property
    def current(self) -> Turn | None:
        return self.turns[-1] if self.turns else None

    @property
    def running(self) -> Turn | None:
        turn = self.current
        return turn if turn is not None and turn.live else None

    def event(self, kind: str, data: Any, *, task_id: str | None = None) -> dict[str, Any]:
        # Every field is a string, as the SDK's TaskUpdateEvent requires (task_id: str).
        return {
            "type": kind,
            "task_id": self.id if task_id is None else task_id,
            "organization_id": self.organization_id,
            "time": _iso(time.time()),
            "data": data,
        }

    def start_turn(self, **kwargs: Any) -> Turn:
        turn = Turn(conversation=self, **kwargs)
        self.turns.append(turn)
        # The task reference lives on the turn: asyncio only keeps weak references to tasks.
        turn.task = asyncio.get_running_loop().create_task(_generate(turn))
        return turn

    def active_child(self) -> SubTask | None:
        for turn in reversed(self.turns):
            if turn.child is not None and turn.child.live:
                return turn.child
        return None

    def run_state(self) -> dict[str, Any]:
        running = self.running is not None
        current = self.current
        child = self.active_child()
        return {
            "conversation_id": self.id,
            "is_running": running,
            # Our assumption: a live router turn can always be steered.
            "is_steerable": running,
            "steer_target": "router" if running else "none",
            # Our assumption (the adversarial reading): a sub-task outliving the router is
            # not `is_running`; only `active_child_id` shows it.
            "active_child_id": child.id if child else None,
            "queue_depth": len(self.queue),
            "queued_messages": [message.preview() for message in self.queue],
            "execution_status": current.status if current else None,
            "conversation_state": "regular",
        }


conversations: dict[str, Conversation] = {}


def _organization(key: str) -> str:
    # Stable per key, so a client sees the same organization on every event.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"xpander-sim-org:{key}"))


async def _generate(turn: Turn) -> None:
    """The server side of a turn: runs whether or not any stream is attached."""
    directives = turn.directives
    try:
        delay = directives.number("delay", 0.0, hi=600)
        if delay and await turn.stop_within(delay):
            turn.end("stopped")
            return
        turn.emit("task_created", turn.as_task())
        turn.status = "executing"
        turn.started = time.time()
        turn.emit("task_updated", turn.as_task())
        seconds = ACK_SECONDS if turn.mode else turn.duration
        interval = seconds / len(turn.chunks)
        fail_at = len(turn.chunks) // 2 if directives.get("fail") == "error" else None
        if ended := await _speak(turn, turn.chunks, interval, fail_at):
            turn.end(ended)
            return
        if turn.mode == "sync":
            # The router waits for a sync sub-task, then answers.
            child = turn.hand_off()
            await _work(child)
            turn.end("stopped" if child.status == "stopped" else "completed")
            return
        # The last chunk also takes its share of the duration before the turn completes.
        if await turn.stop_within(interval):
            turn.end("stopped")
            return
        if turn.mode == "async":
            # The router answers at once; its sub-task works on after `task_finished`.
            child = turn.hand_off()
            turn.end("completed")
            child.task = asyncio.get_running_loop().create_task(_work(child))
            return
        turn.end("completed")
    except asyncio.CancelledError:
        turn.end("stopped")  # server shutdown
        raise


async def _work(child: SubTask) -> None:
    """A sub-task's work: the answer, over the turn's `sim:duration`."""
    try:
        child.begin()
        interval = child.turn.duration / len(child.chunks)
        failing = child.turn.directives.get("fail") == "subtask"
        fail_at = len(child.chunks) // 2 if failing else None
        ended = await _speak(child, child.chunks, interval, fail_at)
        child.end(ended or ("stopped" if await child.stop_within(interval) else "completed"))
    except asyncio.CancelledError:
        child.end("stopped")  # server shutdown
        raise


async def _speak(work: Work, pieces: list[str], interval: float, fail_at: int | None) -> str:
    """Say the pieces `interval` seconds apart; the status it ended early with, or ""."""
    for index, piece in enumerate(pieces):
        if index == fail_at:
            return "failed"
        if (index and await work.stop_within(interval)) or not work.live:
            return "stopped"
        work.say(piece)
    return ""


def _frame(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


async def _follow(
    conversation: Conversation, turn: Turn | None, token: object, connected_id: str
) -> AsyncIterator[bytes]:
    """The HTTP side: `connected`, then replay the turn's events and any drained follow-ups.

    Ends after a turn's `task_finished` (or its async sub-task's `sub_task_finished`) with
    nothing drained, or early with no terminal event for `sim:drop_stream`. Leaving (for any
    reason, including the client going away) gives up the drain, so queued messages then
    wait for Drain Queue or the next run-turn.
    """
    try:
        # Sent before anything is persisted, so a new conversation has no id yet: "" (a
        # string, as the SDK's model requires), else the conversation being continued.
        yield _frame(conversation.event("connected", None, task_id=connected_id))
        while turn is not None:
            drop = "drop_stream" in turn.directives.values
            # With a sub-task the stream drops halfway through the sub-task's text.
            drop_after = max(1, len(turn.work_chunks) // 2) if drop else 0
            sent = chunks = 0
            while True:
                changed = turn._changed
                while sent < len(turn.events):
                    event = turn.events[sent]
                    sent += 1
                    yield _frame(event)
                    if event["type"] == "chunk" and (
                        not turn.mode or event["task_id"] != conversation.id
                    ):
                        chunks += 1
                        if chunks == drop_after:
                            return  # the connection ends; the turn goes on server-side
                if not turn.busy:
                    break
                await changed.wait()
            turn = turn.next
    finally:
        if conversation.owner is token:
            conversation.owner = None


def _stream(
    conversation: Conversation, turn: Turn | None, token: object, connected_id: str
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(
        _follow(conversation, turn, token, connected_id), content_type="text/event-stream"
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# --- checks shared by every endpoint -----------------------------------------------------------


def _guard(request: HttpRequest, method: str) -> tuple[str, JsonResponse | None]:
    """Log the call, then FastAPI's order: route method, auth dependency, rate limit."""
    key = request.headers.get("x-api-key", "").strip()
    record(PROVIDER, request, key)
    if request.method != method:
        return key, detail(405, "Method Not Allowed", Allow=method)
    if not key_is_valid(key):
        # Only x-api-key counts: the invoke guide says API keys are not accepted as Bearer.
        return key, detail(401, "Unauthorized")
    if (wait := limiter.retry_after(key)) is not None:
        return key, detail(429, "Rate limit exceeded", Retry_After=str(wait))
    return key, None


def _conversation(key: str, agent_id: str, conversation_id: str) -> Conversation | None:
    found = conversations.get(conversation_id)
    # Another key's (or another agent's) conversation is as invisible as an unknown one.
    if found is None or found.api_key != key or found.agent_id != agent_id:
        return None
    return found


def _posted_to(
    request: HttpRequest, agent_id: str, conversation_id: str
) -> tuple[Conversation, dict[str, Any]] | JsonResponse:
    """A POST to a conversation: the conversation and the JSON body, or the refusal."""
    conversation = _lookup(request, "POST", agent_id, conversation_id)
    if isinstance(conversation, JsonResponse):
        return conversation
    body = _json_body(request)
    if isinstance(body, JsonResponse):
        return body
    return conversation, body


def _lookup(
    request: HttpRequest, method: str, agent_id: str, conversation_id: str
) -> Conversation | JsonResponse:
    key, refused = _guard(request, method)
    if refused:
        return refused
    found = _conversation(key, agent_id, conversation_id)
    if found is None:
        return detail(404, "Conversation not found")
    return found


# --- endpoints ---------------------------------------------------------------------------------


@csrf_exempt
async def invoke_stream(request: HttpRequest, agent_id: str) -> HttpResponseBase:
    """Run Gateway Turn (Stream), and the plain Invoke Agent stream (same body and events)."""
    key, refused = _guard(request, "POST")
    if refused:
        return refused
    body = _json_body(request)
    if isinstance(body, JsonResponse):
        return body
    fields = Fields()
    raw_input = body.get("input")
    if "input" not in body:
        fields.fail(["input"], "Field required", "missing")
        raw_input = {}
    elif not isinstance(raw_input, dict):
        fields.fail(
            ["input"],
            "Input should be a valid dictionary or object to extract fields from",
            "model_attributes_type",
        )
        raw_input = {}
    text = fields.string(raw_input, "text", ["input"])
    files = fields.strings(raw_input, "files", ["input"])
    user = fields.mapping(raw_input, "user", ["input"])
    conversation_id = fields.string(body, "id", [], nullable=True)
    output_format = fields.choice(body, "output_format", OUTPUT_FORMATS)
    fields.choice(body, "think_mode", THINK_MODES)
    source = fields.choice(body, "source", SOURCES)
    if not fields.errors and isinstance(body.get("input"), dict) and not text.strip() and not files:
        fields.fail(["input"], "Value error, input.text or input.files is required", "value_error")
    if fields.errors:
        return invalid(fields.errors)

    directives = Directives.parse(text)
    identity = ("invoke", key, agent_id, conversation_id, text)
    kind = directives.get("fail")
    if faults.take(identity, kind):
        if kind == "rate_limit":
            # `sim:retry_after=<s>` (default 1): how long the refusal asks the client to wait.
            wait = directives.number("retry_after", 1.0)
            return detail(429, "Rate limit exceeded", Retry_After=f"{wait:g}")
        return detail(500, "Internal Server Error")
    # The run got through: an identical request later is a new run with its own faults.
    faults.remaining.pop(identity, None)

    if conversation_id:
        conversation = _conversation(key, agent_id, conversation_id)
        if conversation is None:
            return detail(404, "Conversation not found")
        if (live := conversation.running) is not None:
            # Run-turn on a running conversation preempts the in-flight turn: it ends
            # `stopped` on its own stream (which then closes) before the new turn starts.
            live.request_stop("preempted")
            await live.settled(5.0)
    else:
        conversation = Conversation(
            id=str(uuid.uuid4()),
            agent_id=agent_id,
            api_key=key,
            organization_id=_organization(key),
        )
        conversations[conversation.id] = conversation
    token = object()
    conversation.owner = token
    turn = conversation.start_turn(
        text=text, files=files, user=user, output_format=output_format, source=source
    )
    return _stream(conversation, turn, token, conversation.id if conversation_id else "")


@csrf_exempt
async def run_state(request: HttpRequest, agent_id: str, conversation_id: str) -> JsonResponse:
    conversation = _lookup(request, "GET", agent_id, conversation_id)
    if isinstance(conversation, JsonResponse):
        return conversation
    return json_response(conversation.run_state())


@csrf_exempt
async def messages(request: HttpRequest, agent_id: str, conversation_id: str) -> JsonResponse:
    posted = _posted_to(request, agent_id, conversation_id)
    if isinstance(posted, JsonResponse):
        return posted
    conversation, body = posted
    fields = Fields()
    text = fields.string(body, "text", [])
    files = fields.strings(body, "files", [])
    mode = fields.choice(body, "mode", MODES)
    idempotency_key = fields.string(body, "idempotency_key", [], nullable=True)
    user = fields.mapping(body, "user", []) or {}
    if fields.errors:
        return invalid(fields.errors)

    if idempotency_key is not None and idempotency_key in conversation.answered:
        return json_response(conversation.answered[idempotency_key])  # a retry: no new message
    live = conversation.running
    message = QueuedMessage(
        id=f"q_{uuid.uuid4().hex[:24]}",
        text=text,
        files=files,
        user=user,
        idempotency_key=idempotency_key,
    )
    if mode == "steer" and live is not None:
        live.emit(
            "gateway_steer_applied",
            {"message_id": message.id, "text": text, "files": files, "target": "router"},
        )
        answer = {
            "action": "steered",
            "message_id": message.id,
            "queue_depth": len(conversation.queue),
            "steer_target": "router",
        }
    elif mode == "queue" or live is not None:
        conversation.queue.append(message)
        answer = {
            "action": "queued",
            "message_id": message.id,
            "queue_depth": len(conversation.queue),
            "steer_target": None,
        }
    else:
        # Idle: nothing is enqueued, the caller runs the turn itself (run-turn with id).
        return json_response(
            {"action": "started", "message_id": None, "queue_depth": 0, "steer_target": None}
        )
    if idempotency_key is not None:
        conversation.answered[idempotency_key] = answer
    return json_response(answer)


@csrf_exempt
async def drain_stream(
    request: HttpRequest, agent_id: str, conversation_id: str
) -> HttpResponseBase:
    conversation = _lookup(request, "POST", agent_id, conversation_id)
    if isinstance(conversation, JsonResponse):
        return conversation
    token = object()
    if conversation.running or conversation.owner is not None or not conversation.queue:
        # No-op (a live turn or stream already owns the drain, or nothing is queued): a bare
        # `connected` and an immediate close.
        return _stream(conversation, None, token, conversation.id)
    conversation.owner = token
    turn = conversation.start_turn(**conversation.queue.pop(0).as_input())
    return _stream(conversation, turn, token, conversation.id)


@csrf_exempt
async def stop(request: HttpRequest, agent_id: str, conversation_id: str) -> JsonResponse:
    # The OpenAPI marks the body as required: no body is a 422, `{}` is fine.
    posted = _posted_to(request, agent_id, conversation_id)
    if isinstance(posted, JsonResponse):
        return posted
    conversation, body = posted
    fields = Fields()
    clear_queue = fields.boolean(body, "clear_queue", False)
    if fields.errors:
        return invalid(fields.errors)

    if clear_queue:
        conversation.queue.clear()
    # The live turn, and any async sub-task still working after its router answered.
    busy = [turn for turn in conversation.turns if turn.busy]
    for turn in busy:
        mode = turn.directives.get("stop")
        if mode == "slow":
            delay = turn.directives.number("stop_delay", DEFAULT_STOP_DELAY, hi=600)
            turn.request_stop("manual", delay)
        elif mode != "ignore":  # sim:stop=ignore: answered as documented, the turn goes on
            turn.request_stop("manual")
            # A prompt stop is confirmed by the time the call returns: run-state agrees.
            await turn.settled(1.0)
    return json_response(
        {
            "conversation_id": conversation.id,
            "stopped": bool(busy),
            "cleared_queue": clear_queue,
            "queue_depth": len(conversation.queue),
        }
    )


@csrf_exempt
async def clear_queue(request: HttpRequest, agent_id: str, conversation_id: str) -> JsonResponse:
    conversation = _lookup(request, "DELETE", agent_id, conversation_id)
    if isinstance(conversation, JsonResponse):
        return conversation
    cleared = len(conversation.queue)
    conversation.queue.clear()
    return json_response({"cleared": cleared})


@csrf_exempt
async def cancel_queued(
    request: HttpRequest, agent_id: str, conversation_id: str, message_id: str
) -> JsonResponse:
    conversation = _lookup(request, "DELETE", agent_id, conversation_id)
    if isinstance(conversation, JsonResponse):
        return conversation
    for message in conversation.queue:
        if message.id == message_id:
            conversation.queue.remove(message)
            return json_response(
                {
                    "cancelled": True,
                    "message_id": message_id,
                    "queue_depth": len(conversation.queue),
                }
            )
    return detail(404, "Queued message not found")


@csrf_exempt
async def task(request: HttpRequest, task_id: str) -> JsonResponse:
    """A task record: a sub-task's, or for a conversation id (every router turn's id) its
    latest turn's."""
    key, refused = _guard(request, "GET")
    if refused:
        return refused
    child = subtasks.get(task_id)
    if child is not None and child.turn.conversation.api_key == key:
        return json_response(child.as_task())
    found = conversations.get(task_id)
    if found is None or found.api_key != key or found.current is None:
        return detail(404, "Task not found")
    return json_response(found.current.as_task())


@csrf_exempt
async def not_found(request: HttpRequest) -> JsonResponse:
    record(PROVIDER, request, request.headers.get("x-api-key", "").strip())
    return detail(404, "Not Found")


# --- text ---------------------------------------------------------------------------------------

TOKEN = re.compile(r"\S+\s*")


def topic_of(text: str) -> str:
    words = [word for word in text.split() if not word.startswith("sim:")]
    return " ".join(words)[:120].strip() or "your request"


def ack_chunks(text: str) -> list[str]:
    """The router's acknowledgement when it hands the work to a sub-task."""
    ack = (
        f"I've asked a worker agent to research **{topic_of(text)}**; "
        "its findings follow in this conversation as it works."
    )
    tokens = TOKEN.findall(ack)
    bounds = [round(i * len(tokens) / ACK_CHUNKS) for i in range(ACK_CHUNKS + 1)]
    return ["".join(tokens[bounds[i] : bounds[i + 1]]) for i in range(ACK_CHUNKS)]


def answer_chunks(text: str, count: int) -> list[str]:
    """A deterministic Markdown answer about the message's topic, cut into `count` chunks."""
    topic = topic_of(text)
    answer = (
        f"## {topic}\n\n"
        f"Here is what the agent found about **{topic}**.\n\n"
        "1. **Scope** - the request was split into three sub-questions, and each was "
        "answered from the agent's connected tools before the results were merged.\n"
        "2. **Findings** - the sources agree on the main points; two of them add recent "
        "figures that refine, but do not change, the overall picture.\n"
        "3. **Caveats** - one source is older than a year, so treat its numbers as a "
        "lower bound rather than the current state.\n\n"
        "**Next step:** ask a follow-up in this conversation to go deeper on any point.\n\n"
        "_Generated by the Runbrake xpander simulator._"
    )
    tokens = TOKEN.findall(answer)
    if count <= len(tokens):
        bounds = [round(i * len(tokens) / count) for i in range(count + 1)]
        return ["".join(tokens[bounds[i] : bounds[i + 1]]) for i in range(count)]
    while len(answer) < count:
        answer += f"\n\nMore on {topic}: the agent keeps adding detail as it works."
    bounds = [round(i * len(answer) / count) for i in range(count + 1)]
    return [answer[bounds[i] : bounds[i + 1]] for i in range(count)]


# --- routes -------------------------------------------------------------------------------------

urlpatterns: list[URLPattern] = [
    path("v1/agents/<str:agent_id>/gateway/invoke/stream", invoke_stream),
    path("v1/agents/<str:agent_id>/invoke/stream", invoke_stream),
    path("v1/tasks/<str:task_id>", task),
]
for _prefix in PREFIXES:
    _base = f"v1/agents/<str:agent_id>/{_prefix}/<str:conversation_id>"
    urlpatterns += [
        path(f"{_base}/run-state", run_state),
        path(f"{_base}/messages", messages),
        path(f"{_base}/drain/stream", drain_stream),
        path(f"{_base}/stop", stop),
        path(f"{_base}/queue", clear_queue),
        path(f"{_base}/queue/<str:message_id>", cancel_queued),
    ]
# FastAPI answers unknown routes with a JSON 404, not an HTML page.
urlpatterns.append(re_path(r"", not_found))
