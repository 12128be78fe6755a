"""A faithful Fay deep-research API (shared/providers/fay.md §6), served over real HTTP."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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
)

VERSION = "1.0.24"
DEFAULT_PENDING = 3.0
DEFAULT_DURATION = 42.0  # ~45 s end to end, as the product's demo expects

limiter = HourlyLimiter({"create": 10, "status": 100, "output": 50, "stop": 20})
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
        return key, error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded")
    return key, None


def _fault(identity: Any, directives: Directives) -> JsonResponse | None:
    kind = directives.get("fail")
    if not faults.take(identity, kind):
        return None
    if kind == "rate_limit":
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
