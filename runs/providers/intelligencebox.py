"""IntelligenceBox Box Server: streamed chat, stop and stream-status
(shared/providers/intelligencebox.md)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
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
    ProviderError,
    Running,
    Started,
    StatusResult,
    StopResult,
    StreamEnded,
    TerminalStatus,
    Waiting,
    parse_json,
    retry_after_seconds,
    start_stream,
)

STREAM_STATUS: dict[str, TerminalStatus | None] = {
    "active": None,
    "completed": COMPLETED,
    "aborted": STOPPED,
    "error": FAILED,
}
STATUS_POLL = 1.0


class IntelligenceBoxProvider(Provider):
    kind = "intelligencebox"
    label = "IntelligenceBox"
    disconnect_aborts = True

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.config.api_key}

    def error_from(self, response: httpx.Response) -> ProviderError:
        payload = parse_json(response.text) if response.content else None
        detail = payload.get("error") if isinstance(payload, dict) else None
        status = response.status_code
        if status in (401, 403):
            return ProviderError(
                "UNAUTHORIZED",
                "The IntelligenceBox refused the API key. Ask a team admin to update the key "
                "on the provider account (Box app: Settings → System → API key).",
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
        yield Started(chat_id)
        running = False
        async for sse in start_stream(self, "/api/ai/chat", body):
            if isinstance(sse, Waiting):
                yield sse
                continue
            # The documented examples separate events by a single newline, which standard SSE
            # parsing folds into one multi-line data field: take it line by line.
            for line in (sse.data or "").splitlines():
                part = parse_json(line.removeprefix("data:").strip())
                if not isinstance(part, dict):
                    continue
                if not running:
                    running = True
                    yield Running("active")
                kind = part.get("type")
                if kind == "text-delta":
                    yield OutputDelta(str(part.get("textDelta") or ""))
                elif kind == "finish":
                    yield Finished(COMPLETED, f"finish:{part.get('finishReason') or 'stop'}")
                    return
                elif kind == "error":
                    yield Finished(
                        FAILED,
                        "error",
                        error=f"The IntelligenceBox reported an error: {part.get('error')}",
                    )
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
                yield Finished(result.terminal, result.provider_status, error=result.error)
                return
            yield Running(result.provider_status, progress=result.progress)
            await asyncio.sleep(STATUS_POLL)

    async def check(self) -> str:
        # /health needs no key; stream-status does, so it proves the key too.
        result = await self.status("runbrake-connection-check")
        return f"The IntelligenceBox answered and accepted the key ({result.provider_status})."

    async def status(self, external_id: str) -> StatusResult:
        response = await self.request("GET", f"/api/ai/chat/{external_id}/stream-status")
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
        response = await self.request("POST", f"/api/ai/chat/{external_id}/stop", timeout=timeout)
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
