"""The stop path keeps its promise in one thread hop: the caller is authenticated and allowed,
the attempt counted, and the intent committed, all before the provider hears of the stop."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connection
from django.urls import reverse

from runs.models import ApiToken, Run, Status
from runs.providers.fay import FayProvider
from tests.conftest import start_at_provider

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stop_call(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Notes, when Fay's stop call comes, how many thread hops the request had made (pushes
    render in tasks of their own, not counted) and what another database connection saw of
    the run then: only what was committed."""
    hops: dict[asyncio.Task[Any] | None, int] = {}
    seen: dict[str, Any] = {}
    hop = SyncToAsync.__call__

    async def counted(self: SyncToAsync[Any, Any], *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        hops[task] = hops.get(task, 0) + 1
        return await hop(self, *args, **kwargs)

    stop = FayProvider.stop

    async def noted(self: FayProvider, external_id: str, *args: Any, **kwargs: Any) -> Any:
        seen["hops_before_call"] = hops.get(asyncio.current_task(), 0)
        seen["status_at_call"] = await sync_to_async(committed_status, thread_sensitive=False)(
            external_id
        )
        return await stop(self, external_id, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted)
    monkeypatch.setattr(FayProvider, "stop", noted)
    return seen


def committed_status(external_id: str) -> str:
    try:
        return Run.objects.get(external_id=external_id).status
    finally:
        connection.close()  # this thread's own connection, not the request's


def test_it_makes_one_hop_before_the_provider_call_on_the_api(client, bob, launch, stop_call):
    run = start_at_provider(launch("x sim:pending=0 sim:duration=60"))
    response = client.post(
        reverse("runs:api-stop", args=[run.pk]),
        data=json.dumps({"reason": "enough"}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(bob)}",
    )
    assert response.status_code == 200
    assert response.json()["status"] == "stopped"
    assert stop_call["hops_before_call"] == 1
    assert stop_call["status_at_call"] == Status.STOPPING


def test_it_makes_one_hop_before_the_provider_call_on_the_cancel_button(
    client, bob, launch, stop_call
):
    run = start_at_provider(launch("x sim:pending=0 sim:duration=60"))
    client.force_login(bob)
    response = client.post(
        reverse("runs:stop", args=[run.pk]), {"reason": "enough"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    assert "stopped" in json.loads(response["HX-Trigger"])["toast"]["message"]
    assert stop_call["hops_before_call"] == 1
    assert stop_call["status_at_call"] == Status.STOPPING
    run.refresh_from_db()
    assert (run.status, run.stop_reason, run.stop_requested_by) == (Status.STOPPED, "enough", bob)


def test_an_api_stop_never_runs_as_the_session_user(client, bob, launch):
    """The API is exempt from CSRF checks: a logged-in browser's cookie must not stop runs."""
    run = launch()
    client.force_login(bob)
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer rb_nope"}):
        response = client.post(reverse("runs:api-stop", args=[run.pk]), **headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "UNAUTHENTICATED"
    run.refresh_from_db()
    assert run.status == Status.PENDING


def test_a_wrong_method_is_a_401_without_a_valid_token_and_a_405_with_one(client, bob, launch):
    run = launch()
    url = reverse("runs:api-stop", args=[run.pk])
    assert client.get(url, HTTP_AUTHORIZATION="Bearer rb_nope").status_code == 401
    valid = client.get(url, HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(bob)}")
    assert valid.status_code == 405
    assert valid["Allow"] == "POST"


def test_the_body_is_judged_only_after_access_and_the_rate_limit(
    client, bob, mallory, launch, settings
):
    settings.RUNBRAKE_RATE_LIMITS = {**settings.RUNBRAKE_RATE_LIMITS, "stop": (1, 60)}
    runs = [launch(), launch()]
    bad = {"data": "{not json", "content_type": "application/json"}

    def stop(run: Run, token: str) -> Any:
        url = reverse("runs:api-stop", args=[run.pk])
        return client.post(url, HTTP_AUTHORIZATION=f"Bearer {token}", **bad)

    assert stop(runs[0], ApiToken.issue(mallory)).status_code == 404
    token = ApiToken.issue(bob)
    assert stop(runs[0], token).json()["error"]["code"] == "INVALID_JSON"
    # The refused body was counted: the limit answers before the body is read.
    assert stop(runs[1], token).json()["error"]["code"] == "RATE_LIMITED"
    assert Run.objects.filter(status=Status.PENDING).count() == 2


def test_a_logged_out_cancel_goes_to_the_login_page_and_stops_nothing(client, launch):
    run = launch()
    response = client.post(reverse("runs:stop", args=[run.pk]))
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next=/runs/{run.pk}/stop"
    run.refresh_from_db()
    assert run.status == Status.PENDING
