"""Malformed and hostile input gets a clear 4xx in the right format, never a 500: deep JSON,
lone surrogates and NUL characters (which PostgreSQL refuses), ids past a 64-bit column,
"²" (which `str.isdigit()` accepts), a reused launch form. Run on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from runs.models import ApiToken, Run

pytestmark = pytest.mark.django_db

DEEP = "[" * 1500 + "]" * 1500
DEEP_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
_node = DEEP_SCHEMA
for _ in range(300):
    child: dict[str, Any] = {"type": "object", "properties": {}}
    _node["properties"]["x"] = child
    _node = child


@pytest.fixture
def api(client: Client, bob: Any) -> Any:
    token = ApiToken.issue(bob)

    def call(method: str, path: str, body: Any = None) -> Any:
        extra: dict[str, Any] = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
        if body is not None:
            extra.update(
                data=body if isinstance(body, str) else json.dumps(body),
                content_type="application/json",
            )
        return getattr(client, method)(path, **extra)

    return call


def assert_json_error(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.content[:300]
    error = response.json()["error"]
    assert error["code"]
    assert error["message"]
    return error


@pytest.mark.parametrize(
    "body",
    [
        DEEP,
        '{"provider_account": 1, "prompt": "a \\ud800 lone surrogate"}',
        '{"provider_account": 1, "prompt": "a NUL \\u0000 inside"}',
    ],
    ids=["nested-1500-deep", "lone-surrogate", "nul"],
)
def test_the_api_refuses_json_it_cannot_keep_in_json(api, fay_account, body):
    body = body.replace('"provider_account": 1', f'"provider_account": {fay_account.pk}')
    assert_json_error(api("post", reverse("runs:api-runs"), body))
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"structured_output": True, "output_schema": DEEP_SCHEMA}, "nested more than"),
        ({"inputs": {"a": "NUL \x00"}}, "NUL"),
    ],
    ids=["schema-300-deep", "nul-in-options"],
)
def test_the_api_refuses_options_it_cannot_keep(api, fay_account, options, words):
    response = api(
        "post",
        reverse("runs:api-runs"),
        {"provider_account": fay_account.pk, "prompt": "q", "options": options},
    )
    assert words in assert_json_error(response)["message"]


@pytest.mark.parametrize(
    "query", ["team=%C2%B2", "team=99999999999999999999999", "provider=%00", "provider=nosuch"]
)
def test_list_filters_that_are_not_ids_or_providers_are_a_400(api, query):
    assert_json_error(api("get", f"{reverse('runs:api-runs')}?{query}"))


@pytest.mark.parametrize(
    "body",
    [
        {"ids": [10**30]},
        {"ids": [-1]},
        {"ids": ["1"]},
        {"filter": {"team": "abc"}},
        {"filter": {"team": 10**30}},
        {"filter": {"provider": "nosuch\x00"}},
    ],
)
def test_bulk_stop_refuses_ids_and_filters_it_cannot_use(api, body):
    assert_json_error(api("post", reverse("runs:api-stop-many"), body))


def test_a_stop_reason_with_a_nul_is_kept_clean_and_the_stop_goes_ahead(client, bob, launch):
    run = launch()
    client.force_login(bob)
    response = client.post(
        f"/runs/{run.pk}/stop", {"reason": "wrong\x00 prompt"}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    run.refresh_from_db()
    assert run.stop_requested_at is not None
    assert run.stop_reason == "wrong prompt"


@pytest.mark.parametrize("before", ["%C2%B2", "99999999999999999999999", "-5", "abc"])
def test_a_list_cursor_that_is_not_an_id_shows_the_newest_page(client, bob, launch, before):
    run = launch()
    client.force_login(bob)
    response = client.get(f"/teams/{run.team_id}/runs/?before={before}")
    assert response.status_code == 200
    assert f'id="run-row-{run.pk}"' in response.content.decode()


def test_the_launch_form_refuses_deep_or_unstorable_options_in_place(client, bob, sim, acme):
    from tests.conftest import sim_account

    dify = sim_account(acme, sim, "dify")
    client.force_login(bob)
    nested = "{" + '"a":{' * 40 + "}" * 41
    response = client.post(
        reverse("runs:launch", args=[acme.pk]),
        {"provider_account": dify.pk, "prompt": "q", "timeout_seconds": 60, "inputs": nested},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    assert "nested more than" in response.content.decode()
    response = client.post(
        reverse("runs:launch", args=[acme.pk]),
        {"provider_account": dify.pk, "prompt": "a \x00 b", "timeout_seconds": 60},
        HTTP_HX_REQUEST="true",
    )
    assert "Null characters are not allowed" in response.content.decode()
    assert not Run.objects.exists()


def test_a_launch_form_sent_again_with_another_prompt_is_refused_not_a_500(
    client, bob, fay_account
):
    client.force_login(bob)
    form = {
        "provider_account": fay_account.pk,
        "prompt": "first",
        "timeout_seconds": 60,
        "idempotency_key": "form-key-1",
    }
    url = reverse("runs:launch", args=[fay_account.team_id])
    assert client.post(url, form, HTTP_HX_REQUEST="true").status_code == 200
    again = client.post(url, {**form, "prompt": "second"}, HTTP_HX_REQUEST="true")
    assert again.status_code == 200
    assert "This form already launched run" in again.content.decode()
    assert Run.objects.count() == 1


@pytest.mark.django_db(transaction=True)
async def test_a_websocket_cursor_that_is_not_an_id_is_the_newest_page(bob, acme, launch):
    from asgiref.sync import sync_to_async

    from tests.sockets import websocket

    run = await sync_to_async(launch)()
    async with websocket(f"/ws/teams/{acme.pk}/?before=%C2%B2", bob) as (communicator, connected):
        assert connected
        assert f'id="run-row-{run.pk}"' in await communicator.receive_from(timeout=5)
