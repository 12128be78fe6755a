"""The small async interface every provider client implements.

Contract:
- Provider code is plain Python over httpx. It takes plain values (`ProviderConfig`, strings,
  dicts), returns dataclasses, and never imports Django.
- Every failure leaves a provider as a `ProviderError` carrying a stable `code`, a sentence a
  user understands (`message`), whether trying again later may succeed (`retryable`) and, when
  the provider said so, how long to wait (`retry_after`, seconds).
- `run()` starts a run and yields normalised events; `follow()` re-attaches to a run whose id
  we already know (after a restart or a lost stream) without starting anything new;
  `status()` reads where it stands once. Both take the ids `Started.refs` carried.
- `stop()` calls the provider's stop endpoint and says whether the answer itself proves the
  run's final state (`StopResult.terminal`); when it does not, the caller confirms by other
  means.
- Calls that a provider counts against a quota go through `Provider.spend()`, which asks the
  account's `Budget` first: past the quota it raises `QuotaExhausted` before anything is sent.
  A provider's own quota refusal becomes the same `QuotaExhausted` (`over_quota()`), marked
  `refused_by_provider`: that call went out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import json
import math
import random
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, Protocol
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from .destinations import acheck_url
from .errors import ProviderError, QuotaExhausted

# What may not appear in an id that goes into a URL path.
UNSAFE_SEGMENT = re.compile(r"/|\.\.|[\x00-\x1f\x7f]")

COMPLETED: Final = "completed"
FAILED: Final = "failed"
STOPPED: Final = "stopped"
TerminalStatus = Literal["completed", "failed", "stopped"]
# Where a terminal event's news came from: the open stream, a status read, the provider's
# record of the message (history), or a signed push (webhook). The watcher keeps it as the
# run's proof.
Source = Literal["stream", "status", "history", "webhook"]


@dataclass(frozen=True)
class ProviderConfig:
    base_url: str
    api_key: str
    options: dict[str, Any] = field(default_factory=dict)
    timeout: float = 30.0
    # Only development and the demo may call loopback/private addresses (the simulators).
    allow_private: bool = False


@dataclass(frozen=True)
class Refusal:
    """A budget's no: wait `seconds`, because of `reason` (a sentence naming the quota)."""

    seconds: float
    reason: str


class Budget(Protocol):
    """How many calls of each kind an account may still make (its provider's quotas).

    Provider code asks before each counted call; the product implements it over the database,
    so every process shares one budget per account."""

    async def take(self, endpoint: str) -> Refusal | None:
        """Count one call of this kind and return None, or refuse (nothing counted)."""
        ...

    async def refused(self, endpoint: str, retry_after: float | None) -> Refusal:
        """The provider itself refused a call as over quota: note it for every process and
        say how long to wait."""
        ...

    async def interval(self, endpoint: str, base: float) -> float:
        """How far apart polls of this kind should be so the account's runs fit its quota."""
        ...


class Unlimited:
    """The budget of an account with no known quota (and nowhere to share a refusal)."""

    async def take(self, endpoint: str) -> Refusal | None:
        return None

    async def refused(self, endpoint: str, retry_after: float | None) -> Refusal:
        return Refusal(
            retry_after if retry_after is not None else 60.0,
            "The provider refused the call as over its quota.",
        )

    async def interval(self, endpoint: str, base: float) -> float:
        return base


