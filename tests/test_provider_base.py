"""What every provider client shares (runs/providers/base.py): provider headers and ids are
hostile input."""

from __future__ import annotations

import httpx
import pytest
from asgiref.sync import sync_to_async

from runs.models import Channel, ProviderAccount, Run, RunEvent, Status
from runs.providers.base import (
    MAX_RETRY_AFTER,
    ProviderConfig,
    Started,
    retry_after_seconds,
    retry_in,
)
from runs.providers.errors import ProviderError
from runs.providers.fay import FayProvider
from tests.wire import Answer, event_of, fixture


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("-5", 0.0),
        ("inf", None),
        ("-inf", None),
        ("nan", None),
        ("1e400", None),
        ("99999999", MAX_RETRY_AFTER),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: now
        ("soon", None),
        ("", None),
    ],
)
def test_a_retry_after_header_is_bounded_or_ignored(header, seconds):
    response = httpx.Response(429, headers={"Retry-After": header})
    assert retry_after_seconds(response) == seconds


def test_an_id_that_leaves_its_path_segment_is_refused_and_others_are_quoted():
    provider = FayProvider(ProviderConfig(base_url="http://127.0.0.1:9", api_key="k"))
    for bad in ("../admin", "a/b", "..", "", "x\x00y", "tab\there"):
        with pytest.raises(ProviderError) as refused:
            provider.segment(bad)
        assert refused.value.code == "VALIDATION_ERROR"
    assert provider.segment("run 1?x=%") == "run%201%3Fx%3D%25"


@pytest.mark.django_db(transaction=True)
async def test_a_stop_answered_with_retry_after_inf_is_queued_not_a_crash(replay, acme, bob):
    """A hostile provider's `Retry-After: inf` once broke the stop path (an OverflowError, the
    failure not recorded, the watcher crashing every 10 s)."""
    replay.on(
        "POST",
        "/conversation/req-1/stop",
        Answer(
            status=429,
            headers={"content-type": "application/json", "retry-after": "inf"},
            chunks=[fixture("fay/rate_limited.json")],
        ),
    )
    account = await ProviderAccount.objects.acreate(
        team=acme, kind="fay", name="Fay", base_url=replay.url, api_key="k"
    )
    run = await sync_to_async(Run.objects.launch)(
        account=account, user=bob, prompt="q", options={}, timeout_seconds=600
    )
    await sync_to_async(run.record_external_id)("req-1")
    outcome = await run.astop(actor=bob, channel=Channel.BUTTON)
    assert outcome.requested
    await run.arefresh_from_db()
    assert run.status == Status.STOPPING
    assert run.quota_endpoint == "stop"
    # No Retry-After worth reading: Runbrake's own first wait, a minute.
    assert run.quota_until is not None
    assert run.stop_requested_at is not None
    wait = (run.quota_until - run.stop_requested_at).total_seconds()
    assert 55 < wait < 65
    assert await run.events.filter(kind=RunEvent.Kind.STOP_QUEUED).aexists()
    assert len(replay.requests_to("POST", "/conversation/req-1/stop")) == 1


async def test_an_open_stream_that_goes_silent_is_followed_not_failed(replay, monkeypatch):
    """An xpander router that has answered while its async sub-task works quietly sends
    nothing for a while: that is not a failure; the run is followed through its status."""
    from runs.providers.base import StreamEnded
    from runs.providers.dify import DifyProvider

    first = fixture("dify/chat_stream.sse").split(b"\n\n")[0] + b"\n\n"
    replay.on("POST", "/chat-messages", Answer.sse(first, hold=True))
    monkeypatch.setattr(DifyProvider, "stream_read_timeout", 0.3)
    provider = DifyProvider(ProviderConfig(base_url=replay.url, api_key="k", allow_private=True))
    events = [event async for event in provider.run("q", {})]
    await provider.aclose()
    assert isinstance(events[-1], StreamEnded)
    assert event_of(
        Started, events[0]
    ).external_id  # the run was started and named before the silence


async def test_a_start_that_is_never_answered_is_a_timeout_in_words(replay, monkeypatch):
    from runs.providers.dify import DifyProvider

    replay.on("POST", "/chat-messages", Answer(chunks=[], hold=True, status=200))
    provider = DifyProvider(
        ProviderConfig(base_url=replay.url, api_key="k", allow_private=True, timeout=0.3)
    )
    monkeypatch.setattr(DifyProvider, "stream_read_timeout", 0.3)
    with pytest.raises(ProviderError) as refused:
        [event async for event in provider.run("q", {})]
    await provider.aclose()
    assert refused.value.code == "PROVIDER_TIMEOUT"


@pytest.mark.parametrize(
    ("error", "start_again"),
    [
        (ProviderError("RATE_LIMITED", "slow down", retryable=True, http_status=429), True),
        (ProviderError("PROVIDER_ERROR", "oops", retryable=True, http_status=503), True),
        (ProviderError("PROVIDER_UNREACHABLE", "no connection", retryable=True), True),
        # The request may have reached the provider and started a run: never a second start.
        (ProviderError("PROVIDER_TIMEOUT", "too slow", retryable=True), False),
        (ProviderError("PROVIDER_TRANSPORT_ERROR", "connection lost", retryable=True), False),
        (ProviderError("UNAUTHORIZED", "bad key", http_status=401), False),
    ],
)
def test_a_start_call_is_sent_again_only_when_its_failure_proves_nothing_started(
    error: ProviderError, start_again: bool
) -> None:
    assert (retry_in(error, 1) is not None) is start_again
    # A read may be repeated after any failure worth retrying.
    assert (retry_in(error, 1, idempotent=True) is not None) is error.retryable
