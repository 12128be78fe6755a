"""The Fay client against the Fay simulator over real HTTP: every path, every error code."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from runs.providers.base import (
    Finished,
    ProviderConfig,
    Running,
    Started,
    StartRetry,
    Waiting,
)
from runs.providers.errors import ProviderError, QuotaExhausted
from runs.providers.fay import FayProvider
from tests.wire import event_of


def fay(url: str, key: str = "sim-test-key", **options: Any) -> FayProvider:
    return FayProvider(
        ProviderConfig(
            base_url=url,
            api_key=key,
            allow_private=True,
            options={"poll_interval": 0.05, **options},
        )
    )


async def collect(provider: FayProvider, prompt: str, **options: Any) -> list[Any]:
    try:
        return [event async for event in provider.run(prompt, options)]
    finally:
        await provider.aclose()


async def test_it_runs_a_research_request_to_completion(fay_url):
    # Long enough in PROCESSING that a poll sees it even on a busy machine.
    events = await collect(fay(fay_url), "AI editors sim:pending=0.1 sim:duration=1.5")
    assert isinstance(events[0], Started)
    uuid.UUID(events[0].external_id)
    assert Running("PROCESSING") in events
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.status == "completed"
    assert finished.provider_status == "COMPLETED"
    assert "### Research: AI editors" in (finished.output or "")


async def test_it_returns_structured_output_shaped_by_the_schema(fay_url):
    schema = {
        "type": "object",
        "properties": {
            "companies": {"type": "array", "items": {"type": "string"}},
            "count": {"type": "integer"},
        },
    }
    events = await collect(
        fay(fay_url),
        "Companies sim:pending=0 sim:duration=0.1",
        structured_output=True,
        output_schema=schema,
    )
    finished = events[-1]
    assert finished.output is None
    assert finished.structured_output == {"companies": ["Sample companies"], "count": 7}


async def test_it_reports_a_failed_run_with_fays_message(fay_url):
    events = await collect(fay(fay_url), "x sim:pending=0 sim:duration=0.1 sim:fail=failed")
    assert events[-1].status == "failed"
    assert "Simulated research failure" in events[-1].error


async def test_it_stops_a_running_request_and_fay_confirms(fay_url):
    provider = fay(fay_url)
    first = event_of(Started, await anext(provider.run("long sim:pending=0 sim:duration=60", {})))
    result = await provider.stop(first.external_id, {})
    assert result.terminal == "stopped"
    assert result.answer["status"] == "STOPPED"
    assert (await provider.status(first.external_id)).terminal == "stopped"


async def test_it_adopts_the_terminal_state_when_stop_says_already_completed(fay_url):
    provider = fay(fay_url)
    events = await collect(provider, "quick sim:pending=0 sim:duration=0.05")
    result = await fay(fay_url).stop(events[0].external_id, {})
    assert result.terminal == "completed"
    assert result.answer["code"] == "CONVERSATION_ALREADY_COMPLETED"
    assert "already completed" in result.message


async def test_a_second_stop_is_answered_already_stopped(fay_url):
    provider = fay(fay_url)
    first = event_of(Started, await anext(provider.run("long sim:pending=0 sim:duration=60", {})))
    await provider.stop(first.external_id, {})
    again = await provider.stop(first.external_id, {})
    assert again.terminal == "stopped"
    assert again.answer["code"] == "CONVERSATION_ALREADY_STOPPED"


async def test_unknown_request_is_request_not_found(fay_url):
    with pytest.raises(ProviderError) as exc:
        await fay(fay_url).status(str(uuid.uuid4()))
    assert exc.value.code == "REQUEST_NOT_FOUND"
    assert exc.value.http_status == 404
    assert not exc.value.retryable


async def test_a_bad_key_is_invalid_api_key_in_words(fay_url):
    with pytest.raises(ProviderError) as exc:
        await collect(fay(fay_url, key="not-a-sim-key"), "hello")
    assert exc.value.code == "INVALID_API_KEY"
    assert "The key is set on the Fay provider account" in exc.value.message


async def test_an_empty_prompt_is_a_validation_error(fay_url):
    with pytest.raises(ProviderError) as exc:
        await collect(fay(fay_url), "   ")
    assert exc.value.code == "VALIDATION_ERROR"
    assert "Invalid prompt format" in exc.value.message


async def test_output_before_completion_is_research_not_completed(fay_url):
    provider = fay(fay_url)
    first = event_of(Started, await anext(provider.run("long sim:pending=0 sim:duration=60", {})))
    with pytest.raises(ProviderError) as exc:
        await provider.output(first.external_id)
    assert exc.value.code == "RESEARCH_NOT_COMPLETED"


async def test_free_tier_keys_hit_the_hourly_create_limit(fay_url):
    key = f"sim-free-{uuid.uuid4().hex[:8]}"
    provider = fay(fay_url, key=key)
    for _ in range(10):
        await anext(provider.run("x sim:pending=60", {}))
    with pytest.raises(ProviderError) as exc:
        await provider.call("POST", "/conversations", json_body={"prompt": "eleventh"})
    assert exc.value.code == "RATE_LIMIT_EXCEEDED"
    assert exc.value.http_status == 429
    assert exc.value.retryable


async def test_it_raises_quota_exhausted_when_fay_refuses_a_create_with_429(fay_url, sim):
    prompt = f"{uuid.uuid4()} sim:pending=0 sim:duration=0.05 sim:fail=rate_limit"
    with pytest.raises(QuotaExhausted) as refused:
        await collect(fay(fay_url), prompt)
    # Fay's 429 is its quota speaking: the caller queues the launch rather than hammering,
    # waiting as the simulator's Retry-After says (real Fay sends none: see the quota tests).
    assert refused.value.endpoint == "create"
    assert refused.value.retry_after == 1.0
    creates = [
        r
        for r in sim.requests()
        if r["path"].endswith("/conversations")
        and isinstance(r["body"], dict)
        and r["body"].get("prompt") == prompt
    ]
    assert len(creates) == 1


async def test_transient_server_errors_are_retried(fay_url):
    prompt = f"{uuid.uuid4()} sim:pending=0 sim:duration=0.05 sim:fail=server_error"
    events = await collect(fay(fay_url), prompt)
    # Every refusal is reported (the watcher releases the start's claim while it waits), the
    # episode announced once, and each resend is preceded by the moment to hold it back.
    waits = [e for e in events if isinstance(e, Waiting)]
    assert [w.announce for w in waits] == [True, False, False]
    assert sum(isinstance(e, StartRetry) for e in events) == 3
    assert events[-1].status == "completed"


async def test_an_unreachable_provider_is_a_retryable_error_in_words():
    provider = fay("http://127.0.0.1:9/api/v1")
    with pytest.raises(ProviderError) as exc:
        await provider.status("abc")
    assert exc.value.code == "PROVIDER_UNREACHABLE"
    assert exc.value.retryable
    assert "base URL" in exc.value.message


@pytest.mark.parametrize(
    ("status", "body", "code", "retryable"),
    [
        (502, b"<html>Bad gateway</html>", "PROVIDER_BAD_RESPONSE", True),
        (200, b'{"unexpected": true}', "PROVIDER_BAD_RESPONSE", False),
        (
            500,
            b'{"status": false, "error": {"code": "INTERNAL_ERROR", "message": "x"}}',
            "INTERNAL_ERROR",
            True,
        ),
        (
            418,
            b'{"status": false, "error": {"code": "TEAPOT", "message": "short"}}',
            "TEAPOT",
            False,
        ),
    ],
)
async def test_it_maps_odd_answers_to_provider_errors(status, body, code, retryable):
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    provider = FayProvider(
        ProviderConfig("http://fay.invalid/api/v1", "k", allow_private=True),
        client=httpx.AsyncClient(transport=transport),
    )
    with pytest.raises(ProviderError) as exc:
        await provider.status("abc")
    assert exc.value.code == code
    assert exc.value.retryable is retryable
    assert exc.value.message


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("fay", "/sim/fay/api/v1"),
        ("dify", "/sim/dify/v1"),
        ("intelligencebox", "/sim/intelligencebox"),
        ("xpander", "/sim/xpander"),
    ],
)
async def test_check_proves_the_url_and_key_for_every_provider(sim, kind, path):
    from runs.providers import get_provider

    options = {"agent_id": "researcher"} if kind == "xpander" else {}
    good = get_provider(
        kind, ProviderConfig(sim.url + path, "sim-check-key", options, allow_private=True)
    )
    assert "answered" in await good.check()
    bad = get_provider(
        kind, ProviderConfig(sim.url + path, "wrong-key", options, allow_private=True)
    )
    with pytest.raises(ProviderError) as exc:
        await bad.check()
    assert "key" in exc.value.message
    await good.aclose()
    await bad.aclose()
