"""xpander.ai Agent Gateway: a streamed conversation turn, its sub-tasks, run-state and stop
(docs/providers/xpander.md says where each behaviour comes from)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent

from .base import (
    COMPLETED,
    FAILED,
    STOPPED,
    UNSAFE_SEGMENT,
    Event,
    Finished,
    OutputDelta,
    Provider,
    Running,
    Source,
    Started,
    StartRetry,
    StatusResult,
    StopResult,
    StreamEnded,
    TerminalStatus,
    Waiting,
    backoff_delay,
    parse_json,
    retry_after_seconds,
    start_stream,
)
from .errors import ProviderError

# The SDK's AgentExecutionStatus. Older docs say `running` and `cancelled`: read as aliases.
TASK_STATUS: dict[str, TerminalStatus | None] = {
    "pending": None,
    "executing": None,
    "paused": None,
    "completed": COMPLETED,
    "failed": FAILED,
    "error": FAILED,
    "stopped": STOPPED,
}
ALIASES = {"running": "executing", "cancelled": "stopped", "canceled": "stopped"}
# A sub-task the parent's record lists in `finished_sub_executions`, or one the provider no
# longer knows (404): over, outcome unknown.
ENDED = "finished"
STATUS_POLL = 1.0  # seconds per call while following: the legacy limit is 100 calls a minute
# The events that say a sub-task started, moved on or ended (shown as progress).
LIFECYCLE = (
    "sub_agent_trigger",
    "sub_task_created",
    "sub_task_updated",
    "sub_task_finished",
    "task_created",
    "task_updated",
    "task_finished",
)


def native_status(value: Any) -> str:
    # Cut short: a status is shown (and stored in 40 characters) inside our own words.
    status = str(value or "")[:12]
    return ALIASES.get(status, status)


def is_over(status: str) -> bool:
    return status == ENDED or TASK_STATUS.get(status) is not None


def _words(text: str) -> str:
    return " ".join(text.split())


def safe_id(value: Any) -> str | None:
    """An id from the provider that may go into our URLs, else None (ignored)."""
    if isinstance(value, str) and value and not UNSAFE_SEGMENT.search(value):
        return value
    return None


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Outcome:
    """How a turn ended, from the router's status and its sub-tasks' (stream or records)."""

    router_status: str
    router_result: Any
    children: dict[str, str]  # sub-task id -> native status
    parts: list[str | None]  # each sub-task's text, in order (None: unknown)
    via: Source

    def finished(self) -> Finished:
        native = self.router_status
        terminal = TASK_STATUS.get(native) or FAILED
        stopped = [c for c, s in self.children.items() if TASK_STATUS.get(s) == STOPPED]
        failed = [c for c, s in self.children.items() if TASK_STATUS.get(s) == FAILED]
        provider_status = native
        completed = [c for c, s in self.children.items() if TASK_STATUS.get(s) == COMPLETED]
        if terminal == COMPLETED and stopped:
            # The router had answered; the stop reached the work it handed on.
            terminal, provider_status = STOPPED, f"{native}; sub-task stopped"
        elif terminal == STOPPED and completed and not stopped:
            # The router stopped, but the work it handed on ran to its end: that is not a
            # stopped run (the sub-task was billed in full), and Runbrake says so.
            terminal = COMPLETED
            provider_status = f"{native}; sub-task completed despite the stop"
        elif failed:
            # A failed sub-task leaves the turn's own status alone, but says so.
            provider_status = f"{native}; {plural(len(failed), 'sub-task')} failed"
        result = self.router_result
        error = f"xpander.ai reported the turn {native}: {result}" if terminal == FAILED else None
        output = None
        # A failed turn's result is its error message, not its answer: what streamed stays
        # the run's text (None), and the message is the error.
        if terminal != FAILED and isinstance(result, str) and None not in self.parts:
            output = "\n\n".join(p for p in [result, *self.parts] if p)
        return Finished(
            terminal,
            provider_status,
            output=output,
            error=error,
            via=self.via,
        )


@dataclass
class TurnReader:
    """Reads one turn's events off the stream: the router's own, and its sub-tasks'.

    An event is this run's when it is about the router (its task id), or about a sub-task:
    a `sub_task_*`/`sub_agent_trigger` event, a Task whose `parent_execution` is the router,
    or one carrying a sub-task id already learned. Anything else (a drained follow-up turn)
    belongs to another run. The turn is over when the router has finished, a `turn_started`
    has its `turn_finished`, and every sub-task it started has ended: an async sub-task
    keeps working after the router answers.
    """

    refs: dict[str, Any] = field(default_factory=dict)
    router: str = ""  # the router's task id (the conversation id), once known
    router_status: str | None = None
    router_result: Any = None
    turn_open: bool = False
    later_turn: bool = False  # the stream moved on to a queued follow-up
    children: dict[str, str] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)
    last_source: str | None = None
    child_events: int = 0

    @property
    def done(self) -> bool:
        return (
            self.router_status is not None
            and not self.turn_open
            and all(is_over(s) for s in self.children.values())
        )

    def outcome(self) -> Outcome:
        assert self.router_status is not None
        unnamed = "".join(self.texts.get("", []))
        parts: list[str | None] = []
        for child in self.children:
            text, unnamed = self.text_of(child, unnamed)
            parts.append(text)
        parts.append(unnamed)
        return Outcome(self.router_status, self.router_result, self.children, parts, "stream")

    def text_of(self, child: str, unnamed: str) -> tuple[str, str]:
        """A sub-task's text, and what is left of the text no sub-task could be named for.

        Its finished record's `result` is its whole text, so it wins over what streamed
        (some of which may have come under the router's id, and been taken for the router's);
        streamed text it already holds is not repeated."""
        streamed = "".join(self.texts.get(child, []))
        result = self.results.get(child)
        if isinstance(result, str) and result and len(result) >= len(streamed):
            if unnamed and _words(unnamed) in _words(result):
                unnamed = ""
            return result, unnamed
        if streamed:
            return streamed, unnamed
        return ("" if unnamed else (result or "")), unnamed

    def read(self, event: dict[str, Any]) -> Iterator[Event]:
        kind, data = event.get("type"), event.get("data")
        envelope = event.get("task_id") if isinstance(event.get("task_id"), str) else None
        task = data if isinstance(data, dict) else {}
        subject = task.get("id") if isinstance(task.get("id"), str) else envelope
        if kind == "connected":
            return  # sent before anything is persisted: its task_id says nothing
        if not self.router:
            if kind == "task_created" and envelope and not task.get("parent_execution"):
                if safe_id(envelope) is None:
                    raise ProviderError(
                        "VALIDATION_ERROR",
                        "xpander.ai answered with a conversation id Runbrake will not put in a "
                        "URL.",
                    )
                self.router = envelope
                yield Started(envelope, refs=self.refs)
            return
        child = self.child_of(kind, envelope, subject, task)
        if child is not None:
            yield from self.read_child(kind, child, data, task)
        elif subject == self.router and not self.later_turn:
            yield from self.read_router(kind, data, task)

    def child_of(
        self, kind: Any, envelope: str | None, subject: str | None, task: dict[str, Any]
    ) -> str | None:
        """The sub-task an event is about ("" when it cannot be told), or None."""
        if task.get("parent_execution") == self.router and subject != self.router:
            return self.learn(subject)
        if kind == "sub_agent_trigger":
            return ""  # its data is the trigger (its own id), not the sub-task
        if isinstance(kind, str) and kind.startswith("sub_task_"):
            return self.learn(subject) if subject != self.router else ""
        for candidate in (subject, envelope):
            if candidate and candidate != self.router and candidate in self.children:
                return candidate
        return None

    def learn(self, child: str | None) -> str:
        if (child := safe_id(child)) is None:
            return ""
        self.children.setdefault(child, "pending")
        return child

    def read_child(self, kind: Any, child: str, data: Any, task: dict[str, Any]) -> Iterator[Event]:
        if kind == "chunk":
            if isinstance(data, str):
                yield from self.text(child, data)
            return
        if kind not in LIFECYCLE:
            return  # a sub-task's tool calls and thoughts: not ours to show
        status = native_status(task.get("status"))
        if kind in ("sub_task_finished", "task_finished") and not is_over(status):
            status = ENDED
        if child and status and task.get("id", child) == child:
            self.children[child] = status
            if isinstance(task.get("result"), str):
                self.results[child] = task["result"]
        self.child_events += 1
        word = status or ("triggered" if kind == "sub_agent_trigger" else "working")
        yield Running(f"sub-task {word}", progress=str(self.child_events))

    def read_router(self, kind: Any, data: Any, task: dict[str, Any]) -> Iterator[Event]:
        finished = self.router_status is not None
        if kind == "chunk" and isinstance(data, str):
            # After the router's answer, its id can only carry a sub-task's mirrored text:
            # the working sub-task's, when only one works.
            working = [c for c, s in self.children.items() if not is_over(s)]
            source = working[0] if len(working) == 1 else ""
            yield from self.text(source if finished else self.router, data)
        elif kind in ("task_created", "turn_started") and finished and not self.turn_open:
            self.later_turn = True  # a queued follow-up reusing the conversation's id
        elif kind == "turn_started":
            self.turn_open = True
        elif kind == "turn_finished":
            self.turn_open = False
            if isinstance(task.get("result"), str):
                self.router_result = task["result"]
            if not finished and is_over(native_status(task.get("status"))):
                self.router_status = native_status(task.get("status"))
        elif kind == "task_updated" and not finished:
            self.learn_from(task)
            if task.get("status") in ("executing", "paused", "running"):
                yield Running(native_status(task["status"]))
        elif kind == "task_finished" and not finished:
            self.learn_from(task)
            self.router_status = native_status(task.get("status"))
            if self.router_result is None:
                self.router_result = task.get("result")
            waiting = [c for c, s in self.children.items() if not is_over(s)]
            if waiting:
                yield Running(
                    f"{self.router_status}; waiting for {plural(len(waiting), 'sub-task')}",
                    progress=str(self.child_events),
                )

    def learn_from(self, task: dict[str, Any]) -> None:
        for child in task.get("sub_executions") or ():
            self.learn(child)
        for child in task.get("finished_sub_executions") or ():
            if (child := safe_id(child)) is not None and not is_over(self.children.get(child, "")):
                self.children[child] = ENDED

    def text(self, source: str, piece: str) -> Iterator[Event]:
        if self.last_source is not None and source != self.last_source:
            yield OutputDelta("\n\n")  # a sub-task's text is its own paragraph
        self.last_source = source
        self.texts.setdefault(source, []).append(piece)
        yield OutputDelta(piece)


@dataclass
class Snapshot:
    """The conversation as run-state and the task records show it: how it ended once idle
    (`outcome`), and how many calls that took to learn."""

    provider_status: str
    calls: int
    outcome: Outcome | None = None


class XpanderProvider(Provider):
    kind = "xpander"
    label = "xpander.ai"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Sub-tasks learned from a stream, by router id: a status read or a follow() after
        # the stream ends checks them too, even before the router's record lists them.
        self.known_children: dict[str, dict[str, str]] = {}

    @property
    def poll_interval(self) -> float:
        return float(self.config.options.get("poll_interval", STATUS_POLL))

    def auth_headers(self) -> dict[str, str]:
        # The API key goes in x-api-key: the docs say Bearer API keys are not supported.
        return {"x-api-key": self.config.api_key}

    def error_from(self, response: httpx.Response) -> ProviderError:
        payload = parse_json(response.text) if response.content else None
        detail = payload.get("detail") if isinstance(payload, dict) else None
        if isinstance(detail, list):
            detail = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                for d in detail
                if isinstance(d, dict)
            )
        status = response.status_code
        if status in (401, 403):
            return ProviderError(
                "UNAUTHORIZED",
                "xpander.ai refused the API key. The key is set on the xpander provider "
                "account by a team admin.",
                http_status=status,
            )
        if status == 404:
            return ProviderError(
                "NOT_FOUND",
                f"xpander.ai could not find that agent or conversation ({detail}). Check the "
                "agent id.",
                http_status=status,
            )
        if status == 422:
            return ProviderError(
                "VALIDATION_ERROR", f"xpander.ai rejected the request: {detail}.", http_status=422
            )
        return ProviderError(
            f"HTTP_{status}",
            f"xpander.ai answered HTTP {status}"
            + (f" ({detail})" if detail else "")
            + (". Runbrake retries." if status == 429 or status >= 500 else "."),
            retryable=status == 429 or status >= 500,
            retry_after=retry_after_seconds(response),
            http_status=status,
        )

    def agent_of(self, options: dict[str, Any]) -> str:
        agent = options.get("agent_id") or self.config.options.get("agent_id")
        if not agent:
            raise ProviderError(
                "VALIDATION_ERROR", "An xpander run needs an agent id (on the run or account)."
            )
        self.segment(str(agent), "agent id")
        return str(agent)

    def conversation_path(self, agent_id: str, conversation_id: str) -> str:
        prefix = self.config.options.get("path_prefix") or "gateway/conversations"
        agent = self.segment(agent_id, "agent id")
        return f"/v1/agents/{agent}/{prefix}/{self.segment(conversation_id, 'conversation id')}"

    def task_path(self, task_id: str) -> str:
        return f"/v1/tasks/{self.segment(task_id, 'task id')}"

    async def run(self, prompt: str, options: dict[str, Any]) -> AsyncGenerator[Event]:
        agent_id = self.agent_of(options)
        body: dict[str, Any] = {"input": {"text": prompt}}
        if options.get("user"):
            body["input"]["user"] = options["user"]
        if options.get("conversation_id"):
            body["id"] = options["conversation_id"]
        agent = self.segment(agent_id, "agent id")
        reader = TurnReader(refs={"agent_id": agent_id})
        async with contextlib.aclosing(self._turn_stream(agent, body)) as stream:
            async for sse in stream:
                if isinstance(sse, Waiting | StartRetry):
                    yield sse
                    continue
                event = parse_json(sse.data) if sse.data else None
                if not isinstance(event, dict):
                    continue
                for out in reader.read(event):
                    if isinstance(out, Started):
                        self.known_children[out.external_id] = reader.children
                    yield out
                if reader.done:
                    yield reader.outcome().finished()
                    return
        yield StreamEnded()

    async def _turn_stream(
        self, agent: str, body: dict[str, Any]
    ) -> AsyncGenerator[ServerSentEvent | Waiting | StartRetry]:
        """Run a turn. The gateway's run-turn-stream page does not show its path (Assumption
        (ours): `…/gateway/invoke/stream`); a 404 there, before anything started, falls back to
        the documented Invoke Agent stream, which takes the same body and streams the same
        events. An unknown agent is a 404 on both, reported as such."""
        paths = [f"/v1/agents/{agent}/gateway/invoke/stream", f"/v1/agents/{agent}/invoke/stream"]
        for index, path in enumerate(paths):
            try:
                async with contextlib.aclosing(start_stream(self, path, body)) as stream:
                    async for sse in stream:
                        yield sse
                return
            except ProviderError as exc:
                if exc.http_status != 404 or index == len(paths) - 1:
                    raise

    async def follow(self, external_id: str, refs: dict[str, Any]) -> AsyncGenerator[Event]:
        """Poll until the conversation is idle (router and sub-tasks), then say how it ended."""
        agent_id = str(refs.get("agent_id") or self.agent_of({}))
        failures = 0
        while True:
            try:
                snapshot = await self.snapshot(external_id, agent_id)
            except ProviderError as exc:
                if not exc.retryable:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else backoff_delay(failures)
                if failures == 0:
                    yield Waiting(exc.message, delay)  # one event per backoff episode
                failures += 1
                await asyncio.sleep(delay)
                continue
            failures = 0
            if snapshot.outcome is not None:
                yield snapshot.outcome.finished()
                return
            # Polling cannot tell work from a stall: no progress marker.
            yield Running(snapshot.provider_status)
            await asyncio.sleep(self.poll_interval * snapshot.calls)

    async def snapshot(self, external_id: str, agent_id: str) -> Snapshot:
        """Idle means: run-state says nothing runs and no child is active, the router's record
        is terminal, and every known sub-task has ended (its own record, or the router's
        `finished_sub_executions`). run-state alone is not enough: whether `is_running`
        covers an async sub-task is not documented."""
        state = await self.call("GET", self.conversation_path(agent_id, external_id) + "/run-state")
        state = state if isinstance(state, dict) else {}
        last = native_status(state.get("execution_status"))
        known = self.known_children.setdefault(external_id, {})
        active = safe_id(state.get("active_child_id"))
        if active is not None:
            known.setdefault(active, "pending")
        if state.get("is_running"):
            return Snapshot(last or "executing", 1)
        if active is not None:
            return Snapshot(f"{last or 'router done'}; waiting for sub-task", 1)

        calls = 2
        router = await self.record(external_id)
        if router is None:
            # No task record for the conversation id: run-state's last status stands in.
            router = {"status": last if TASK_STATUS.get(last) else "stopped"}
        router_status = native_status(router.get("status"))
        if TASK_STATUS.get(router_status) is None:
            return Snapshot(router_status or "executing", calls)
        for child in router.get("sub_executions") or ():
            if (child := safe_id(child)) is not None:
                known.setdefault(child, "pending")
        finished = {c for c in router.get("finished_sub_executions") or () if isinstance(c, str)}
        parts: list[str | None] = []
        for child in list(known):
            calls += 1
            record = await self.record(child)
            status = native_status((record or {}).get("status"))
            if not is_over(status):
                status = ENDED if child in finished or record is None else status
            known[child] = status
            if not is_over(status):
                return Snapshot(f"{router_status}; waiting for sub-task", calls)
            result = (record or {}).get("result")
            parts.append(result if isinstance(result, str) else None)
        outcome = Outcome(router_status, router.get("result"), dict(known), parts, "status")
        return Snapshot(router_status, calls, outcome)

    async def record(self, task_id: str) -> dict[str, Any] | None:
        """A task's record; None when xpander does not know the id."""
        try:
            task = await self.call("GET", self.task_path(task_id))
        except ProviderError as exc:
            if exc.code == "NOT_FOUND":
                return None
            raise
        return task if isinstance(task, dict) else {}

    async def check(self) -> str:
        # An unknown conversation is a 404 only once the key was accepted (401 otherwise).
        try:
            await self.status("00000000-0000-4000-8000-000000000000")
        except ProviderError as exc:
            if exc.code != "NOT_FOUND":
                raise
        return "xpander.ai answered and accepted the key."

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.request(method, path, **kwargs)
        if not response.is_success:
            raise self.error_from(response)
        return parse_json(response.text)

    async def status(self, external_id: str, refs: dict[str, Any] | None = None) -> StatusResult:
        # The run's own agent (its refs), else the account's.
        agent_id = str((refs or {}).get("agent_id") or self.agent_of({}))
        snapshot = await self.snapshot(external_id, agent_id)
        if snapshot.outcome is None:
            return StatusResult(provider_status=snapshot.provider_status, terminal=None)
        finished = snapshot.outcome.finished()
        return StatusResult(
            provider_status=finished.provider_status,
            terminal=finished.status,
            error=finished.error,
        )

    async def stop(
        self, external_id: str, options: dict[str, Any], *, timeout: float | None = None
    ) -> StopResult:
        agent_id = self.agent_of(options)
        # The body is required (422 without it). Clearing the queue by default means a
        # cancelled turn can never be followed by a surprise queued one.
        clear_queue = bool(options.get("clear_queue", True))
        answer = await self.call(
            "POST",
            self.conversation_path(agent_id, external_id) + "/stop",
            json_body={"clear_queue": clear_queue},
            timeout=timeout,
        )
        # The 200 body is unspecified (`{}` in the OpenAPI): it proves nothing either way.
        # The stream's end or an idle status read (sub-tasks included) confirms the stop.
        return StopResult(
            terminal=None,
            provider_status="stop accepted",
            message="xpander.ai accepted the stop"
            + (" and cleared the queue" if clear_queue else "")
            + "; confirming.",
            answer=answer if isinstance(answer, dict) else {},
        )
