"""Dify Chat App API: streamed chat-messages and their stop (shared/providers/dify.md)."""

from __future__ import annotations

import asyncio
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

MESSAGES = {
    "unauthorized": "Dify refused the app API key. Ask a team admin to update the key on the "
    "Dify provider account.",
    "forbidden": "Dify says this app's API is disabled or the app no longer exists ({detail}).",
    "invalid_param": "Dify rejected the request: {detail}. Check the fields and launch again.",
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
WORKFLOW_STATUS: dict[str, TerminalStatus] = {
    "succeeded": COMPLETED,
    "partial-succeeded": COMPLETED,
    "failed": FAILED,
    "stopped": STOPPED,
}
HISTORY_POLL = 1.0
HISTORY_STABLE_POLLS = 3


class DifyProvider(Provider):
    kind = "dify"
    label = "Dify"
    normal_end_confirms_stop = True

    def error_from(self, response: httpx.Response) -> ProviderError:
        payload = parse_json(response.text) if response.content else None
        payload = payload if isinstance(payload, dict) else {}
        code = str(payload.get("code") or f"HTTP_{response.status_code}")
        detail = str(payload.get("message") or "no message")
        template = MESSAGES.get(code, "Dify answered HTTP {status}: {detail}.")
        return ProviderError(
            code,
            template.format(detail=detail, status=response.status_code),
            retryable=code not in NOT_RETRYABLE
            and (response.status_code == 429 or response.status_code >= 500),
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
        terminal: Finished | None = None
        async for sse in start_stream(self, "/chat-messages", body):
            if isinstance(sse, Waiting):
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
            if event in ("message", "agent_message"):
                if answer := data.get("answer"):
                    yield OutputDelta(str(answer))
            elif event == "message_replace":
                yield OutputDelta(str(data.get("answer") or ""), replace=True)
            elif event == "message_end":
                # Chatflow may still send workflow_finished (either order): keep reading.
                terminal = terminal or Finished(COMPLETED, "message_end")
            elif event == "workflow_finished":
                status = str((data.get("data") or {}).get("status") or "")
                if status in WORKFLOW_STATUS:
                    terminal = Finished(
                        WORKFLOW_STATUS[status],
                        f"workflow_finished:{status}",
                        error=(data.get("data") or {}).get("error"),
                    )
            elif event == "error":
                yield Finished(
                    FAILED,
                    f"error:{data.get('code')}",
                    error=f"Dify reported an error: {data.get('message') or data.get('code')}",
                )
                return
        yield terminal if terminal is not None else StreamEnded()

    async def follow(self, external_id: str, refs: dict[str, Any]) -> AsyncGenerator[Event]:
        """Dify has no status endpoint: follow the message in history until it stops growing.

        A stable answer cannot tell "finished" from "stopped"; the watcher decides by whether
        a stop was requested, as it does for the stream's own `message_end`.
        """
        conversation_id, message_id = refs.get("conversation_id"), refs.get("message_id")
        if not conversation_id or not message_id:
            raise ProviderError(
                "CANNOT_FOLLOW",
                "The connection to Dify's stream was lost before Dify named the message, and "
                "Dify has no status endpoint. Check the run in Dify's console.",
            )
        last, stable = None, 0
        while stable < HISTORY_STABLE_POLLS:
            message = await self.message(conversation_id, message_id, str(refs.get("user")))
            if message is None:
                raise ProviderError("NOT_FOUND", "Dify no longer has this message in history.")
            if message.get("status") == "error":
                yield Finished(FAILED, "history:error", error=str(message.get("error")))
                return
            answer = str(message.get("answer") or "")
            if answer != last:
                yield OutputDelta(answer, replace=True)
                last, stable = answer, 0
            else:
                stable += 1
            await asyncio.sleep(HISTORY_POLL)
        yield Finished(COMPLETED, "history:stable")

    async def message(self, conversation_id: str, message_id: str, user: str) -> Any:
        query = urlencode({"conversation_id": conversation_id, "user": user, "limit": 20})
        history = await self.call("GET", f"/messages?{query}")
        for message in (history or {}).get("data") or []:
            if message.get("id") == message_id:
                return message
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
            f"/chat-messages/{external_id}/stop",
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
