"""Fay deep research: create, poll status, fetch output, stop (shared/providers/fay.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from .base import (
    COMPLETED,
    FAILED,
    STOPPED,
    Event,
    Finished,
    Provider,
    ProviderError,
    Running,
    Started,
    StatusResult,
    StopResult,
    TerminalStatus,
    Waiting,
    backoff_delay,
    retry_after_seconds,
)

TERMINAL: dict[str, TerminalStatus] = {
    "COMPLETED": COMPLETED,
    "FAILED": FAILED,
    "STOPPED": STOPPED,
}

# Fay's codes, in words a user can act on. `{detail}` is Fay's own message.
MESSAGES = {
    "VALIDATION_ERROR": "Fay rejected the request ({detail}). Check the prompt and the output "
    "schema, then launch again.",
    "INVALID_API_KEY": "Fay refused the API key (invalid or expired). Ask a team admin to "
    "update the key on the Fay provider account.",
    "REQUEST_NOT_FOUND": "Fay has no record of this research request; it may have expired. "
    "Launch a new run if you still need it.",
    "CONVERSATION_ALREADY_COMPLETED": "The research had already completed on Fay, so there "
    "was nothing left to stop.",
    "CONVERSATION_ALREADY_FAILED": "The research had already failed on Fay, so there was "
    "nothing left to stop.",
    "CONVERSATION_ALREADY_STOPPED": "Fay had already stopped this research.",
    "RATE_LIMIT_EXCEEDED": "Fay's rate limit for this API key is used up. Runbrake waits and "
    "retries; a higher Fay plan raises the limit.",
    "RESEARCH_NOT_COMPLETED": "Fay has no output for this research yet.",
    "INTERNAL_ERROR": "Fay had an internal error. Runbrake retries; if it persists, check "
    "Fay's status page.",
}
RETRYABLE_CODES = {"RATE_LIMIT_EXCEEDED", "INTERNAL_ERROR"}
ALREADY_TERMINAL_CODES = {
    "CONVERSATION_ALREADY_COMPLETED",
    "CONVERSATION_ALREADY_FAILED",
    "CONVERSATION_ALREADY_STOPPED",
}
MAX_START_ATTEMPTS = 5


class FayProvider(Provider):
    kind = "fay"
    label = "Fay"

    @property
    def poll_interval(self) -> float:
        return float(self.config.options.get("poll_interval", 2.0))

    async def call(
        self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """One Fay call: unwrap the envelope or raise the ProviderError it describes."""
        response = await self.request(method, path, json_body=json_body, timeout=timeout)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("status"), bool):
            raise ProviderError(
                "PROVIDER_BAD_RESPONSE",
                f"Fay answered HTTP {response.status_code} with something that is not its "
                "JSON envelope. Runbrake retries; check the provider account's base URL.",
                retryable=response.status_code >= 500 or response.status_code == 429,
                retry_after=retry_after_seconds(response),
                http_status=response.status_code,
            )
        if payload["status"] and response.is_success:
            data = payload.get("data")
            return data if isinstance(data, dict) else {}
        raise self.envelope_error(response, payload)

    def envelope_error(self, response: httpx.Response, payload: dict[str, Any]) -> ProviderError:
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        assert isinstance(error, dict)
        code = str(error.get("code") or f"HTTP_{response.status_code}")
        detail = str(error.get("message") or "no message")
        template = MESSAGES.get(code, "Fay answered HTTP {status}: {detail}.")
        return ProviderError(
            code,
            template.format(detail=detail, status=response.status_code),
            retryable=code in RETRYABLE_CODES or response.status_code >= 500,
            retry_after=retry_after_seconds(response),
            http_status=response.status_code,
        )

    # --- Runs ------------------------------------------------------------------------------

    async def run(self, prompt: str, options: dict[str, Any]) -> AsyncGenerator[Event]:
        body: dict[str, Any] = {"prompt": prompt}
        if options.get("structured_output"):
            body["structured_output"] = True
            body["output_schema"] = options.get("output_schema")
        attempt = 0
        while True:
            try:
                data = await self.call("POST", "/conversations", json_body=body)
                break
            except ProviderError as exc:
                # A timeout may have created the run: retrying could start it twice, so only
                # answers that prove nothing was created (429, 5xx, refused connection) retry.
                if not exc.retryable or exc.code == "PROVIDER_TIMEOUT":
                    raise
                attempt += 1
                if attempt >= MAX_START_ATTEMPTS:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(attempt)
                if attempt == 1:
                    # One event per backoff episode, not one per attempt.
                    yield Waiting(exc.message, delay)
                await asyncio.sleep(delay)
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ProviderError(
                "PROVIDER_BAD_RESPONSE", "Fay accepted the research but returned no request id."
            )
        yield Started(request_id)
        async for event in self.follow(request_id, {}):
            yield event

    async def follow(
        self, external_id: str, refs: dict[str, Any] | None = None
    ) -> AsyncGenerator[Event]:
        """Poll status until terminal (docs: every 2-5 s; slower for long runs)."""
        started = time.monotonic()
        last_status = None
        failures = 0
        while True:
            try:
                result = await self.status(external_id)
            except ProviderError as exc:
                if not exc.retryable:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(failures)
                if failures == 0:
                    # One event per backoff episode, not one per attempt.
                    yield Waiting(exc.message, delay)
                failures += 1
                await asyncio.sleep(delay)
                continue
            failures = 0
            if result.terminal == COMPLETED:
                output = await self._output_with_retries(external_id)
                structured = output if not isinstance(output, str) else None
                yield Finished(
                    COMPLETED,
                    result.provider_status,
                    output=output if isinstance(output, str) else None,
                    structured_output=structured,
                )
                return
            if result.terminal is not None:
                yield Finished(result.terminal, result.provider_status, error=result.error)
                return
            if result.provider_status != last_status and result.provider_status != "PENDING":
                yield Running(result.provider_status)
            last_status = result.provider_status
            await asyncio.sleep(self._poll_delay(time.monotonic() - started))

    def _poll_delay(self, elapsed: float) -> float:
        # Free-tier keys get 100 status reads an hour: back off for long runs.
        if elapsed > 900:
            return max(self.poll_interval, 30.0)
        if elapsed > 180:
            return max(self.poll_interval, 10.0)
        return self.poll_interval

    async def _output_with_retries(self, external_id: str) -> Any:
        for attempt in range(MAX_START_ATTEMPTS):
            try:
                return await self.output(external_id)
            except ProviderError as exc:
                if not exc.retryable or attempt == MAX_START_ATTEMPTS - 1:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(attempt)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def check(self) -> str:
        # An unknown id is answered 404 only after the key was accepted (401 otherwise).
        try:
            await self.status("00000000-0000-4000-8000-000000000000")
        except ProviderError as exc:
            if exc.code != "REQUEST_NOT_FOUND":
                raise
        return "Fay answered and accepted the key."

    async def status(self, external_id: str) -> StatusResult:
        data = await self.call("GET", f"/conversation/{external_id}/status")
        native = str(data.get("status") or "UNKNOWN")
        return StatusResult(
            provider_status=native,
            terminal=TERMINAL.get(native),
            error=data.get("error_message") or None,
        )

    async def output(self, external_id: str) -> Any:
        data = await self.call("GET", f"/conversation/{external_id}/output")
        return data.get("output")

    async def stop(
        self, external_id: str, options: dict[str, Any], *, timeout: float | None = None
    ) -> StopResult:
        try:
            data = await self.call(
                "POST", f"/conversation/{external_id}/stop", json_body={}, timeout=timeout
            )
        except ProviderError as exc:
            if exc.code not in ALREADY_TERMINAL_CODES:
                raise
            # Fay's stop is not idempotent: a 400 means "already terminal". Adopt whatever
            # terminal state its status endpoint reports.
            result = await self.status(external_id)
            return StopResult(
                terminal=result.terminal,
                provider_status=result.provider_status,
                message=exc.message,
                answer={"code": exc.code, "http_status": exc.http_status},
            )
        native = str(data.get("status") or "")
        return StopResult(
            terminal=TERMINAL.get(native),
            provider_status=native,
            message=str(data.get("message") or "Fay stopped the research."),
            answer=data,
        )
