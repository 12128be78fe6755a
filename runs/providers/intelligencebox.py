"""IntelligenceBox Box Server: streamed chat, stop and stream-status
(shared/providers/intelligencebox.md, docs/providers/intelligencebox.md).

A box speaks one of two stream formats, and nothing in a request chooses which: the older
SSE of AI SDK v4 stream parts (`text-delta` with `textDelta`, `error` with `error`) that the
box's docs and Postman collection show, or the AI SDK v5+ UI message stream its current docs
point to (`text-delta` with `id`/`delta`, `error` with `errorText`, `abort`, `data: [DONE]`).
Each chunk is read by its own fields, so one client follows either box.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

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
    parse_json,
    retry_after_seconds,
    start_stream,
)
from .errors import ProviderError

STREAM_STATUS: dict[str, TerminalStatus | None] = {
    "active": None,
    "completed": COMPLETED,
    "aborted": STOPPED,
    "error": FAILED,
}
STATUS_POLL = 1.0
# The UI message stream's last line (the AI SDK writes it when its stream closes normally).
DONE = "[DONE]"
# Since ai@5.0.244 / 6.0.x the SDK sends this instead of the real message unless the server
# sets its own onError: it says nothing about what went wrong.
GENERIC_ERROR = "An error occurred."
MAX_ERROR_CHARS = 500
# finishReason goes into provider_status (40 chars): only a short word is taken from the box.
FINISH_REASON = re.compile(r"[a-z][a-z-]{0,19}")
# Steps the box takes without writing text: counted as progress, so a long tool call does not
# look like a stall. Deltas of a tool's input or of reasoning are not (one write each).
PROGRESS_PARTS = frozenset(
    {
        # the older format
        "tool-call",
        "tool-result",
        # the UI message stream
        "tool-input-available",
        "tool-input-error",
        "tool-output-available",
        "tool-output-error",
        "tool-output-denied",
        "tool-approval-request",
        "reasoning-start",
        "reasoning-end",
    }
)
MAX_TOKENS = 10**12


@dataclass
class Reading:
    """What one chat stream has said so far."""

    running: bool = False
    steps: int = 0
    # The id of the UI stream text block that last wrote text.
    text_id: str | None = None


def read_part(part: dict[str, Any], seen: Reading) -> Iterator[Event]:
    """The events one stream chunk means, in either format (decided by its own fields)."""
    if not seen.running:
        seen.running = True
        yield Running("active")
    kind = part.get("type")
    if kind == "text-delta":
        text = first_string(part, "delta", "textDelta")
        if not text:
            return
        # UI stream text comes in blocks with ids (a new one after a tool step): a blank
        # line between two blocks keeps "I'll look that up." off the answer that follows.
        block = part.get("id")
        if isinstance(block, str):
            if seen.text_id not in (None, block):
                yield OutputDelta("\n\n")
            seen.text_id = block
        yield OutputDelta(text)
    elif kind == "finish":
        reason = part.get("finishReason")
        reason = reason if isinstance(reason, str) and FINISH_REASON.fullmatch(reason) else None
        usage = usage_of(part)
        if reason == "error":
            # A finish that itself says "error", with no error chunk before it.
            yield Finished(
                FAILED,
                "finish:error",
                error="The IntelligenceBox ended the answer with an error and gave no detail.",
                usage=usage,
            )
        else:
            # ai@5.0.0 to 5.0.91 send `finish` with no finishReason: still a normal end.
            yield Finished(COMPLETED, f"finish:{reason}" if reason else "finish", usage=usage)
    elif kind == "error":
        yield Finished(FAILED, "error", error=error_in_words(part))
    elif kind == "abort":
        # The box's own word that it aborted the chat (its stop, or its own abort signal).
        yield Finished(STOPPED, "abort", via="stream")
    elif kind in PROGRESS_PARTS:
        seen.steps += 1
        yield Running("active", progress=f"step {seen.steps}")


def first_string(part: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = part.get(name)
        if isinstance(value, str):
            return value
    return None


def error_in_words(part: dict[str, Any]) -> str:
    """The box's error in its own words: `errorText` (UI stream) or `error` (older format,
    a string or an object with a message)."""
    nested = part.get("error")
    text = first_string(part, "errorText", "error") or (
        first_string(nested, "message") if isinstance(nested, dict) else None
    )
    text = (text or "").strip()
    if not text or text == GENERIC_ERROR:
        return (
            "The IntelligenceBox reported an error but gave no detail (its AI SDK hides "
            "server errors from clients unless the box is set to pass them on)."
        )
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "…"
    return f"The IntelligenceBox reported an error: {text}"


def usage_of(part: dict[str, Any]) -> Usage | None:
    """Token counts from a `finish`: `usage` (older format: promptTokens, completionTokens,
    totalTokens) or the UI stream's `messageMetadata` when the box puts usage there (the AI
    SDK docs' examples: `totalUsage` with inputTokens/outputTokens/totalTokens, or a bare
    `totalTokens`). Only non-negative integers are taken."""
    metadata = part.get("messageMetadata")
    places = [part.get("usage")]
    if isinstance(metadata, dict):
        places += [metadata.get("totalUsage"), metadata.get("usage"), metadata]
    for place in places:
        if not isinstance(place, dict):
            continue
        usage = Usage(
            prompt_tokens=count(place, "promptTokens", "inputTokens"),
            completion_tokens=count(place, "completionTokens", "outputTokens"),
            total_tokens=count(place, "totalTokens"),
        )
        if usage != Usage():
            return usage
    return None


def count(place: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = place.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKENS:
            return value
    return None


class IntelligenceBoxProvider(Provider):
    kind = "intelligencebox"
    label = "IntelligenceBox"
    disconnect_aborts = True
    # Closing the stream ends the chat: only give up on a stream silent for ten minutes (a
    # long tool step sends nothing meanwhile).
    stream_read_timeout = 600.0
    # The box's docs show events separated by a single newline and parse line by line.
    line_events = True

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.config.api_key}

    def error_from(self, response: httpx.Response) -> ProviderError:
        payload = parse_json(response.text) if response.content else None
        detail = payload.get("error") if isinstance(payload, dict) else None
        status = response.status_code
        if status in (401, 403):
            return ProviderError(
                "UNAUTHORIZED",
                "The IntelligenceBox refused the API key. The key is set on the provider "
                "account by a team admin (Box app: Settings → System → API key).",
                http_status=status,
            )
        if status == 400:
            return ProviderError(
                "VALIDATION_ERROR",
                f"The IntelligenceBox rejected the request ({detail or 'no detail'}).",
                http_status=status,
            )
        return ProviderError(
            f"HTTP_{status}",
            f"The IntelligenceBox answered HTTP {status}"
            + (f" ({detail})" if detail else "")
            + (". Runbrake retries." if status == 429 or status >= 500 else "."),
            retryable=status == 429 or status >= 500,
            retry_after=retry_after_seconds(response),
            http_status=status,
        )

    @property
    def box_address(self) -> str:
        return str(self.config.options.get("box_address") or self.config.base_url.rstrip("/"))

    async def run(self, prompt: str, options: dict[str, Any]) -> AsyncGenerator[Event]:
        chat_id = str(options.get("chat_id") or f"run-{uuid.uuid4()}")
        history = [m for m in options.get("messages") or [] if isinstance(m, dict)]
        body = {
            "id": chat_id,
            "messages": [*history, {"role": "user", "content": prompt}],
            "boxAddress": self.box_address,
        }
        # The id is ours, so it is known before the box answers: a stop can go out at once.
        yield Started(chat_id, acknowledged=False)
        seen = Reading()
        # Returning mid-stream (finish, error, abort) must close the stream generators here,
        # not leave them to the garbage collector.
        async with contextlib.aclosing(start_stream(self, "/api/ai/chat", body)) as stream:
            async for sse in stream:
                if isinstance(sse, Waiting | StartRetry):
                    yield sse
                    continue
                # The documented examples of the older format separate events by a single
                # newline, which SSE parsing folds into one multi-line data field (once a
                # blank line comes): take it line by line.
                for line in (sse.data or "").splitlines():
                    data = line.removeprefix("data:").strip()
                    if data == DONE:
                        # No finish or abort came before it: the box ended without saying how.
                        yield StreamEnded()
                        return
                    part = parse_json(data)
                    if not isinstance(part, dict):
                        continue
                    for event in read_part(part, seen):
                        yield event
                        if isinstance(event, Finished):
                            # An error ends the run even though a UI stream still sends
                            # finish {finishReason: "error"} after it: useChat stops there too.
                            return
        yield StreamEnded()

    async def follow(self, external_id: str, refs: dict[str, Any]) -> AsyncGenerator[Event]:
        """Poll stream-status until the box settles (the text itself cannot be fetched)."""
        while True:
            result = await self.status(external_id)
            if result.provider_status == "not_found":
                raise ProviderError(
                    "NOT_FOUND",
                    "The IntelligenceBox no longer knows this chat (restarted, or the record "
                    "expired); the text received so far is kept.",
                )
            if result.terminal is not None:
                yield Finished(
                    result.terminal, result.provider_status, error=result.error, via="status"
                )
                return
            yield Running(result.provider_status, progress=result.progress)
            await asyncio.sleep(STATUS_POLL)

    async def check(self) -> str:
        # /health needs no key; stream-status does, so it proves the key too.
        result = await self.status("runbrake-connection-check")
        return f"The IntelligenceBox answered and accepted the key ({result.provider_status})."

    async def status(self, external_id: str, refs: dict[str, Any] | None = None) -> StatusResult:
        response = await self.request(
            "GET", f"/api/ai/chat/{self.segment(external_id, 'chat id')}/stream-status"
        )
        if not response.is_success:
            raise self.error_from(response)
        payload = parse_json(response.text)
        native = str((payload or {}).get("status") or "unknown")
        count = (payload or {}).get("messageCount")
        return StatusResult(
            provider_status=native,
            terminal=STREAM_STATUS.get(native),
            error="The IntelligenceBox reported an error." if native == "error" else None,
            # Parts emitted so far: the one sign of progress the box gives without the text.
            progress=str(count) if isinstance(count, int) else None,
        )

    async def stop(
        self, external_id: str, options: dict[str, Any], *, timeout: float | None = None
    ) -> StopResult:
        response = await self.request(
            "POST", f"/api/ai/chat/{self.segment(external_id, 'chat id')}/stop", timeout=timeout
        )
        payload = parse_json(response.text)
        if response.status_code in (401, 403) or not isinstance(payload, dict):
            raise self.error_from(response)
        # Decide on the `success` flag, not the HTTP status (200 or 404 are both documented).
        if payload.get("success") is True:
            return StopResult(
                terminal=None,
                provider_status="stop accepted",
                message="The IntelligenceBox stopped the stream; confirming.",
                answer=payload,
            )
        if response.status_code >= 500:
            raise self.error_from(response)
        # Nothing to stop: the stream-status says what became of the run.
        result = await self.status(external_id)
        return StopResult(
            terminal=result.terminal,
            provider_status=result.provider_status,
            message=f"The IntelligenceBox had no active stream ({result.provider_status}).",
            answer=payload,
        )
