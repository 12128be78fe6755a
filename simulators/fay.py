"""A faithful Fay deep-research API (shared/providers/fay.md §6, docs/providers/fay.md for
the source of each behaviour), served over real HTTP: the four endpoints, the envelope, the
quota tiers (hourly per endpoint and monthly), and signed webhooks registered as in Fay's
dashboard (Settings → Webhooks)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from .core import (
    Directives,
    HourlyLimiter,
    TransientFaults,
    bearer_key,
    iso_at,
    json_response,
    key_is_valid,
    parse_body,
    record,
    record_entry,
)

logger = logging.getLogger(__name__)

VERSION = "1.0.24"
DEFAULT_PENDING = 3.0
DEFAULT_DURATION = 42.0  # ~45 s end to end, as the product's demo expects

# Fay's documented tiers (fay-docs: each endpoint's "Rate Limits"; api-key: requests a month).
# `sim-free-` keys get the free tier, `sim-pro-` keys the pro one, other `sim-` keys no limit.
TIERS = {
    "sim-free-": {"create": 10, "status": 100, "output": 50, "stop": 20, "month": 100},
    "sim-pro-": {"create": 100, "status": 1000, "output": 500, "stop": 200, "month": 10000},
}
limiter = HourlyLimiter(TIERS)
faults = TransientFaults()


@dataclass
class SimRun:
    request_id: str
    conversation_id: str
    api_key: str
    prompt: str
    structured_output: bool
    output_schema: Any
    directives: Directives
    created: float = field(default_factory=time.time)
    stopped_at: float | None = None
    stop_calls: int = 0
    # Set when the run is stopped, so a webhook delivery waiting for a later state gives up.
    stop_signal: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pending(self) -> float:
        return self.directives.number("pending", DEFAULT_PENDING)

    @property
    def duration(self) -> float:
        return self.directives.number("duration", DEFAULT_DURATION)

    @property
    def ends_at(self) -> float:
        return self.created + self.pending + self.duration

    def status(self) -> str:
        now = time.time()
        if self.stopped_at is not None:
            return "STOPPED"
        if now < self.created + self.pending:
            return "PENDING"
        if now < self.ends_at:
            return "PROCESSING"
        return "FAILED" if self.directives.get("fail") == "failed" else "COMPLETED"

    def as_status(self) -> dict[str, Any]:
        status = self.status()
        started = self.created + self.pending
        if status == "STOPPED":
            completed_at: str | None = iso_at(self.stopped_at or time.time())
            started_at = iso_at(started) if (self.stopped_at or 0) >= started else None
        else:
            started_at = iso_at(started) if status != "PENDING" else None
            completed_at = iso_at(self.ends_at) if status in ("COMPLETED", "FAILED") else None
        return {
            "request_id": self.request_id,
            "status": status,
            "prompt": self.prompt,
            "structured_output": self.structured_output,
            "output_schema": self.output_schema,
            "conversation_id": self.conversation_id,
            "created_at": iso_at(self.created),
            "started_at": started_at,
            "completed_at": completed_at,
            "error_message": "Simulated research failure: the sources could not be reached."
            if status == "FAILED"
            else None,
            "metadata": None,
        }


runs: dict[str, SimRun] = {}


def ok(data: dict[str, Any]) -> JsonResponse:
    return json_response({"status": True, "version": VERSION, "data": data})


def error(status: int, code: str, message: str, **headers: str) -> JsonResponse:
    return json_response(
        {"status": False, "version": VERSION, "error": {"message": message, "code": code}},
        status,
        **headers,
    )


def _guard(request: HttpRequest, endpoint: str) -> tuple[str, JsonResponse | None]:
    """Log the call, then apply Fay's checks in Fay's order: auth, rate limit."""
    key = bearer_key(request)
    record("fay", request, key)
    if not key_is_valid(key):
        return key, error(401, "INVALID_API_KEY", "Invalid or expired API key")
    if not limiter.allow(key, endpoint):
        # Fay documents this body and no Retry-After (nor X-RateLimit-*): none is sent.
        return key, error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded")
    return key, None


def _fault(identity: Any, directives: Directives) -> JsonResponse | None:
    kind = directives.get("fail")
    if not faults.take(identity, kind):
        return None
    if kind == "rate_limit":
        # Not Fay's: a simulator convenience so tests need not wait a minute (the client's
        # own wait, without it, starts at 60 s).
        return error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", Retry_After="1")
    return error(500, "INTERNAL_ERROR", "Internal server error")


def _owned(key: str, request_id: str) -> SimRun | None:
    run = runs.get(request_id)
    # Another key's run is as invisible as an unknown one.
    return run if run is not None and run.api_key == key else None


def _needs_json(request: HttpRequest) -> JsonResponse | None:
    if not request.content_type or request.content_type != "application/json":
        return error(400, "VALIDATION_ERROR", "Content-Type must be application/json")
    return None


@csrf_exempt
async def create(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return error(405, "METHOD_NOT_ALLOWED", "Method not allowed")
    key, refused = _guard(request, "create")
    if refused:
        return refused
    if bad := _needs_json(request):
        return bad
    try:
        body = parse_body(request)
    except ValueError:
        return error(400, "VALIDATION_ERROR", "Invalid JSON body")
    if not isinstance(body, dict):
        return error(400, "VALIDATION_ERROR", "Invalid prompt format")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return error(400, "VALIDATION_ERROR", "Invalid prompt format")
    structured = body.get("structured_output", False)
    schema = body.get("output_schema")
    if not isinstance(structured, bool) or not (schema is None or isinstance(schema, dict)):
        return error(400, "VALIDATION_ERROR", "Invalid output schema")
    directives = Directives.parse(prompt)
    identity = ("create", key, prompt)
    if fault := _fault(identity, directives):
        return fault
    run = SimRun(
        request_id=str(uuid.uuid4()),
        conversation_id=secrets.token_hex(12),
        api_key=key,
        prompt=prompt,
        structured_output=structured,
        output_schema=schema,
        directives=directives,
    )
    runs[run.request_id] = run
    faults.carry(identity, run.request_id)
    hook = webhooks.get(key)
    if hook is not None and directives.get("webhook") != "drop":
        _spawn(deliver_lifecycle(run, hook))
    return ok(
        {"request_id": run.request_id, "status": "PENDING", "created_at": iso_at(run.created)}
    )


def _lookup(
    request: HttpRequest, request_id: str, endpoint: str, method: str
) -> SimRun | JsonResponse:
    """The checks every per-run endpoint makes, in Fay's order: method, auth, rate limit,
    content type, the run itself, then any injected fault."""
    if request.method != method:
        return error(405, "METHOD_NOT_ALLOWED", "Method not allowed")
    key, refused = _guard(request, endpoint)
    if refused:
        return refused
    if method == "POST" and (bad := _needs_json(request)):
        return bad
    run = _owned(key, request_id)
    if run is None:
        return error(404, "REQUEST_NOT_FOUND", "Request not found")
    if fault := _fault(run.request_id, run.directives):
        return fault
    return run


@csrf_exempt
async def status(request: HttpRequest, request_id: str) -> JsonResponse:
    run = _lookup(request, request_id, "status", "GET")
    if isinstance(run, JsonResponse):
        return run
    return ok(run.as_status())


@csrf_exempt
async def output(request: HttpRequest, request_id: str) -> JsonResponse:
    run = _lookup(request, request_id, "output", "GET")
    if isinstance(run, JsonResponse):
        return run
    if run.status() != "COMPLETED":
        return error(400, "RESEARCH_NOT_COMPLETED", "Research not completed yet")
    content: Any = (
        structured_from_schema(run.output_schema) if run.structured_output else markdown(run)
    )
    return ok({"conversation_id": run.conversation_id, "status": "COMPLETED", "output": content})


@csrf_exempt
async def stop(request: HttpRequest, request_id: str) -> JsonResponse:
    run = _lookup(request, request_id, "stop", "POST")
    if isinstance(run, JsonResponse):
        return run
    mode = run.directives.get("stop")
    run.stop_calls += 1
    if mode == "lose_first" and run.stop_calls == 1:
        # The first stop call is swallowed: it hangs and never acts (the caller died, or the
        # network dropped it). Only a retry stops the run.
        await asyncio.sleep(run.directives.number("stop_delay", 60.0, hi=600))
        return error(500, "INTERNAL_ERROR", "Internal server error")
    if mode == "error":
        return error(500, "INTERNAL_ERROR", "Internal server error")
    if mode == "slow":
        await asyncio.sleep(run.directives.number("stop_delay", 2.0, hi=120))
    elif mode == "ignore":
        # A provider that never answers: the client's timeout is what ends the call.
        await asyncio.sleep(run.directives.number("stop_delay", 60.0, hi=600))
    current = run.status()
    if current == "COMPLETED":
        return error(400, "CONVERSATION_ALREADY_COMPLETED", "Cannot stop completed conversation")
    if current == "FAILED":
        return error(400, "CONVERSATION_ALREADY_FAILED", "Cannot stop failed conversation")
    if current == "STOPPED":
        return error(400, "CONVERSATION_ALREADY_STOPPED", "Cannot stop stopped conversation")
    run.stopped_at = time.time()
    run.stop_signal.set()
    return ok(
        {
            "request_id": run.request_id,
            "status": "STOPPED",
            "message": "Conversation stopped successfully",
        }
    )


def markdown(run: SimRun) -> str:
    topic = " ".join(w for w in run.prompt.split() if not w.startswith("sim:"))[:120]
    return (
        f"### Research: {topic or 'your question'}\n\n"
        "Fay reviewed 14 sources and found three strong leads.\n\n"
        "1. **Northwind Labs** - publishes quarterly benchmarks; strongest evidence.\n"
        "2. **Contoso Research** - broad survey, weaker on methodology.\n"
        "3. **Fabrikam Institute** - recent, small sample.\n\n"
        "| source | year | confidence |\n|---|---|---|\n"
        "| Northwind Labs | 2025 | high |\n| Contoso Research | 2024 | medium |\n\n"
        "_Generated by the Runbrake Fay simulator._"
    )


def structured_from_schema(schema: Any, name: str = "value") -> Any:
    """A value of the schema's shape, so structured output can be validated end to end."""
    if not isinstance(schema, dict):
        return {"summary": "Simulated structured research output.", "sources": 14}
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {key: structured_from_schema(sub, key) for key, sub in properties.items()}
    if kind == "array":
        return [structured_from_schema(schema.get("items") or {"type": "string"}, name)]
    if kind == "integer":
        return 7
    if kind == "number":
        return 4.2
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return f"Sample {name}"