# --- Normalised events ----------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The run has this id at the provider (plus ids it needs later). `acknowledged` is False
    when the id is our own and the provider has not answered yet (IntelligenceBox: the chat id
    is the client's, so a stop can go out at once)."""

    external_id: str
    refs: dict[str, Any] = field(default_factory=dict)
    acknowledged: bool = True


@dataclass(frozen=True)
class Running:
    """The provider reports the run as working (its own word in `provider_status`).

    `progress` is a marker that changes when the provider has done more (a message count);
    None when the provider can only say that it is still working, which then counts as
    progress for the "no progress" guardrail (it cannot be told apart from a stall)."""

    provider_status: str
    progress: str | None = None


@dataclass(frozen=True)
class OutputDelta:
    """More answer text; with `replace`, the whole answer so far (moderation, history)."""

    text: str
    replace: bool = False


@dataclass(frozen=True)
class Waiting:
    """The provider asked us to slow down; the client waits `seconds` and carries on.
    `announce` is False for a later refusal in a backoff episode already announced."""

    reason: str
    seconds: float
    announce: bool = True


@dataclass(frozen=True)
class StartRetry:
    """A refused start call (a refusal that proves nothing started: `retry_in`) is about to
    be sent again: the consumer's last moment to keep it from going out (a stop came)."""


@dataclass(frozen=True)
class QuotaWait:
    """A call this run needs is over the account's quota: the next may go in `seconds`."""

    endpoint: str
    seconds: float
    message: str


@dataclass(frozen=True)
class Usage:
    """What the provider says the run consumed; any field may be unknown."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    # A decimal string as the provider wrote it (never a float: money).
    price: str | None = None
    currency: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Finished:
    """The provider's own word that the run ended. `output`, when set, is the provider's
    whole final answer (it replaces what streamed); None keeps the streamed text."""

    status: TerminalStatus
    provider_status: str
    output: str | None = None
    structured_output: Any = None
    error: str | None = None
    usage: Usage | None = None
    via: Source = "stream"


@dataclass(frozen=True)
class StreamEnded:
    """The stream closed without a terminal event: what that means depends on whether a stop
    was requested, so the watcher decides (usually by reading the provider's status)."""


Event = Started | Running | OutputDelta | Waiting | StartRetry | QuotaWait | Finished | StreamEnded


@dataclass(frozen=True)
class StopResult:
    """What the stop call achieved. `terminal` is set only when the provider's own answer
    proves the run's final state (Fay's synchronous STOPPED, or a status read after a 400);
    None means the caller must wait for the stream or a status read to confirm."""

    terminal: TerminalStatus | None
    provider_status: str
    message: str
    answer: dict[str, Any]
    # "status" when `terminal` comes from a status read after the stop call, not its answer.
    via: Literal["answer", "status"] = "answer"
    # The run's end itself, when the stop found it already over and the provider could say
    # how (Fay: already completed, with its report): applied at once.
    finished: Finished | None = None


@dataclass(frozen=True)
class StatusResult:
    provider_status: str
    terminal: TerminalStatus | None
    error: str | None = None
    progress: str | None = None


# --- The base class: one choke point for outbound HTTP --------------------------------------


class Provider:
    kind: ClassVar[str]
    label: ClassVar[str]
    # The provider's documented quota tiers: tier → {endpoint: calls an hour, "month": calls a
    # calendar month}. An account picks a tier (or its own numbers) and gets a Budget for it.
    tiers: ClassVar[dict[str, dict[str, int]]] = {}
    # Dify ends a stopped stream with the same `message_end` as a finished one: for it, a
    # normal end after a stop request is the stop's confirmation.
    normal_end_confirms_stop: ClassVar[bool] = False
    # IntelligenceBox aborts a chat when its stream's client disconnects: a watcher handing
    # such a run over must let the stream finish, or the hand-over itself would end the run.
    disconnect_aborts: ClassVar[bool] = False
    # How long an open stream may stay silent before it counts as lost (then followed through
    # the provider's status). Providers that abort on disconnect get longer.
    stream_read_timeout: ClassVar[float] = 120.0
    # IntelligenceBox documents events separated by a single newline and parses them line by
    # line: each `data:` line is an event of its own, handed over without waiting for a blank
    # line (standard SSE parsing would hold them all until one comes, or drop them at EOF).
    line_events: ClassVar[bool] = False

    def __init__(
        self,
        config: ProviderConfig,
        client: httpx.AsyncClient | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.config = config
        self._client = client
        self._owns_client = client is None
        self.budget: Budget = budget or Unlimited()

    async def spend(self, endpoint: str) -> None:
        """Count one call against the account's quota, or raise QuotaExhausted unsent."""
        refusal = await self.budget.take(endpoint)
        if refusal is not None:
            raise QuotaExhausted(endpoint, refusal.seconds, refusal.reason)

    async def over_quota(self, endpoint: str, exc: ProviderError) -> QuotaExhausted:
        """The provider answered a call with its own quota refusal (a 429): every process
        learns of it through the budget, and the caller waits as a QuotaExhausted says."""
        refusal = await self.budget.refused(endpoint, exc.retry_after)
        return QuotaExhausted(endpoint, refusal.seconds, refusal.reason, refused_by_provider=True)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout, connect=5.0),
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the client only if this provider made it; a shared one outlives us."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"}

    def url(self, path: str) -> str:
        return self.config.base_url.rstrip("/") + path

    def segment(self, value: str, what: str = "id") -> str:
        """One URL path segment. Ids come from users and providers (hostile input): one that
        could climb out of its segment is refused before any request carries the key (an
        xpander agent id of `../../internal/admin?x=` once did), the rest is quoted."""
        text = str(value)
        if not text or UNSAFE_SEGMENT.search(text):
            raise ProviderError(
                "VALIDATION_ERROR",
                f"The {what} {text[:80]!r} cannot be sent to {self.label}: it is empty or "
                "contains '/', '..' or a control character. Check the id on the run or the "
                "provider account.",
            )
        return quote(text, safe="")

    async def check_destination(self) -> None:
        if not self.config.allow_private:
            await acheck_url(self.config.base_url)

    def error_from(self, response: httpx.Response) -> ProviderError:
        """Map a non-success answer to a ProviderError (each provider words its own)."""
        return ProviderError(
            f"HTTP_{response.status_code}",
            f"{self.label} answered HTTP {response.status_code}.",
            retryable=response.status_code == 429 or response.status_code >= 500,
            retry_after=retry_after_seconds(response),
            http_status=response.status_code,
        )

    async def sse(self, path: str, json_body: Any) -> AsyncGenerator[ServerSentEvent]:
        """POST and yield the server-sent events; a refused start raises its ProviderError.

        Once the stream is open, silence longer than `stream_read_timeout` ends it like a
        dropped connection: the caller follows the run through its status instead (the run
        may be doing quiet work, like an xpander sub-task), rather than failing it."""
        headers = {"Accept": "text/event-stream", **self.auth_headers()}
        await self.check_destination()
        opened = False
        try:
            async with aconnect_sse(
                self.client,
                "POST",
                self.url(path),
                json=json_body,
                headers=headers,
                timeout=httpx.Timeout(self.config.timeout, read=self.stream_read_timeout),
            ) as source:
                response = source.response
                content_type = response.headers.get("content-type", "")
                if not response.is_success or "text/event-stream" not in content_type:
                    await response.aread()
                    raise self.error_from(response)
                opened = True
                if self.line_events:
                    # The response (and its lines) close with the context around it.
                    async for line in response.aiter_lines():
                        if line.startswith("data:"):
                            yield ServerSentEvent(data=line[5:].removeprefix(" "))
                    return
                async for event in source.aiter_sse():
                    yield event
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # The connection dropped mid-stream: the same as a stream that just ended.
            return
        except httpx.ReadTimeout as exc:
            if opened:
                return  # silent too long: followed through status from here
            raise self.transport_error(exc, "did not answer the start in time") from None
        except httpx.HTTPError as exc:
            raise self.transport_error(exc, "stream went silent for too long") from None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send one request; transport failures become retryable ProviderErrors."""
        headers = {"Accept": "application/json", **self.auth_headers()}
        if method == "POST":
            # Fay documents Content-Type as required on POST even with no body.
            headers["Content-Type"] = "application/json"
        content = json.dumps(json_body).encode() if json_body is not None else b""
        await self.check_destination()
        try:
            return await self.client.request(
                method,
                self.url(path),
                headers=headers,
                content=content if method != "GET" else None,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise self.transport_error(exc, "did not answer in time") from None

    def transport_error(self, exc: httpx.HTTPError, timed_out: str) -> ProviderError:
        """A failure below HTTP, in words; all retryable (nothing was refused)."""
        if isinstance(exc, httpx.TimeoutException):
            return ProviderError(
                "PROVIDER_TIMEOUT",
                f"{self.label} {timed_out}. It may be overloaded; Runbrake tries again.",
                retryable=True,
            )
        if isinstance(exc, httpx.ConnectError):
            return ProviderError(
                "PROVIDER_UNREACHABLE",
                f"Could not connect to {self.label} at {self.config.base_url}. "
                "Check the provider account's base URL and that the service is up.",
                retryable=True,
            )
        return ProviderError(
            "PROVIDER_TRANSPORT_ERROR",
            f"The connection to {self.label} failed ({type(exc).__name__}). Try again.",
            retryable=True,
        )

    # --- The interface ---------------------------------------------------------------------

    def run(self, prompt: str, options: dict[str, Any]) -> AsyncGenerator[Event]:
        raise NotImplementedError

    def follow(self, external_id: str, refs: dict[str, Any]) -> AsyncGenerator[Event]:
        raise NotImplementedError

    async def status(self, external_id: str, refs: dict[str, Any] | None = None) -> StatusResult:
        raise NotImplementedError

    async def stop(
        self, external_id: str, options: dict[str, Any], *, timeout: float | None = None
    ) -> StopResult:
        raise NotImplementedError

    async def check(self) -> str:
        """Prove the base URL answers and the key is accepted, without starting a run (the
        Test connection button). Returns a sentence; raises ProviderError otherwise."""
        raise NotImplementedError


# A provider's Retry-After is hostile input like any other header: "inf", "nan" or a year
# must not break (or park) the stop path.
MAX_RETRY_AFTER = 3600.0


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), bounded; None when
    absent or unreadable."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter: spreads retries from many runs apart."""
    return random.uniform(base / 2, min(cap, base * 2**attempt))


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


MAX_START_ATTEMPTS = 5


def proves_nothing_started(exc: ProviderError) -> bool:
    """Whether a failed start call certainly started nothing: the provider answered it with a
    refusal (any HTTP error status: 429, 5xx, a bad key, Dify's concurrency ceiling), or the
    connection was never made. A timeout, or a connection lost after the request went out,
    may have started a run."""
    return exc.http_status is not None or exc.code == "PROVIDER_UNREACHABLE"


def retry_in(exc: ProviderError, attempt: int, *, idempotent: bool = False) -> float | None:
    """Seconds to wait before trying a failed call again (its `attempt`-th failure), or None
    to give up and raise. A call that may start a run is retried only when the failure
    proves nothing started (`proves_nothing_started`); `idempotent` calls (reads) on any
    retryable failure."""
    if not exc.retryable or attempt >= MAX_START_ATTEMPTS:
        return None
    if not idempotent and not proves_nothing_started(exc):
        return None  # it may have started a run: sending it again could start a second
    return exc.retry_after if exc.retry_after is not None else backoff_delay(attempt)


async def wait_to_retry(exc: ProviderError, attempt: int) -> AsyncGenerator[Waiting | StartRetry]:
    """After a start call's `attempt`-th failure: wait before sending it again, or raise `exc`
    when trying again is not safe or no longer worth it (`retry_in`). Every refusal is a
    Waiting event (announced once per backoff episode), and a StartRetry comes just before
    the call goes out again: the consumer learns that nothing is out at the provider while
    it waits, and may stop there (closing this generator) if the run was stopped meanwhile."""
    if (delay := retry_in(exc, attempt)) is None:
        raise exc
    yield Waiting(exc.message, delay, announce=attempt == 1)
    await asyncio.sleep(delay)
    yield StartRetry()


async def start_stream(
    provider: Provider, path: str, body: Any
) -> AsyncGenerator[ServerSentEvent | Waiting | StartRetry]:
    """Open a run's stream, retrying only refusals that prove nothing started (429, 5xx,
    refused connections), with the events of `wait_to_retry`."""
    attempt = 0
    while True:
        # Closed here whatever happens, so a caller that stops early frees the connection now.
        async with contextlib.aclosing(provider.sse(path, body)) as stream:
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                return
            except ProviderError as exc:
                attempt += 1
                async for waiting in wait_to_retry(exc, attempt):
                    yield waiting
                continue
            yield first
            async for event in stream:
                yield event
            return
