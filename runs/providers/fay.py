"""Fay deep research: create, poll status, fetch output, stop (shared/providers/fay.md,
docs/providers/fay.md for the public source of each behaviour).

Fay counts every call against hourly quotas per endpoint and a monthly one (fay-docs: each
endpoint's "Rate Limits", api-key "100 requests per month" on the free tier), answers 429
`RATE_LIMIT_EXCEEDED` past them with no Retry-After, and can push a run's news as signed
webhooks instead. So every call spends from the account's budget first, a 429 is shared with
the budget as the provider's own refusal, and polling is paced to fit the quota (and drops to a
slow safety net when the account receives webhooks)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

from .base import (
    COMPLETED,
    FAILED,
    STOPPED,
    Event,
    Finished,
    Provider,
    QuotaWait,
    Running,
    Started,
    StatusResult,
    StopResult,
    TerminalStatus,
    Waiting,
    backoff_delay,
    parse_json,
    retry_after_seconds,
    retry_in,
    wait_to_retry,
)
from .errors import ProviderError, QuotaExhausted

TERMINAL: dict[str, TerminalStatus] = {
    "COMPLETED": COMPLETED,
    "FAILED": FAILED,
    "STOPPED": STOPPED,
}

# Fay's codes, in words a user can act on. `{detail}` is Fay's own message.
MESSAGES = {
    "VALIDATION_ERROR": "Fay rejected the request ({detail}). Check the prompt and the output "
    "schema, then launch again.",
    "INVALID_API_KEY": "Fay refused the API key (invalid or expired). The key is set on the Fay "
    "provider account by a team admin.",
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
OVER_QUOTA = "RATE_LIMIT_EXCEEDED"
# Fay's "cannot stop" answers and the state each names (only the first is documented).
ALREADY_TERMINAL_CODES: dict[str, TerminalStatus] = {
    "CONVERSATION_ALREADY_COMPLETED": COMPLETED,
    "CONVERSATION_ALREADY_FAILED": FAILED,
    "CONVERSATION_ALREADY_STOPPED": STOPPED,
}


@dataclass(frozen=True)
class FetchedOutput:
    value: Any


# The slowest a run's status is read without webhooks (a long run's end is known this late).
MAX_POLL = 300.0
# With webhooks, a status read is only a safety net against a lost delivery (Assumption
# (ours): Fay retries a delivery three times, so a lost one is rare; ten minutes is cheap).
WEBHOOK_SAFETY_POLL = 600.0


class FayProvider(Provider):
    kind = "fay"
    label = "Fay"
    # Per key (fay-docs): hourly per endpoint, and "month" over every call (Assumption (ours):
    # the docs say "100 requests per month" without saying which calls count; all do here).
    tiers = {
        "free": {"create": 10, "status": 100, "output": 50, "stop": 20, "month": 100},
        "pro": {"create": 100, "status": 1000, "output": 500, "stop": 200, "month": 10000},
    }

    @property
    def poll_interval(self) -> float:
        try:
            return max(0.05, float(self.config.options.get("poll_interval", 2.0)))
        except (TypeError, ValueError):
            return 2.0

    @property
    def webhooks(self) -> bool:
        return bool(self.config.options.get("webhooks"))

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
            await self.spend("create")  # raises QuotaExhausted before anything is sent
            try:
                data = await self.call("POST", "/conversations", json_body=body)
                break
            except ProviderError as exc:
                if exc.code == OVER_QUOTA:
                    raise await self.over_quota("create", exc) from None
                # A timeout may have created the run: wait_to_retry does not retry one.
                attempt += 1
                async for waiting in wait_to_retry(exc, attempt):
                    yield waiting
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ProviderError(
                "PROVIDER_BAD_RESPONSE", "Fay accepted the research but returned no request id."
            )
        yield Started(request_id)
        # Just created, it is PENDING: the first read waits one interval like the others.
        async for event in self._poll(request_id, wait_first=True):
            yield event

    def follow(self, external_id: str, refs: dict[str, Any] | None = None) -> AsyncGenerator[Event]:
        """Poll status until terminal (docs: every 2-5 s), paced to the account's quota."""
        # Re-attached after a restart or a lost session: read now, the run may be long over.
        return self._poll(external_id, wait_first=self.webhooks)

    async def _poll(self, external_id: str, *, wait_first: bool) -> AsyncGenerator[Event]:
        started = time.monotonic()
        last_status = None
        failures = 0
        if wait_first:
            await asyncio.sleep(await self._poll_delay(0.0))
        waited = False
        while True:
            try:
                result = await self.status(external_id)
            except QuotaExhausted as exc:
                # Said once per wait, then read again when the budget allows.
                yield QuotaWait(exc.endpoint, exc.retry_after or 0.0, exc.message)
                waited = True
                await asyncio.sleep(exc.retry_after or 0.0)
                continue
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
                output = None
                async for news in self._output_with_retries(external_id):
                    if isinstance(news, QuotaWait):
                        yield news
                    else:
                        output = news.value
                structured = output if not isinstance(output, str) else None
                yield Finished(
                    COMPLETED,
                    result.provider_status,
                    output=output if isinstance(output, str) else None,
                    structured_output=structured,
                    via="status",
                )
                return
            if result.terminal is not None:
                yield Finished(
                    result.terminal, result.provider_status, error=result.error, via="status"
                )
                return
            if waited or (
                result.provider_status != last_status and result.provider_status != "PENDING"
            ):
                # A read after a quota wait is news too: the run no longer waits.
                yield Running(result.provider_status)
            last_status, waited = result.provider_status, False
            await asyncio.sleep(await self._poll_delay(time.monotonic() - started))

    async def _poll_delay(self, elapsed: float) -> float:
        """The docs' 2-5 s, then slower as the run goes on: a quarter of its age (its end is
        known at most a quarter late, in a few dozen reads even for a long run), to at most
        five minutes; never faster than the account's runs fit its status quota, and only a
        safety net when webhooks carry the news."""
        base = max(self.poll_interval, min(MAX_POLL, elapsed / 4))
        if self.webhooks:
            base = max(base, WEBHOOK_SAFETY_POLL)
        return await self.budget.interval("status", base)

    async def _output_with_retries(
        self, external_id: str
    ) -> AsyncGenerator[QuotaWait | FetchedOutput]:
        """The report of a completed run: waits for the output quota as long as it takes (the
        run is done; its report must not be lost), retries transient failures a few times."""
        attempt = 0
        while True:
            try:
                yield FetchedOutput(await self.output(external_id))
                return
            except QuotaExhausted as exc:
                yield QuotaWait(exc.endpoint, exc.retry_after or 0.0, exc.message)
                await asyncio.sleep(exc.retry_after or 0.0)
            except ProviderError as exc:
                attempt += 1
                if (delay := retry_in(exc, attempt, idempotent=True)) is None:
                    raise
                await asyncio.sleep(delay)

    async def _ended_before_the_stop(
        self, external_id: str, result: StatusResult
    ) -> Finished | None:
        """A run found over when its stop was sent: how it ended, report included, if that
        can be read now (else the session following it reads it on its next turn)."""
        if result.terminal == FAILED:
            return Finished(FAILED, result.provider_status, error=result.error, via="status")
        if result.terminal != COMPLETED:
            return None
        try:
            output = await self.output(external_id)
        except ProviderError:
            return None
        return Finished(
            COMPLETED,
            result.provider_status,
            output=output if isinstance(output, str) else None,
            structured_output=output if not isinstance(output, str) else None,
            via="status",
        )

    async def check(self) -> str:
        # An unknown id is answered 404 only after the key was accepted (401 otherwise).
        try:
            await self.status("00000000-0000-4000-8000-000000000000")
        except ProviderError as exc:
            if exc.code != "REQUEST_NOT_FOUND":
                raise
        return "Fay answered and accepted the key."

    async def counted(
        self, endpoint: str, method: str, path: str, json_body: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """One call that Fay counts against a quota: spent first, a 429 shared as over quota."""
        await self.spend(endpoint)
        try:
            return await self.call(method, path, json_body=json_body, **kwargs)
        except ProviderError as exc:
            if exc.code == OVER_QUOTA:
                raise await self.over_quota(endpoint, exc) from None
            raise

    async def status(self, external_id: str, refs: dict[str, Any] | None = None) -> StatusResult:
        data = await self.counted(
            "status", "GET", f"/conversation/{self.segment(external_id)}/status"
        )
        native = str(data.get("status") or "UNKNOWN")
        return StatusResult(
            provider_status=native,
            terminal=TERMINAL.get(native),
            error=data.get("error_message") or None,
        )

    async def output(self, external_id: str) -> Any:
        data = await self.counted(
            "output", "GET", f"/conversation/{self.segment(external_id)}/output"
        )
        return data.get("output")

    async def stop(
        self, external_id: str, options: dict[str, Any], *, timeout: float | None = None
    ) -> StopResult:
        try:
            data = await self.counted(
                "stop",
                "POST",
                f"/conversation/{self.segment(external_id)}/stop",
                json_body={},
                timeout=timeout,
            )
        except ProviderError as exc:
            if exc.code not in ALREADY_TERMINAL_CODES:
                raise
            # Fay's stop is not idempotent: a 400 means "already terminal". Adopt the terminal
            # state its status endpoint reports; when that read must wait for the quota, the
            # stop's own answer still says how the run ended (the stop was answered: it must
            # never be taken as unsent and sent again).
            answer = {"code": exc.code, "http_status": exc.http_status}
            try:
                result = await self.status(external_id)
            except QuotaExhausted:
                return StopResult(
                    terminal=ALREADY_TERMINAL_CODES[exc.code],
                    provider_status=exc.code,
                    message=exc.message,
                    answer=answer,
                )
            return StopResult(
                terminal=result.terminal,
                provider_status=result.provider_status,
                message=exc.message,
                answer=answer,
                via="status",
                finished=await self._ended_before_the_stop(external_id, result),
            )
        native = str(data.get("status") or "")
        return StopResult(
            terminal=TERMINAL.get(native),
            provider_status=native,
            message=str(data.get("message") or "Fay stopped the research."),
            answer=data,
        )


# --- Webhooks (fay-docs `webhooks`) -----------------------------------------------------------

SIGNATURE_HEADER = "X-Fay-Signature"


def signature_of(body: bytes, secret: str) -> str:
    """`sha256=<hex HMAC-SHA256 of the raw body>`, keyed with the webhook secret (UTF-8)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(body: bytes, header: str, secret: str) -> bool:
    """Compare in constant time, over the raw bytes exactly as received: re-serialised JSON
    has other bytes (the docs' own Express example gets this wrong)."""
    if not secret or not header:
        return False
    return hmac.compare_digest(signature_of(body, secret).encode(), header.strip().encode())


@dataclass(frozen=True)
class WebhookNews:
    """One delivery, read: which event (for applying it once), which run, and what it says
    (None: nothing to apply, e.g. a Status COMPLETED whose Output carries the report)."""

    event_id: str
    kind: str
    external_id: str
    event: Running | Finished | None


def parse_webhook(body: bytes) -> WebhookNews:
    """Read a signed delivery `{id, type, created, data}`; raises ProviderError in words."""
    payload = parse_json(body.decode("utf-8", errors="replace"))
    if not isinstance(payload, dict):
        raise ProviderError("BAD_WEBHOOK", "The webhook body is not a JSON object.")
    event_id, kind, data = payload.get("id"), payload.get("type"), payload.get("data")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 200:
        raise ProviderError("BAD_WEBHOOK", "The webhook has no event id.")
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
        raise ProviderError("BAD_WEBHOOK", "The webhook names no research request.")
    external_id = data["request_id"][:200]
    status = str(data.get("status") or "")
    event: Running | Finished | None = None
    if kind == "Output":
        output = data.get("output")
        event = Finished(
            COMPLETED,
            status or "COMPLETED",
            output=output if isinstance(output, str) else None,
            structured_output=output if isinstance(output, dict | list) else None,
            via="webhook",
        )
    elif kind == "Error":
        detail = data.get("error_message")
        event = Finished(
            FAILED,
            status or "FAILED",
            error=f"Fay reported the research failed: {detail}"
            if isinstance(detail, str) and detail
            else "Fay reported the research failed.",
            via="webhook",
        )
    elif kind == "Status" and status in ("PENDING", "PROCESSING"):
        event = Running(status)
    elif kind == "Status" and status == "STOPPED":
        event = Finished(STOPPED, status, via="webhook")
    # Status COMPLETED/FAILED: the Output or Error event of the same change carries the
    # report or the reason (Assumption (ours): Fay sends both; the docs list all three).
    return WebhookNews(
        event_id=event_id, kind=str(kind or ""), external_id=external_id, event=event
    )
