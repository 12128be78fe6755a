"""A faithful Dify chat-family Service API (docs/providers/dify.md), served over real HTTP.

One `POST /chat-messages` = one *task* and one stored *message*. Generation runs as an asyncio
task per message that publishes the message's wire events in order; the HTTP response
(streaming or blocking) only reads them. That split is what Dify itself has (a worker publishes
to a queue the HTTP pipeline drains), and it is what lets a dropped connection
(`sim:drop_stream`) leave the message generating.

What history shows follows Dify's source, not what a client would like: a message's `answer`
is written only when the reply ends (finished, stopped or timed out); while it generates,
`GET /messages` lists it with `answer: ""` and `status: "normal"`.

Apps are keys: `sim-…` is a Chatbot (`chat`), `sim-agent-…` an Agent (`agent-chat`),
`sim-newagent-…` a New Agent (`agent`), `sim-chatflow-…` a Chatflow (`advanced-chat`),
`sim-workflow-…` a Workflow app (chat routes answer `not_chat_app`), `sim-disabled-…` an app
whose API is switched off (403). simulators/README.md names the source of each behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
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
IDLE_TIMEOUT = 300.0  # streaming_utils.stream_topic_events: a Chatflow stream's idle timeout
TASK_OWNER_TTL = 1800.0  # the "task T belongs to user U" record lives 30 minutes
DEFAULT_STOP_DELAY = 3.0
DEFAULT_USER = "DEFAULT-USER"  # what Dify calls the end user of a GET without `user`
UUID_NIL = "00000000-0000-0000-0000-000000000000"  # parent_message_id of Service-API messages
PYDANTIC_DOCS = "https://errors.pydantic.dev/2.11/v/"
FILES_URL = "http://files.sim.invalid"

BAD_JSON_TYPE = (
    "Did not attempt to load JSON data because the request Content-Type was not 'application/json'."
)
QUOTA_EXCEEDED = (
    "Your quota for Dify Hosted Model Provider has been exhausted. Please go to Settings -> "
    "Model Provider to complete your own provider credentials."
)
STREAM_FAILURE = "[sim] Server Unavailable Error, the model provider failed mid-answer."
STOPPED_BY_USER = "Stopped by user."  # QueueStopEvent.get_stop_reason
ABORTED = "Aborted: User requested stop"  # GraphRunAbortedEvent's reason (dify #31755)

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
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    # Every event the pipeline published, in order; streams replay them.
    events: list[dict[str, Any]] = field(default_factory=list)
    # The text generated so far (Dify's in-memory llm_result): never shown by history.
    streamed: list[str] = field(default_factory=list)
    # What history shows: written only when the reply ends.
    answer: str = ""
    status: str = "normal"
    error: str | None = None
    done: bool = False
    latency: float | None = None
    first_token: float | None = None
    thoughts: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    workflow_run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # A Chatflow stop that reaches the graph engine first (or any stop with sim:stop=abort).
    abort: bool = False
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def text(self) -> str:
        return "".join(self.streamed)

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

    def publish(self, event: str, **fields: Any) -> None:
        # The converter puts these four first, then task_id and the event's own fields.
        self.events.append(
            {
                "event": event,
                "conversation_id": self.conversation.id,
                "message_id": self.id,
                "created_at": self.created_at,
                **fields,
            }
        )
        self.notify()

    def publish_text(self, event: str, delta: str, **fields: Any) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
        self.streamed.append(delta)
        self.publish(event, task_id=self.task_id, id=self.id, answer=delta, **fields)

    def fail(self, description: str) -> None:
        """handle_error: status `error` and the error text; the answer stays ""."""
        self.status, self.error = "error", description

    def finish(self) -> None:
        if self.done:
            return
        self.latency = time.monotonic() - self.started
        self.done = True
        self.notify()

    def usage(self) -> dict[str, Any]:
        """graphon's LLMUsage: token counts, prices as decimal strings, latency in seconds."""
        prompt_tokens = max(1, len(self.query) // 4)
        completion_tokens = max(0, len(self.text) // 4)
        prompt_price = Decimal(prompt_tokens) * Decimal("0.001") * Decimal("0.001")
        completion_price = Decimal(completion_tokens) * Decimal("0.002") * Decimal("0.001")
        latency = self.latency if self.latency is not None else time.monotonic() - self.started
        timing: dict[str, float | None] = {"time_to_first_token": None, "time_to_generate": None}
        if self.mode == "advanced-chat" and self.first_token is not None:
            # Only the Chatflow pipeline sets these (rounded to ms), and only when streaming.
            timing = {
                "time_to_first_token": round(self.first_token - self.started, 3),
                "time_to_generate": round(time.monotonic() - self.first_token, 3),
            }
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
            **timing,
        }

    def metadata(self) -> dict[str, Any]:
        return {"annotation_reply": None, "retriever_resources": [], "usage": self.usage()}

    def as_history(self) -> dict[str, Any]:
        # MessageListItem (api/fields/message_fields.py), in its field order.
        return {
            "id": self.id,
            "conversation_id": self.conversation.id,
            "parent_message_id": UUID_NIL,
            "inputs": self.conversation.inputs,
            "query": self.query,
            "answer": self.answer,
            "feedback": None,
            "retriever_resources": [],
            "created_at": self.created_at,
            "agent_thoughts": [dict(t) for t in self.thoughts],
            "message_files": [_history_file(f) for f in self.files],
            "status": self.status,
            "error": self.error,
            "extra_contents": [],
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
    for prefix, mode in (
        ("sim-agent-", "agent-chat"),
        ("sim-newagent-", "agent"),
        ("sim-chatflow-", "advanced-chat"),
        ("sim-workflow-", "workflow"),
    ):
        if key.startswith(prefix):
            return mode
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


def _chat_post(request: HttpRequest) -> tuple[str, dict[str, Any], str] | JsonResponse:
    """A POST for an end user: the app's key, the JSON body and its `user`, or the refusal
    Dify answers (a bad key, a body that is no JSON object, no user)."""
    key, refused = _guard(request, "POST")
    if refused:
        return refused
    body = _json_body(request)
    if isinstance(body, JsonResponse):
        return body
    user = _user_of(body.get("user"))
    if user is None:
        return error(400, "invalid_param", "Arg user must be provided.")
    return key, body, user


def _chat_reader(request: HttpRequest) -> tuple[str, str] | JsonResponse:
    """A GET of a chat app's records: the app's key and the end user it reads for (`user`,
    else the default), or the refusal Dify answers (a bad key, a workflow app)."""
    key, refused = _guard(request, "GET")
    if refused:
        return refused
    if app_mode(key) == "workflow":
        return _not_chat_app()
    return key, _user_of(request.GET.get("user")) or DEFAULT_USER


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


# (field, pydantic's message, pydantic's error type, the input it refused)
Problem = tuple[str, str, str, Any]
MISSING = object()


def _input_repr(value: Any) -> str:
    # pydantic-core shortens long inputs to their first and last characters.
    text = repr(value)
    return text if len(text) <= 50 else f"{text[:25]}...{text[-24:]}"


def pydantic_error(model: str, problems: list[Problem]) -> JsonResponse:
    """A pydantic ValidationError (a ValueError) as Dify answers it: 400 `invalid_param` with
    pydantic's own text."""
    count = len(problems)
    lines = [f"{count} validation error{'s' if count != 1 else ''} for {model}"]
    for loc, message, kind, value in problems:
        lines += [
            loc,
            f"  {message} [type={kind}, input_value={_input_repr(value)}, "
            f"input_type={type(value).__name__}]",
            f"    For further information visit {PYDANTIC_DOCS}{kind}",
        ]
    return error(400, "invalid_param", "\n".join(lines))


def _chat_payload_problems(body: dict[str, Any]) -> list[Problem]:
    """ChatRequestPayload (controllers/service_api/app/completion.py), field by field."""
    problems: list[Problem] = []
    if "inputs" not in body:
        problems.append(("inputs", "Field required", "missing", body))
    elif not isinstance(body["inputs"], dict):
        problems.append(
            ("inputs", "Input should be a valid dictionary", "dict_type", body["inputs"])
        )
    if "query" not in body:
        problems.append(("query", "Field required", "missing", body))
    elif not isinstance(body["query"], str):
        problems.append(("query", "Input should be a valid string", "string_type", body["query"]))
    files = body.get("files")
    if files is not None and not isinstance(files, list):
        problems.append(("files", "Input should be a valid list", "list_type", files))
    response_mode = body.get("response_mode")
    if response_mode is not None and response_mode not in ("blocking", "streaming"):
        problems.append(
            (
                "response_mode",
                "Input should be 'blocking' or 'streaming'",
                "literal_error",
                response_mode,
            )
        )
    conversation_id = body.get("conversation_id")
    if conversation_id not in (None, "") and not (
        isinstance(conversation_id, str) and _is_uuid(conversation_id)
    ):
        problems.append(
            (
                "conversation_id",
                "Value error, conversation_id must be a valid UUID",
                "value_error",
                conversation_id,
            )
        )
    if not isinstance(body.get("auto_generate_name", True), bool):
        problems.append(
            (
                "auto_generate_name",
                "Input should be a valid boolean",
                "bool_type",
                body["auto_generate_name"],
            )
        )
    return problems


def _limit(raw: str | None, problems: list[Problem]) -> int:
    if raw is None:
        return 20
    try:
        value = int(raw)
    except ValueError:
        problems.append(
            (
                "limit",
                "Input should be a valid integer, unable to parse string as an integer",
                "int_parsing",
                raw,
            )
        )
        return 20
    if value < 1:
        problems.append(
            ("limit", "Input should be greater than or equal to 1", "greater_than_equal", value)
        )
    elif value > 100:
        problems.append(
            ("limit", "Input should be less than or equal to 100", "less_than_equal", value)
        )
    return value


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


# --- files ------------------------------------------------------------------------------------


def _file(belongs_to: str, transfer_method: str) -> dict[str, Any]:
    file_id, upload_id = str(uuid.uuid4()), str(uuid.uuid4())
    return {
        "id": file_id,
        "upload_file_id": upload_id,
        "filename": f"{upload_id}.png",
        "belongs_to": belongs_to,
        "transfer_method": transfer_method,
        # sign_tool_file: a signed URL under FILES_URL.
        "url": f"{FILES_URL}/files/tools/{upload_id}.png?timestamp={int(time.time())}"
        f"&nonce={uuid.uuid4().hex}&sign=c2lt",
    }


def _history_file(f: dict[str, Any]) -> dict[str, Any]:
    # MessageFile in message_fields.py.
    return {
        "id": f["id"],
        "filename": f["filename"],
        "type": "image",
        "url": f["url"],
        "mime_type": "image/png",
        "size": 18431,
        "transfer_method": f["transfer_method"],
        "belongs_to": f["belongs_to"],
        "upload_file_id": f["upload_file_id"],
    }


def _end_file(f: dict[str, Any]) -> dict[str, Any]:
    # prepare_file_dict, as message_end's `files` lists them.
    return {
        "related_id": f["id"],
        "extension": ".png",
        "filename": f["filename"],
        "size": 18431,
        "mime_type": "image/png",
        "transfer_method": f["transfer_method"],
        "type": "image",
        "url": f["url"],
        "upload_file_id": f["upload_file_id"],
        "remote_url": None,
    }


# --- generation -------------------------------------------------------------------------------


async def _pause(message: Message, seconds: float) -> bool:
    """Wait `seconds`, or less if a stop lands: True when the message must stop now."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(message.stop_requested.wait(), seconds)
    return message.stop_requested.is_set()


def _fails_at(message: Message) -> int:
    """The chunk after which `sim:fail=error` breaks the model provider (0: never)."""
    return max(1, len(message.chunks) // 2) if message.directives.get("fail") == "error" else 0


def _message_end(message: Message) -> None:
    """EasyUI's `_save_message` then `message_end`: the answer is saved stripped, for a
    finished and a stopped reply alike (no field marks a stop); `files` is null unless the
    message has files."""
    message.answer = message.text.strip()
    message.publish(
        "message_end",
        task_id=message.task_id,
        id=message.id,
        metadata=message.metadata(),
        files=[_end_file(f) for f in message.files] if message.files else None,
    )


def _error_event(message: Message, code: str, status: int, description: str) -> None:
    # The error envelope, alone among events without task_id.
    message.fail(description)
    message.publish("error", code=code, status=status, message=description)


async def _chat(message: Message) -> None:
    """Chatbot: `message` deltas, then `message_end`. Once the message has a file,
    `get_message_event_type` labels the text chunks `message_file` (sim:message_file)."""
    as_file = "message_file" in message.directives.values
    if as_file:
        # In 1.11 to 1.12 a user's upload was enough (dify #31888, LangBot #1964).
        message.files.append(_file("user", "remote_url"))
    if await _pause(message, message.directives.number("delay", 0.0)):
        return _message_end(message)
    fail_at = _fails_at(message)
    for index, chunk in enumerate(message.chunks, start=1):
        event = "message_file" if as_file and index > 1 else "message"
        message.publish_text(event, chunk, from_variable_selector=None)
        if index == fail_at:
            return _error_event(message, "completion_request_error", 400, STREAM_FAILURE)
        if await _pause(message, message.interval):
            break
    _message_end(message)


def _thought(message: Message, thought_id: str, position: int, **fields: Any) -> dict[str, Any]:
    """An agent thought row, as history lists it (AgentThought in conversation_fields.py)."""
    row = {
        "id": thought_id,
        "chain_id": None,
        "message_id": message.id,
        "position": position,
        "thought": "",
        "tool": "",
        "tool_labels": {},
        "tool_input": "",
        "created_at": int(time.time()),
        "observation": "",
        "files": [],
        **fields,
    }
    for i, existing in enumerate(message.thoughts):
        if existing["id"] == thought_id:
            message.thoughts[i] = row | {"created_at": existing["created_at"]}
            break
    else:
        message.thoughts.append(row)
    return row


def _publish_thought(message: Message, row: dict[str, Any]) -> None:
    message.publish(
        "agent_thought",
        task_id=message.task_id,
        id=row["id"],
        position=row["position"],
        thought=row["thought"],
        observation=row["observation"],
        tool=row["tool"],
        tool_labels=row["tool_labels"],
        tool_input=row["tool_input"],
        message_files=[f["id"] for f in row["files"]],
    )


async def _agent_chat(message: Message) -> None:
    """Agent (function calling): a tool call as thoughts, the answer as `agent_message`
    deltas, the answer thought saved, then `message_end` (research example B)."""
    if await _pause(message, message.directives.number("delay", 0.0)):
        return _message_end(message)
    tool, labels = "current_time", {"current_time": {"en_US": "Current Time"}}
    tool_input = '{"current_time": {"timezone": "UTC"}}'
    call_id, answer_id = str(uuid.uuid4()), str(uuid.uuid4())
    _publish_thought(
        message, _thought(message, call_id, 1, tool=tool, tool_labels=labels, tool_input=tool_input)
    )
    if await _pause(message, message.interval):
        return _message_end(message)
    observation = json.dumps({"current_time": time.strftime("%Y-%m-%d %H:%M:%S UTC")})
    _publish_thought(
        message,
        _thought(
            message,
            call_id,
            1,
            tool=tool,
            tool_labels=labels,
            tool_input=tool_input,
            observation=observation,
        ),
    )
    _publish_thought(message, _thought(message, answer_id, 2))
    fail_at = _fails_at(message)
    for index, chunk in enumerate(message.chunks, start=1):
        message.publish_text("agent_message", chunk)
        if index == fail_at:
            return _error_event(message, "completion_request_error", 400, STREAM_FAILURE)
        if await _pause(message, message.interval):
            break
    _publish_thought(message, _thought(message, answer_id, 2, thought=message.text))
    _message_end(message)


async def _new_agent(message: Message) -> None:
    """New Agent (`mode: agent`, agent_app/app_runner.py): each delta updates the answer
    thought and goes out as `agent_message`; a success closes with ONE `message` carrying
    the whole answer (`message_file` once a tool made a file), then `message_end`. A stop
    ends with `message_end` alone."""
    if await _pause(message, message.directives.number("delay", 0.0)):
        return _message_end(message)
    position = 1
    if "message_file" in message.directives.values:
        # _persist_tool_files_from_metadata: the tool's file is an assistant MessageFile.
        call_id = str(uuid.uuid4())
        labels = {"make_chart": {"en_US": "make_chart"}}
        fields = {"tool": "make_chart", "tool_labels": labels, "tool_input": '{"series": [3]}'}
        _publish_thought(message, _thought(message, call_id, 1, **fields))
        _publish_thought(
            message, _thought(message, call_id, 1, observation='{"ok": true}', **fields)
        )
        made = _file("assistant", "tool_file")
        message.files.append(made)
        message.publish(
            "message_file",
            task_id=message.task_id,
            id=made["id"],
            type="image",
            belongs_to="assistant",
            url=made["url"],
        )
        position = 2
    answer_id = str(uuid.uuid4())
    fail_at = _fails_at(message)
    stopped = False
    for index, chunk in enumerate(message.chunks, start=1):
        _publish_thought(message, _thought(message, answer_id, position))
        message.publish_text("agent_message", chunk)
        if index == fail_at:
            return _error_event(message, "completion_request_error", 400, STREAM_FAILURE)
        if await _pause(message, message.interval):
            stopped = True
            break
    if not stopped:
        # publish_text_answer: the complete answer as one chunk. Its event type is decided
        # on this first LLM chunk: `message_file` when the message has an assistant file.
        closing = "message_file" if message.files else "message"
        message.publish(
            closing,
            task_id=message.task_id,
            id=message.id,
            answer=message.text,
            from_variable_selector=None,
        )
    _message_end(message)


def _workflow(message: Message, event: str, **data: Any) -> None:
    message.publish(
        event, task_id=message.task_id, workflow_run_id=message.workflow_run_id, data=data
    )


def _node(message: Message, event: str, node: dict[str, Any], **data: Any) -> None:
    base = {
        "id": node["execution_id"],
        "node_id": node["node_id"],
        "node_type": node["node_type"],
        "title": node["title"],
        "index": node["index"],
        "predecessor_node_id": node["predecessor_node_id"],
        "inputs": None if event == "node_started" else {},
        "inputs_truncated": False,
        "created_at": int(time.time()),
    }
    if event == "node_started":
        base |= {"extras": {}, "iteration_id": None, "loop_id": None, "agent_strategy": None}
    else:
        base |= {
            "process_data": {},
            "process_data_truncated": False,
            "outputs": data.pop("outputs", {}),
            "outputs_truncated": False,
            "status": data.pop("status", "succeeded"),
            "error": data.pop("error", None),
            "elapsed_time": round(time.monotonic() - message.started, 3),
            "execution_metadata": {},
            "finished_at": int(time.time()),
            "files": [],
            "iteration_id": None,
            "loop_id": None,
        }
    _workflow(message, event, **base, **data)


def _workflow_finished(message: Message, status: str, error: str | None, **outputs: Any) -> None:
    _workflow(
        message,
        "workflow_finished",
        id=message.workflow_run_id,
        workflow_id=str(uuid.uuid5(uuid.NAMESPACE_URL, message.conversation.api_key)),
        status=status,
        outputs=outputs,
        error=error,
        elapsed_time=round(time.monotonic() - message.started, 3),
        total_tokens=message.usage()["total_tokens"],
        total_steps=3,
        created_by={"id": str(uuid.uuid5(uuid.NAMESPACE_URL, message.conversation.user))},
        created_at=message.created_at,
        finished_at=int(time.time()),
        exceptions_count=0,
        files=[],
    )


async def _chatflow(message: Message) -> None:
    """Chatflow (advanced-chat): workflow and node events around `message` deltas;
    `message_end` comes before `workflow_finished`, and the stream closes at
    `workflow_finished` (streaming_utils' terminal events)."""
    if message.directives.get("fail") == "prerun":
        # workflow_execute_task._publish_error_event: no code, no ids, and (dify #37197)
        # nothing terminal after it, so the stream hangs until its idle timeout.
        message.fail("query is required")
        message.events.append({"event": "error", "message": "query is required", "status": 500})
        message.notify()
        return
    _workflow(
        message,
        "workflow_started",
        id=message.workflow_run_id,
        workflow_id=str(uuid.uuid5(uuid.NAMESPACE_URL, message.conversation.api_key)),
        inputs={
            "sys.query": message.query,
            "sys.files": [],
            "sys.conversation_id": message.conversation.id,
            "sys.user_id": message.conversation.user,
            "sys.dialogue_count": len(message.conversation.messages),
        },
        created_at=message.created_at,
        reason="initial",
    )
    start = {
        "execution_id": str(uuid.uuid4()),
        "node_id": "1782899000000",
        "node_type": "start",
        "title": "Start",
        "index": 1,
        "predecessor_node_id": None,
    }
    llm = start | {
        "execution_id": str(uuid.uuid4()),
        "node_id": "1782899000001",
        "node_type": "llm",
        "title": "LLM",
        "index": 2,
        "predecessor_node_id": start["node_id"],
    }
    answer = llm | {
        "execution_id": str(uuid.uuid4()),
        "node_id": "answer",
        "node_type": "answer",
        "title": "Answer",
        "index": 3,
        "predecessor_node_id": llm["node_id"],
    }
    _node(message, "node_started", start)
    _node(message, "node_finished", start)
    _node(message, "node_started", llm)
    stopped = await _pause(message, message.directives.number("delay", 0.0))
    fail_at = _fails_at(message)
    for index, chunk in enumerate([] if stopped else message.chunks, start=1):
        message.publish_text("message", chunk, from_variable_selector=[llm["node_id"], "text"])
        if index == fail_at:
            _node(message, "node_finished", llm, status="failed", error=STREAM_FAILURE)
            _workflow_finished(message, "failed", STREAM_FAILURE)
            # Published after the terminal event: the HTTP reader has already returned.
            return _error_event(message, "internal_server_error", 500, STREAM_FAILURE)
        if await _pause(message, message.interval):
            stopped = True
            break
    if stopped and message.abort:
        # The graph engine's AbortCommand won the race (GraphRunAbortedEvent).
        _workflow_finished(message, "failed", ABORTED)
        return _error_event(message, "internal_server_error", 500, ABORTED)
    if stopped:
        # _handle_stop_event: workflow_finished first, then the partial answer is saved and
        # message_end published (after the stream's terminal event, so never delivered).
        _workflow_finished(message, "stopped", STOPPED_BY_USER)
        message.answer = message.text
        return _chatflow_message_end(message)
    _node(message, "node_finished", llm, outputs={"text": message.text})
    _node(message, "node_started", answer)
    _node(message, "node_finished", answer, outputs={"answer": message.text})
    message.answer = message.text
    _chatflow_message_end(message)
    _workflow_finished(message, "succeeded", None, answer=message.text)


def _chatflow_message_end(message: Message) -> None:
    message.publish(
        "message_end",
        task_id=message.task_id,
        id=message.id,
        metadata=message.metadata(),
        files=[],  # self._recorded_files: a list, often empty
    )


RUNNERS: dict[str, Callable[[Message], Awaitable[None]]] = {
    "chat": _chat,
    "agent-chat": _agent_chat,
    "agent": _new_agent,
    "advanced-chat": _chatflow,
}


async def _generate(message: Message) -> None:
    """Dify's worker: publish the reply at the requested pace until done, stopped or failed.

    Nothing here depends on an HTTP reader being connected."""
    try:
        await RUNNERS[message.mode](message)
    finally:
        message.finish()


# --- SSE --------------------------------------------------------------------------------------

PING = b"event: ping\n\n"
# Where each kind of app's HTTP stream ends: the EasyUI pipeline breaks after its end or
# error; a Chatflow's pub/sub reader returns on workflow_finished / workflow_paused only.
TERMINAL = {
    "advanced-chat": {"workflow_finished", "workflow_paused"},
    "chat": {"message_end", "error"},
    "agent-chat": {"message_end", "error"},
    "agent": {"message_end", "error"},
}


def _frame(payload: dict[str, Any]) -> bytes:
    # base_app_generator.convert_to_event_stream: `data: <orjson>\n\n`, compact, raw UTF-8.
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _is_text(payload: dict[str, Any]) -> bool:
    return payload["event"] in ("message", "message_file", "agent_message") and "answer" in payload


async def _stream(message: Message) -> AsyncIterator[bytes]:
    """The HTTP side: replay the message's events as SSE, with a ping every 10 s of run
    time, until this kind of app's terminal event (or the connection is dropped on purpose)."""
    ping_every = message.directives.number("ping_interval", PING_INTERVAL, lo=0.05)
    next_ping = message.started + ping_every
    idle_timeout = message.directives.number("idle_timeout", IDLE_TIMEOUT, lo=0.05)
    idle_until: float | None = None
    drop_after = (
        max(1, len(message.chunks) // 2) if "drop_stream" in message.directives.values else 0
    )
    terminal = TERMINAL[message.mode]
    if message.mode == "advanced-chat":
        # stream_topic_events pings at once "to prevent the connection staying in pending".
        yield PING
    sent = texts = 0
    while True:
        while sent < len(message.events):
            payload = message.events[sent]
            sent += 1
            yield _frame(payload)
            if payload["event"] in terminal:
                return
            if _is_text(payload):
                texts += 1
                if texts == drop_after:
                    # sim:drop_stream: the connection ends with no terminal event while the
                    # message keeps generating. (A clean EOF: under ASGI an exception here
                    # does not reset the socket, daphne just leaves it hanging.)
                    return
        now = time.monotonic()
        if message.done:
            if message.mode != "advanced-chat":
                return  # cancelled at shutdown: nothing more will come
            # All published and nothing terminal (a Chatflow's pre-run error): the reader
            # waits for a terminal event until its idle timeout.
            idle_until = idle_until or now + idle_timeout
            if now >= idle_until:
                return
        if now >= next_ping:
            yield PING
            while next_ping <= now:
                next_ping += ping_every
            continue
        wake = min(next_ping, idle_until) if idle_until is not None else next_ping
        changed = message._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), wake - now)


# --- views ------------------------------------------------------------------------------------


@csrf_exempt
async def chat_messages(request: HttpRequest) -> HttpResponseBase:
    posted = _chat_post(request)
    if isinstance(posted, JsonResponse):
        return posted
    key, body, user = posted
    mode = app_mode(key)
    if mode == "workflow":
        return _not_chat_app()
    if problems := _chat_payload_problems(body):
        return pydantic_error("ChatRequestPayload", problems)
    query = body["query"].replace("\x00", "")
    inputs = body["inputs"]
    requested_mode = body.get("response_mode")
    if mode == "agent" and requested_mode == "blocking":
        # completion.py _resolve_agent_app_streaming: BadRequest.
        return error(400, "bad_request", "Agent App only supports streaming response mode.")
    # Omitted means blocking, except for New Agent, which defaults to streaming.
    response_mode = requested_mode or ("streaming" if mode == "agent" else "blocking")
    if not query:
        return error(400, "invalid_param", "query is required")
    if mode == "agent-chat" and response_mode == "blocking":
        # AgentChatAppGenerator.generate raises a ValueError: invalid_param, not bad_request.
        return error(400, "invalid_param", "Agent Chat App does not support blocking mode")

    directives = Directives.parse(query)
    identity = ("chat", key, user, query)
    if refused := _fault(identity, directives, key):
        return refused

    conversation_id = body.get("conversation_id") or ""
    conversation = conversations.get(str(uuid.UUID(conversation_id))) if conversation_id else None
    # Another user's (or another app's) conversation is as absent as an unknown one.
    if conversation is not None and (conversation.api_key != key or conversation.user != user):
        conversation = None
    if conversation_id and conversation is None and mode != "advanced-chat":
        return error(404, "not_found", "Conversation Not Exists.")
    if conversation is None:
        # A Chatflow given an unknown conversation_id silently starts a new one
        # (advanced_chat/app_generator.py, SERVICE_API).
        topic = topic_of(query)
        conversation = Conversation(
            id=str(uuid.uuid4()),
            api_key=key,
            user=user,
            name=topic[:40] if body.get("auto_generate_name", True) else "New conversation",
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
            "metadata": message.metadata(),
            "created_at": message.created_at,
        }
    )


def _fault(identity: Any, directives: Directives, key: str) -> JsonResponse | None:
    kind = directives.get("fail")
    if kind == "quota":
        return error(400, "provider_quota_exceeded", QUOTA_EXCEEDED)
    if kind == "plan_limit":
        # Dify Cloud's plan quota (QuotaService, BILLING_ENABLED): a 429 retrying does not cure.
        return error(
            429,
            "rate_limit_error",
            "Workflow execution quota limit reached for tenant "
            f"{uuid.uuid5(uuid.NAMESPACE_URL, key)}",
        )
    counted = "rate_limit" if kind == "rate_limit_429" else kind
    if not faults.take(identity, counted):
        return None
    if kind == "rate_limit":
        # The per-app concurrency ceiling: AppInvokeQuotaExceededError is a ValueError, and
        # the ValueError handler is registered first, so it answers 400 invalid_param.
        # Never a Retry-After.
        app_id = uuid.uuid5(uuid.NAMESPACE_URL, key)
        return error(
            400,
            "invalid_param",
            "Too many requests. Please try again later. The current maximum concurrent "
            f"requests allowed for {app_id} is 1.",
        )
    if kind == "rate_limit_429":
        # The documented reading of the same ceiling (docs' errors guide); still no Retry-After.
        return error(429, "too_many_requests", "Too many requests. Please try again later.")
    return error(500, "internal_server_error", "Internal Server Error, please contact support.")


def _start(conversation: Conversation, query: str, directives: Directives, mode: str) -> Message:
    duration = directives.number("duration", DEFAULT_DURATION)
    default_chunks = max(1, round(duration * CHUNKS_PER_SECOND))
    count = int(directives.number("chunks", default_chunks, lo=1, hi=MAX_CHUNKS))
    message = Message(
        id=str(uuid.uuid4()),
        task_id=str(uuid.uuid4()),
        conversation=conversation,
        query=query,
        directives=directives,
        chunks=split(answer_text(topic_of(query), count), count),
        mode=mode,
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
    posted = _chat_post(request)
    if isinstance(posted, JsonResponse):
        return posted
    key, _, user = posted
    if app_mode(key) == "workflow":
        return _not_chat_app()
    message = tasks.get(task_id)
    # app_task_service.stop_task: an unknown or expired task, another user's (or app's) task,
    # a finished one or a repeated stop changes nothing, and the answer is the same success.
    if message is None or message.conversation.api_key != key or message.done:
        return json_response({"result": "success"})
    owner = message.conversation.user == user and message.owner_alive
    directive = message.directives.get("stop")
    if message.mode == "advanced-chat" and (not owner or directive == "abort"):
        # GraphEngineManager.send_stop_command: an AbortCommand "without user validation".
        message.abort = True
        message.stop_requested.set()
    elif owner and directive == "slow":
        delay = message.directives.number("stop_delay", DEFAULT_STOP_DELAY, hi=600)
        asyncio.get_running_loop().call_later(delay, message.stop_requested.set)
    elif owner and directive != "ignore":
        message.stop_requested.set()
    return json_response({"result": "success"})


@csrf_exempt
async def messages(request: HttpRequest) -> JsonResponse:
    reader = _chat_reader(request)
    if isinstance(reader, JsonResponse):
        return reader
    key, user = reader
    # MessageListQuery (controllers/common/controller_schemas.py).
    problems: list[Problem] = []
    conversation_id = request.GET.get("conversation_id")
    if conversation_id is None:
        problems.append(("conversation_id", "Field required", "missing", dict(request.GET.items())))
    first_id = request.GET.get("first_id") or None
    for name, value in (("conversation_id", conversation_id), ("first_id", first_id)):
        if value and not _is_uuid(value):
            problems.append(
                (name, f"Value error, {name} must be a valid UUID", "value_error", value)
            )
    limit = _limit(request.GET.get("limit"), problems)
    if problems:
        return pydantic_error("MessageListQuery", problems)
    if not conversation_id:
        # pagination_by_first_id: no conversation, no messages (and no 404).
        return json_response({"limit": limit, "has_more": False, "data": []})
    conversation = conversations.get(str(uuid.UUID(conversation_id)))
    if conversation is None or conversation.api_key != key or conversation.user != user:
        return error(404, "not_found", "Conversation Not Exists.")
    older = conversation.messages
    if first_id is not None:
        # first_id is the oldest message the client already holds: page to older ones.
        ids = [m.id for m in older]
        if str(uuid.UUID(first_id)) not in ids:
            return error(404, "not_found", "First Message Not Exists.")
        older = older[: ids.index(str(uuid.UUID(first_id)))]
    # The newest `limit` messages, then reversed to oldest first: the newest is LAST.
    page = older[-limit:]
    return json_response(
        {
            "limit": limit,
            "has_more": len(older) > limit,
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
    reader = _chat_reader(request)
    if isinstance(reader, JsonResponse):
        return reader
    key, user = reader
    problems: list[Problem] = []
    limit = _limit(request.GET.get("limit") or None, problems)
    if problems:
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
    # AppInfoApi.get: works for every mode, so it is a good key check.
    return json_response(
        {
            "name": "Runbrake Dify simulator",
            "description": "A simulated Dify app for Runbrake's development and tests.",
            "tags": [],
            "mode": app_mode(key),
            "author_name": "Runbrake",
        }
    )


@csrf_exempt
async def parameters(request: HttpRequest) -> JsonResponse:
    _key, refused = _guard(request, "GET")
    if refused:
        return refused
    # get_parameters_from_feature_dict: every feature off, no input form.
    off = {"enabled": False}
    return json_response(
        {
            "opening_statement": "",
            "suggested_questions": [],
            "suggested_questions_after_answer": off,
            "speech_to_text": off,
            "text_to_speech": off,
            "retriever_resource": off,
            "annotation_reply": off,
            "more_like_this": off,
            "user_input_form": [],
            "sensitive_word_avoidance": off,
            "file_upload": {"image": off},
            "system_parameters": {
                "image_file_size_limit": 10,
                "video_file_size_limit": 100,
                "audio_file_size_limit": 50,
                "file_size_limit": 15,
                "workflow_file_upload_limit": 10,
            },
        }
    )


urlpatterns = [
    path("chat-messages", chat_messages, name="dify-chat-messages"),
    path("chat-messages/<str:task_id>/stop", stop, name="dify-stop"),
    path("messages", messages, name="dify-messages"),
    path("conversations", conversation_list, name="dify-conversations"),
    path("info", info, name="dify-info"),
    path("parameters", parameters, name="dify-parameters"),
]
