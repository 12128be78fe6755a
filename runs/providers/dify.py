"""Dify chat-family Service API: streamed chat-messages, their stop, and history
(docs/providers/dify.md names the source of each behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import re
import time
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import urlencode

import httpx

from .base import (
    COMPLETED,
    FAILED,
    STOPPED,
    Event,
    Finished,
    OutputDelta,
    Provider,
    Running,
    Started,
    StartRetry,
    StatusResult,
    StopResult,
    StreamEnded,
    TerminalStatus,
    Usage,
    Waiting,
    backoff_delay,
    parse_json,
    retry_after_seconds,
    start_stream,
)
from .errors import ProviderError

MESSAGES = {
    "unauthorized": "Dify refused the app API key. The key is set on the Dify provider account "
    "by a team admin (Dify: the app's API Access page).",
    "forbidden": "Dify says this app's API is disabled or the app no longer exists ({detail}).",
    "invalid_param": "Dify rejected the request: {detail}. Check the fields and launch again.",
    "bad_request": "Dify rejected the request: {detail}.",
    "not_chat_app": "The Dify key belongs to an app that is not a chat app; use a chat, agent "
    "or chatflow app's key.",
    "not_found": "Dify could not find that conversation ({detail}).",
    "conversation_completed": "That Dify conversation has ended; start a new one.",
    "too_many_requests": "Dify is at its limit of concurrent runs for this app. Runbrake waits "
    "and retries.",
    "rate_limit_error": "Dify's plan quota is used up ({detail}); upgrade the plan or wait.",
    "provider_quota_exceeded": "Dify's model provider quota is used up ({detail}).",
    "internal_server_error": "Dify had an internal error. Runbrake retries.",
}
# `too_many_requests` is a concurrency ceiling (retry); `rate_limit_error` a plan quota (don't).
NOT_RETRYABLE = {"rate_limit_error"}
# The per-app concurrency ceiling raises AppInvokeQuotaExceededError, a ValueError: Dify's
# ValueError handler answers first, so it most likely arrives as 400 invalid_param.
CONCURRENCY_LIMIT = "Too many requests"
WORKFLOW_STATUS: dict[str, TerminalStatus] = {
    "succeeded": COMPLETED,
    "partial-succeeded": COMPLETED,
    "failed": FAILED,
    "stopped": STOPPED,
}
# A Chatflow stop that reaches the graph engine first ends as `failed` with this reason.
ABORTED = "Aborted"
TEXT_EVENTS = ("message", "message_file")
NODE_EVENTS = ("node_started", "node_finished", "node_retry")
# Dify's APP_MAX_EXECUTION_TIME: a reply running longer is ended like a stop.
MAX_EXECUTION_SECONDS = 1200.0
# After created_at + the max execution time, how long to wait for the answer to be saved.
SAVE_GRACE_SECONDS = 60.0
HISTORY_POLL = 2.0
HISTORY_POLL_SLOW = 5.0
HISTORY_SLOW_AFTER = 60.0
HISTORY_PAGE = 20
HISTORY_PAGE_MORE = 100
HISTORY_MAX_PAGES = 20
STATUS_LENGTH = 40  # Run.provider_status
MAX_COUNT = 2**63 - 1
CURRENCY = re.compile(r"[A-Za-z]{1,8}")


class DifyProvider(Provider):
    kind = "dify"
    label = "Dify"
    normal_end_confirms_stop = True

    def error_from(self, response: httpx.Response) -> ProviderError:
        payload = parse_json(response.text) if response.content else None
        payload = payload if isinstance(payload, dict) else {}
        code = str(payload.get("code") or f"HTTP_{response.status_code}")
        detail = str(payload.get("message") or "no message")
        if code == "invalid_param" and detail.startswith(CONCURRENCY_LIMIT):
            code = "too_many_requests"
        template = MESSAGES.get(code, "Dify answered HTTP {status}: {detail}.")
        return ProviderError(
            code,
            template.format(detail=detail, status=response.status_code),
            retryable=code not in NOT_RETRYABLE
            and (
                code == "too_many_requests"
                or response.status_code == 429
                or response.status_code >= 500
            ),
            retry_after=retry_after_seconds(response),
            http_status=response.status_code,
        )

    def user_of(self, options: dict[str, Any]) -> str:
        return str(options.get("user") or self.config.options.get("user") or "runbrake")

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.request(method, path, **kwargs)
        if not response.is_success:
            raise self.error_from(response)
        return parse_json(response.text)

    async def run(self, prompt: str, options: dict[str, Any]) -> AsyncGenerator[Event]:
        body: dict[str, Any] = {
            "query": prompt,
            "inputs": options.get("inputs") or {},
            "user": self.user_of(options),
            "response_mode": "streaming",
        }
        if options.get("conversation_id"):
            body["conversation_id"] = options["conversation_id"]
        started = False
        # A New Agent streams `agent_message` deltas, then ONE `message` (or `message_file`)
        # carrying the whole answer: after deltas, that closing event replaces.
        agent_deltas = False
        chatflow = False
        usage: Usage | None = None
        ended: Finished | None = None
        async with contextlib.aclosing(start_stream(self, "/chat-messages", body)) as stream:
            async for sse in stream:
                if isinstance(sse, Waiting | StartRetry):
                    yield sse
                    continue
                if sse.event == "ping" or not sse.data:
                    continue
                data = parse_json(sse.data)
                if not isinstance(data, dict):
                    continue
                event = data.get("event")
                if not started and data.get("task_id"):
                    started = True
                    # task_id is the only handle the stop endpoint takes: persist it at once.
                    yield Started(
                        str(data["task_id"]),
                        refs={
                            "conversation_id": data.get("conversation_id"),
                            "message_id": data.get("message_id") or data.get("id"),
                            "user": body["user"],
                        },
                    )
                    yield Running("streaming")
                if event in TEXT_EVENTS and "answer" in data:
                    # Once a message has a file, Dify labels its text chunks `message_file`.
                    text = _text(data["answer"])
                    if agent_deltas:
                        if text:
                            yield OutputDelta(text, replace=True)
                    elif text:
                        yield OutputDelta(text)
                elif event == "agent_message":
                    agent_deltas = True
                    if text := _text(data.get("answer")):
                        yield OutputDelta(text)
                elif event == "message_replace":
                    yield OutputDelta(_text(data.get("answer")), replace=True)
                elif event == "message_file":
                    yield Running("streaming", progress=f"file {_words(data.get('id'))}")
                elif event in NODE_EVENTS:
                    yield self.node_progress(event, data.get("data"))
                elif event == "workflow_started":
                    chatflow = True
                elif event == "message_end":
                    usage = usage_of(data.get("metadata"))
                    ended = Finished(COMPLETED, "message_end", usage=usage)
                    if not chatflow:
                        yield ended
                        return
                    # A Chatflow settles at workflow_finished, which comes next.
                elif event == "workflow_finished":
                    yield self.workflow_finished(data.get("data"), usage)
                    return
                elif event == "error":
                    # A Chatflow's pre-run error has no code, and its stream stays open.
                    code = _words(data.get("code") or "pre-run", 30)
                    detail = _words(data.get("message") or code, 500)
                    yield Finished(
                        FAILED,
                        _status(f"error:{code}"),
                        error=f"Dify reported an error: {detail}",
                        usage=usage,
                    )
                    return
        yield ended if ended is not None else StreamEnded()

    def node_progress(self, event: str, data: Any) -> Running:
        node = data if isinstance(data, dict) else {}
        title = _words(node.get("title") or node.get("node_type") or "step", 60)
        index = node.get("index")
        return Running(
            _status(f"node {title}"),
            progress=f"{event}:{_words(node.get('id'))}:{index}",
        )

    def workflow_finished(self, data: Any, usage: Usage | None) -> Finished:
        run = data if isinstance(data, dict) else {}
        status = str(run.get("status") or "")
        error = run.get("error")
        if status == "failed" and isinstance(error, str) and error.startswith(ABORTED):
            # The stop's AbortCommand won the race (dify #31755): a stop, not a failure.
            return Finished(STOPPED, "workflow_finished:aborted", usage=usage)
        terminal = WORKFLOW_STATUS.get(status, FAILED)
        return Finished(
            terminal,
            _status(f"workflow_finished:{status or 'unknown'}"),
            error=f"Dify's chatflow ended {status or 'without a status'}: "
            f"{_words(error or 'no details', 500)}"
            if terminal == FAILED
            else None,
            usage=usage,
        )

    async def follow(self, external_id: str, refs: dict[str, Any]) -> AsyncGenerator[Event]:
        """Dify has no status endpoint: follow the message in history.

        Dify writes a message's `answer` only when the reply ends (finished, stopped or timed
        out), so `answer: ""` with `status: normal` means it is still generating, and a
        non-empty answer means it ended. Whether it ended by a stop the watcher decides, as
        for the stream's own `message_end`. A reply stopped before its first word keeps ""
        forever: past the app's max execution time it can only have ended.
        """
        conversation_id, message_id = refs.get("conversation_id"), refs.get("message_id")
        if not conversation_id or not message_id:
            raise ProviderError(
                "CANNOT_FOLLOW",
                "The connection to Dify's stream was lost before Dify named the message, and "
                "Dify has no status endpoint. Check the run in Dify's console.",
            )
        user = str(refs.get("user") or self.user_of({}))
        began = time.monotonic()
        failures = 0
        while True:
            try:
                message = await self.message(str(conversation_id), str(message_id), user)
            except ProviderError as exc:
                if not exc.retryable:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(failures)
                if failures == 0:
                    yield Waiting(exc.message, delay)  # one per backoff episode
                failures += 1
                await asyncio.sleep(delay)
                continue
            failures = 0
            if message is None:
                raise ProviderError("NOT_FOUND", "Dify no longer has this message in history.")
            status = message.get("status")
            answer = message.get("answer")
            if status == "error":
                error = _words(message.get("error") or "no details", 500)
                if error.startswith(ABORTED):
                    yield Finished(STOPPED, "history:aborted", via="history")
                else:
                    yield Finished(
                        FAILED,
                        "history:error",
                        error=f"Dify reported an error: {error}",
                        via="history",
                    )
                return
            if status == "paused":
                # A Chatflow waiting for human input: its answer so far is saved, not final.
                yield Running("paused", progress=_progress(message))
            elif isinstance(answer, str) and answer:
                yield Finished(COMPLETED, "history:answer", output=answer, via="history")
                return
            elif time.time() > self.answer_deadline(message.get("created_at"), began):
                yield Finished(COMPLETED, "history:no_answer", via="history")
                return
            else:
                yield Running("generating", progress=_progress(message))
            await asyncio.sleep(self.poll_delay(time.monotonic() - began))

    def poll_interval(self) -> float:
        return _positive(self.config.options.get("poll_interval"), HISTORY_POLL)

    def poll_delay(self, elapsed: float) -> float:
        if elapsed > HISTORY_SLOW_AFTER:
            return max(self.poll_interval(), HISTORY_POLL_SLOW)
        return self.poll_interval()

    def answer_deadline(self, created_at: Any, began_monotonic: float) -> float:
        """Wall-clock time after which an empty answer can only mean the reply ended."""
        limit = _positive(self.config.options.get("max_execution_seconds"), MAX_EXECUTION_SECONDS)
        if isinstance(created_at, int | float) and not isinstance(created_at, bool):
            start = float(created_at)
        else:
            start = time.time() - (time.monotonic() - began_monotonic)
        return start + limit + SAVE_GRACE_SECONDS

    async def message(self, conversation_id: str, message_id: str, user: str) -> Any:
        """The message from history, wherever it is: a page lists the newest messages oldest
        first, and older pages come with `first_id` = the oldest message of this one."""
        first_id: str | None = None
        for page in range(HISTORY_MAX_PAGES):
            params: dict[str, Any] = {
                "conversation_id": conversation_id,
                "user": user,
                "limit": HISTORY_PAGE if page == 0 else HISTORY_PAGE_MORE,
            }
            if first_id:
                params["first_id"] = first_id
            history = await self.call("GET", f"/messages?{urlencode(params)}")
            items = history.get("data") if isinstance(history, dict) else None
            items = [m for m in items or [] if isinstance(m, dict)]
            for item in items:
                if item.get("id") == message_id:
                    return item
            if not items or not history.get("has_more"):
                return None
            first_id = str(items[0].get("id") or "")
            if not first_id:
                return None
        return None

    async def check(self) -> str:
        info = await self.call("GET", "/info")
        info = info if isinstance(info, dict) else {}
        name, mode = info.get("name") or "(unnamed)", info.get("mode") or "unknown mode"
        return f"Dify answered: app {name} ({mode})."

    async def status(self, external_id: str, refs: dict[str, Any] | None = None) -> StatusResult:
        raise ProviderError("NO_STATUS", "Dify has no status endpoint for chat tasks.")

    async def stop(
        self, external_id: str, options: dict[str, Any], *, timeout: float | None = None
    ) -> StopResult:
        answer = await self.call(
            "POST",
            f"/chat-messages/{self.segment(external_id)}/stop",
            json_body={"user": self.user_of(options)},
            timeout=timeout,
        )
        # Always {"result": "success"}, even for unknown or finished tasks: proves nothing.
        return StopResult(
            terminal=None,
            provider_status="stop accepted",
            message="Dify accepted the stop; waiting for its stream to end.",
            answer=answer if isinstance(answer, dict) else {"raw": answer},
        )


def usage_of(metadata: Any) -> Usage | None:
    """`message_end.metadata.usage`, each field checked (hostile input); None if none holds."""
    usage = metadata.get("usage") if isinstance(metadata, dict) else None
    if not isinstance(usage, dict):
        return None
    found = Usage(
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        total_tokens=_count(usage.get("total_tokens")),
        price=_price(usage.get("total_price")),
        currency=_currency(usage.get("currency")),
    )
    return found if found.as_dict() else None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    return None


def _price(value: Any) -> str | None:
    """A finite, non-negative decimal string (Dify writes Decimals as strings), written out
    plainly ("0E-7" becomes "0.0000000")."""
    if not isinstance(value, str) or not 0 < len(value) <= 40:
        return None
    try:
        amount = decimal.Decimal(value.strip())
    except decimal.InvalidOperation:
        return None
    exponent = amount.as_tuple().exponent
    if not amount.is_finite() or amount.is_signed() or not isinstance(exponent, int):
        return None
    if not -30 <= exponent <= 30 or amount.adjusted() > 30:
        return None
    return format(amount, "f")


def _currency(value: Any) -> str | None:
    return value.upper() if isinstance(value, str) and CURRENCY.fullmatch(value) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _words(value: Any, limit: int = 80) -> str:
    """Provider text for our own messages: one line, bounded."""
    return " ".join(str(value).split())[:limit]


def _status(text: str) -> str:
    return text[:STATUS_LENGTH]


def _positive(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if 0 < number < float("inf") else default


def _progress(message: dict[str, Any]) -> str | None:
    """A marker that changes as the agent's thoughts (and files) grow in history; None when
    history shows nothing of the reply yet, so "still generating" counts as progress."""
    thoughts = [t for t in message.get("agent_thoughts") or [] if isinstance(t, dict)]
    files = message.get("message_files") or []
    if not thoughts and not files:
        return None
    size = sum(
        len(str(t.get(name) or ""))
        for t in thoughts
        for name in ("thought", "observation", "tool", "tool_input")
    )
    return f"thoughts {len(thoughts)}/{size}, files {len(files) if isinstance(files, list) else 0}"
