"""xpander.ai Agent Gateway: a streamed conversation turn, run-state and stop
(shared/providers/xpander.md)."""

from __future__ import annotations

import asyncio
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

TASK_STATUS: dict[str, TerminalStatus | None] = {
    "pending": None,
    "executing": None,
    "paused": None,
    "completed": COMPLETED,
    "failed": FAILED,
    "error": FAILED,
    "stopped": STOPPED,
}
STATUS_POLL = 1.0  # run-state is cheap, but the legacy limit is 100 requests a minute


class XpanderProvider(Provider):
    kind = "xpander"
    label = "xpander.ai"

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
                "xpander.ai refused the API key. Ask a team admin to update the key on the "
                "xpander provider account.",
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
        return str(agent)

    def conversation_path(self, agent_id: str, conversation_id: str) -> str:
        prefix = self.config.options.get("path_prefix") or "gateway/conversations"
        return f"/v1/agents/{agent_id}/{prefix}/{conversation_id}"

    async def run(self, prompt: str, options: dict[str, Any]) -> AsyncGenerator[Event]:
        agent_id = self.agent_of(options)
        body: dict[str, Any] = {"input": {"text": prompt}}
        if options.get("user"):
            body["input"]["user"] = options["user"]
        if options.get("conversation_id"):
            body["id"] = options["conversation_id"]
        task_id: str | None = None
        path = f"/v1/agents/{agent_id}/gateway/invoke/stream"
        async for sse in start_stream(self, path, body):
            if isinstance(sse, Waiting):
                yield sse
                continue
            event = parse_json(sse.data) if sse.data else None
            if not isinstance(event, dict):
                continue
            kind, data = event.get("type"), event.get("data")
            if kind == "task_created" and task_id is None and event.get("task_id"):
                task_id = str(event["task_id"])
                yield Started(task_id, refs={"agent_id": agent_id})
            elif event.get("task_id") not in (None, task_id):
                # Drained follow-ups on the same stream are other turns, not this run.
                continue
            elif kind == "task_updated" and isinstance(data, dict):
                if data.get("status") in ("executing", "paused"):
                    yield Running(str(data["status"]))
            elif kind == "chunk" and isinstance(data, str):
                yield OutputDelta(data)
            elif kind == "task_finished" and isinstance(data, dict):
                yield self.finished(data)
                return
        yield StreamEnded()

    def finished(self, task: dict[str, Any]) -> Finished:
        native = str(task.get("status") or "")
        terminal = TASK_STATUS.get(native) or FAILED
        result = task.get("result")
        return Finished(
            terminal,
            native,
            output=result if isinstance(result, str) else None,
            error=f"xpander.ai reported the turn {native}: {result}"
            if terminal == FAILED
            else None,
        )

    async def follow(self, external_id: str, refs: dict[str, Any]) -> AsyncGenerator[Event]:
        """Poll run-state until the turn is no longer running, then read the task record."""
        agent_id = str(refs.get("agent_id") or self.agent_of({}))
        while True:
            result = await self.status(external_id, agent_id=agent_id)
            if result.terminal is not None:
                task = await self.call("GET", f"/v1/tasks/{external_id}")
                yield self.finished(task if isinstance(task, dict) else {"status": "stopped"})
                return
            yield Running(result.provider_status)
            await asyncio.sleep(STATUS_POLL)

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

    async def status(self, external_id: str, *, agent_id: str | None = None) -> StatusResult:
        state = await self.call(
            "GET", self.conversation_path(agent_id or self.agent_of({}), external_id) + "/run-state"
        )
        state = state if isinstance(state, dict) else {}
        native = str(state.get("execution_status") or "")
        if state.get("is_running"):
            return StatusResult(provider_status=native or "running", terminal=None)
        # Not running: the last turn's status says how it ended (stopped when unknown).
        return StatusResult(
            provider_status=native or "not running", terminal=TASK_STATUS.get(native) or STOPPED
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
        answer = answer if isinstance(answer, dict) else {}
        if answer.get("stopped") is False:
            # Nothing was running: run-state says how the turn ended.
            result = await self.status(external_id, agent_id=agent_id)
            return StopResult(
                terminal=result.terminal,
                provider_status=result.provider_status,
                message="xpander.ai had nothing running to stop.",
                answer=answer,
            )
        return StopResult(
            terminal=None,
            provider_status="stop accepted",
            message="xpander.ai accepted the stop"
            + (" and cleared the queue" if clear_queue else "")
            + "; confirming.",
            answer=answer,
        )