# --- Webhooks (fay-docs `webhooks`) -----------------------------------------------------------
#
# Registered per account in Fay's dashboard; here per key, through the simulator's stand-in
# for that page (POST /sim/fay/dashboard/webhooks), and kept across restarts like the real
# dashboard's settings. Each event is `{id, type, created, data}`, signed with
# `X-Fay-Signature: sha256=<hex HMAC-SHA256 of the raw body>`, answered within 5 s, retried up
# to 3 times with exponential backoff, and possibly delivered more than once.

EVENTS = ("Status", "Output", "Error")
DELIVERY_TIMEOUT = 5.0
RETRIES = 3
# Pending tasks are kept referenced, or the event loop may drop them mid-delivery.
_tasks: set[asyncio.Task[None]] = set()


@dataclass
class Webhook:
    url: str
    secret: str
    events: tuple[str, ...] = EVENTS
    id: str = field(default_factory=lambda: "wh_" + secrets.token_hex(6))


class WebhookRegistry:
    """Key → its registered webhook, saved to a JSON file (RUNBRAKE_SIM_STATE_DIR)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return Path(settings.RUNBRAKE_SIM_STATE_DIR) / "fay-webhooks.json"

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)

    def get(self, key: str) -> Webhook | None:
        entry = self._load().get(key)
        if not isinstance(entry, dict):
            return None
        return Webhook(
            url=str(entry["url"]),
            secret=str(entry["secret"]),
            events=tuple(entry.get("events") or EVENTS),
            id=str(entry.get("id") or ""),
        )

    def register(self, key: str, url: str, events: tuple[str, ...] = EVENTS) -> Webhook:
        """A new registration gets a new secret; registering the same URL again keeps it."""
        with self._lock:
            data = self._load()
            old = data.get(key)
            if isinstance(old, dict) and old.get("url") == url:
                hook = Webhook(url=url, secret=str(old["secret"]), events=events, id=old["id"])
            else:
                hook = Webhook(url=url, secret="whsec_" + secrets.token_urlsafe(24), events=events)
            data[key] = {
                "url": hook.url,
                "secret": hook.secret,
                "events": list(events),
                "id": hook.id,
            }
            self._save(data)
            return hook

    def remove(self, key: str) -> bool:
        with self._lock:
            data = self._load()
            found = data.pop(key, None) is not None
            self._save(data)
            return found


webhooks = WebhookRegistry()


def register_webhook(key: str, url: str) -> str:
    """For the demo's seed: register `url` for `key` as an admin would in the dashboard, and
    return the secret Fay shows once."""
    return webhooks.register(key, url).secret


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def deliver_lifecycle(run: SimRun, hook: Webhook) -> None:
    """Send the run's Status, Output and Error events as its state changes. Fay documents no
    event for a stop, so a stopped run sends nothing more (Assumption (ours))."""
    if not await _until(run, run.created + run.pending):
        return
    await deliver(run, hook, "Status", {**_status_data(run), "status": "PROCESSING"})
    if not await _until(run, run.ends_at):
        return
    final = run.status()
    await deliver(run, hook, "Status", _status_data(run))
    if final == "COMPLETED":
        content: Any = (
            structured_from_schema(run.output_schema) if run.structured_output else markdown(run)
        )
        await deliver(
            run,
            hook,
            "Output",
            {
                "request_id": run.request_id,
                "conversation_id": run.conversation_id,
                "status": "COMPLETED",
                "output": content,
                "completed_at": iso_at(run.ends_at),
            },
        )
    elif final == "FAILED":
        await deliver(
            run,
            hook,
            "Error",
            {
                "request_id": run.request_id,
                "conversation_id": run.conversation_id,
                "status": "FAILED",
                "error_message": run.as_status()["error_message"],
                "completed_at": iso_at(run.ends_at),
            },
        )


async def _until(run: SimRun, moment: float) -> bool:
    """Sleep until `moment` (plus `sim:webhook_delay`); False when the run was stopped."""
    delay = max(0.0, moment - time.time()) + run.directives.number("webhook_delay", 0.0)
    try:
        await asyncio.wait_for(run.stop_signal.wait(), timeout=delay)
    except TimeoutError:
        return run.stopped_at is None
    return False


def _status_data(run: SimRun) -> dict[str, Any]:
    status = run.as_status()
    return {
        k: status[k]
        for k in (
            "request_id",
            "status",
            "prompt",
            "conversation_id",
            "created_at",
            "started_at",
            "completed_at",
        )
    }


async def deliver(run: SimRun, hook: Webhook, kind: str, data: dict[str, Any]) -> None:
    """POST one event, signed; retried up to 3 times (1, 2, 4 s apart) on a failure.
    `sim:webhook=duplicate` delivers each event twice; `sim:webhook=bad_signature` signs with
    the wrong secret."""
    if kind not in hook.events:
        return
    body = json.dumps(
        {
            "id": "evt_" + secrets.token_hex(8),
            "type": kind,
            "created": int(datetime.now(UTC).timestamp()),
            "data": data,
        },
        separators=(",", ":"),
    ).encode()
    mode = run.directives.get("webhook")
    secret = "not-the-secret" if mode == "bad_signature" else hook.secret
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    for _copy in range(2 if mode == "duplicate" else 1):
        await _post(run, hook, kind, body, signature)


async def _post(run: SimRun, hook: Webhook, kind: str, body: bytes, signature: str) -> None:
    headers = {"Content-Type": "application/json", "X-Fay-Signature": signature}
    async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as client:
        for attempt in range(RETRIES + 1):
            status: int | str
            try:
                response = await client.post(hook.url, content=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            record_entry(
                {
                    "provider": "fay-webhook",
                    "method": "POST",
                    "path": hook.url,
                    "body": {"type": kind, "request_id": run.request_id},
                    "api_key": "",
                    "status": status,
                    "attempt": attempt + 1,
                }
            )
            if isinstance(status, int) and 200 <= status < 300:
                return
            if attempt < RETRIES:
                await asyncio.sleep(2**attempt)
        logger.info("Fay simulator gave up delivering %s for %s", kind, run.request_id)


@csrf_exempt
async def dashboard_webhooks(request: HttpRequest) -> JsonResponse:
    """The stand-in for Fay's dashboard page (Settings → Webhooks), by API key: POST
    `{"url", "events"?}` registers and shows the secret once; GET lists; DELETE removes."""
    key = bearer_key(request)
    if not key_is_valid(key):
        return error(401, "INVALID_API_KEY", "Invalid or expired API key")
    if request.method == "GET":
        hook = webhooks.get(key)
        listed = [] if hook is None else [{"id": hook.id, "url": hook.url, "events": hook.events}]
        return ok({"webhooks": listed})
    if request.method == "DELETE":
        return ok({"removed": webhooks.remove(key)})
    if request.method != "POST":
        return error(405, "METHOD_NOT_ALLOWED", "Method not allowed")
    try:
        body = parse_body(request)
    except ValueError:
        return error(400, "VALIDATION_ERROR", "Invalid JSON body")
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        # Fay requires HTTPS; the simulator also takes http:// for a local demo.
        return error(400, "VALIDATION_ERROR", "Enter the webhook URL (https://…)")
    events = body.get("events") or list(EVENTS)
    if not isinstance(events, list) or not set(events) <= set(EVENTS):
        return error(400, "VALIDATION_ERROR", f"events must be among {', '.join(EVENTS)}")
    hook = webhooks.register(key, url, tuple(events))
    return ok({"id": hook.id, "url": hook.url, "events": list(hook.events), "secret": hook.secret})
