"""The JSON API: token auth, validation naming the field, team scoping, stop semantics."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from runs.models import ApiToken, ProviderAccount, Run, Status
from tests.conftest import start_at_provider
from tests.openapi_check import assert_documented


@pytest.fixture
def token(bob):
    return ApiToken.issue(bob)


@pytest.fixture
def api(client, token):
    def call(method, path, body=None, **extra):
        kwargs = {"HTTP_AUTHORIZATION": f"Bearer {token}", **extra}
        if body is not None:
            kwargs.update(
                data=json.dumps(body) if not isinstance(body, str) else body,
                content_type="application/json",
            )
        response = getattr(client, method)(path, **kwargs)
        # Every answer in this file is also a check of the published API description.
        assert_documented(method, path, response)
        return response

    return call


def test_it_refuses_requests_without_a_token(client, bob):
    response = client.get(reverse("runs:api-runs"))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHENTICATED"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_it_refuses_a_wrong_token(client, bob):
    response = client.get(reverse("runs:api-runs"), HTTP_AUTHORIZATION="Bearer rb_nope")
    assert response.status_code == 401


def test_issue_token_prints_a_working_token_alone_on_the_last_line(client, bob):
    out, err = io.StringIO(), io.StringIO()
    call_command("issue_token", "bob", stdout=out, stderr=err)
    token = out.getvalue().strip().splitlines()[-1]
    assert token.startswith("rb_")
    response = client.get(reverse("runs:api-runs"), HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200
    assert ApiToken.objects.get().digest != token  # only the digest is stored


def test_issue_token_for_an_unknown_user_is_an_error(db):
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        call_command("issue_token", "nobody")


def test_it_lists_provider_accounts_with_masked_keys(api, fay_account, globex_account):
    response = api("get", reverse("runs:api-provider-accounts"))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [a["id"] for a in results] == [fay_account.pk]
    assert results[0]["api_key"] == "••••-key"


def test_it_creates_a_run(api, fay_account):
    response = api(
        "post",
        reverse("runs:api-runs"),
        {
            "provider_account": fay_account.pk,
            "prompt": "AI editors",
            "options": {"structured_output": True, "output_schema": {"type": "object"}},
            "timeout_seconds": 90,
            "no_progress_seconds": 240,
        },
    )
    assert response.status_code == 201
    body = response.json()
    run = Run.objects.get()
    assert run.no_progress_seconds == body["no_progress_seconds"] == 240
    assert body["id"] == run.pk
    assert body["status"] == "pending"
    assert body["provider"] == "fay"
    assert run.options == {"structured_output": True, "output_schema": {"type": "object"}}
    assert run.events.get().channel == "api"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x"}, "provider_account"),
        ({"provider_account": "1", "prompt": "x"}, "provider_account"),
        ({"provider_account": None, "prompt": ""}, "provider_account"),
        ({"prompt": ""}, "provider_account"),
        ({"prompt": "", "_account": True}, "prompt"),
        ({"prompt": "x", "timeout_seconds": 0, "_account": True}, "timeout_seconds"),
        ({"prompt": "x", "no_progress_seconds": -1, "_account": True}, "no_progress_seconds"),
        ({"prompt": "x", "no_progress_seconds": "soon", "_account": True}, "no_progress_seconds"),
        # Django's form would read these as "not given" and use the default.
        ({"prompt": "x", "no_progress_seconds": {}, "_account": True}, "no_progress_seconds"),
        ({"prompt": "x", "timeout_seconds": [], "_account": True}, "timeout_seconds"),
        ({"prompt": "x", "timeout_seconds": None, "_account": True}, "timeout_seconds"),
        ({"prompt": "x", "timeout_seconds": "90", "_account": True}, "timeout_seconds"),
        ({"prompt": "x", "timeout_seconds": True, "_account": True}, "timeout_seconds"),
        ({"prompt": "x", "timeout_seconds": 90.5, "_account": True}, "timeout_seconds"),
        ({"prompt": "x", "options": {"structured_output": True}, "_account": True}, "options"),
        ({"prompt": "x", "options": {"temperature": 1}, "_account": True}, "options"),
        ({"prompt": "x", "options": [], "_account": True}, "options"),
    ],
)
def test_a_bad_body_is_a_400_naming_the_field(api, fay_account, body, field):
    if body.pop("_account", False):
        body["provider_account"] = fay_account.pk
    response = api("post", reverse("runs:api-runs"), body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["field"] == field
    assert error["message"]
    assert not Run.objects.exists()


def test_malformed_json_is_a_400(api, fay_account):
    response = api("post", reverse("runs:api-runs"), "{not json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_JSON"


def test_another_teams_account_cannot_be_used(api, globex_account):
    response = api(
        "post", reverse("runs:api-runs"), {"provider_account": globex_account.pk, "prompt": "x"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "provider_account"
    assert not Run.objects.exists()


def test_it_lists_runs_with_filters_and_a_cursor(api, launch, mallory, globex_account):
    runs = [launch(f"q{i}") for i in range(3)]
    runs[0].mark_completed(proof="status_read", output="x")
    launch("theirs", user=mallory, account=globex_account)
    first = api("get", reverse("runs:api-runs") + "?limit=2").json()
    assert [r["id"] for r in first["results"]] == [runs[2].pk, runs[1].pk]
    second = api("get", reverse("runs:api-runs") + f"?limit=2&cursor={first['next_cursor']}")
    assert [r["id"] for r in second.json()["results"]] == [runs[0].pk]
    assert second.json()["next_cursor"] is None
    done = api("get", reverse("runs:api-runs") + "?status=completed").json()["results"]
    assert [r["id"] for r in done] == [runs[0].pk]
    assert api("get", reverse("runs:api-runs") + "?status=nope").status_code == 400
    assert api("get", reverse("runs:api-runs") + "?cursor=%%%").status_code == 400


def test_another_teams_run_is_a_404(api, mallory, globex_account, launch):
    theirs = launch("theirs", user=mallory, account=globex_account)
    assert api("get", reverse("runs:api-run", args=[theirs.pk])).status_code == 404
    response = api("post", reverse("runs:api-stop", args=[theirs.pk]), {})
    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.status == Status.PENDING


def test_get_is_refused_on_stop(api, launch):
    response = api("get", reverse("runs:api-stop", args=[launch().pk]))
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.django_db(transaction=True)
def test_stop_stops_at_the_provider_and_a_second_stop_makes_no_call(api, launch, sim):
    run = start_at_provider(launch("long sim:pending=0 sim:duration=60"))
    first = api("post", reverse("runs:api-stop", args=[run.pk]), {"reason": "have what I need"})
    assert first.status_code == 200
    body = first.json()
    assert body["status"] == "stopped"
    assert body["stop"]["reason"] == "have what I need"
    assert body["stop"]["channel"] == "api"
    assert body["stop"]["confirmation"] == "Fay's stop answer"
    assert body["stop"]["provider_answer"]["answer"]["status"] == "STOPPED"
    assert isinstance(body["stop"]["latency_ms"], int)
    second = api("post", reverse("runs:api-stop", args=[run.pk]), {})
    assert second.status_code == 200
    assert second.json()["status"] == "stopped"
    assert len(sim.stop_calls(run.external_id)) == 1


@pytest.mark.parametrize("finish", ["completed", "failed"])
def test_stopping_a_finished_run_is_a_409(api, launch, finish):
    run = launch()
    run.mark_completed(
        proof="status_read", output="x"
    ) if finish == "completed" else run.mark_failed(proof="status_read", error="x")
    response = api("post", reverse("runs:api-stop", args=[run.pk]), {})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "RUN_ALREADY_FINISHED"
    assert response.json()["error"]["run"]["status"] == finish


def test_a_viewer_token_cannot_stop(client, carol, launch):
    run = launch()
    token = ApiToken.issue(carol)
    response = client.post(
        reverse("runs:api-stop", args=[run.pk]), HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == Status.PENDING


def test_options_are_checked_against_the_accounts_provider(api, acme, fay_account):
    from runs.models import ProviderAccount

    dify = ProviderAccount.objects.create(
        team=acme, kind="dify", name="Dify", base_url="http://127.0.0.1:9/v1", api_key="sim-x"
    )
    ok = api(
        "post",
        reverse("runs:api-runs"),
        {"provider_account": dify.pk, "prompt": "x", "options": {"inputs": {"a": 1}}},
    )
    assert ok.status_code == 201
    assert ok.json()["options"] == {"user": "bob", "inputs": {"a": 1}}
    wrong = api(
        "post",
        reverse("runs:api-runs"),
        {"provider_account": fay_account.pk, "prompt": "x", "options": {"inputs": {}}},
    )
    assert wrong.status_code == 400
    assert "unknown: inputs" in wrong.json()["error"]["message"]


def test_a_retried_start_with_the_same_idempotency_key_returns_the_first_run(api, fay_account):
    body = {"provider_account": fay_account.pk, "prompt": "once only"}
    first = api("post", reverse("runs:api-runs"), body, HTTP_IDEMPOTENCY_KEY="k-1")
    again = api("post", reverse("runs:api-runs"), body, HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again["Idempotent-Replayed"] == "true"
    assert Run.objects.count() == 1


def test_the_same_idempotency_key_with_a_different_body_is_a_422(api, fay_account):
    api(
        "post",
        reverse("runs:api-runs"),
        {"provider_account": fay_account.pk, "prompt": "first"},
        HTTP_IDEMPOTENCY_KEY="k-2",
    )
    response = api(
        "post",
        reverse("runs:api-runs"),
        {"provider_account": fay_account.pk, "prompt": "second"},
        HTTP_IDEMPOTENCY_KEY="k-2",
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert Run.objects.count() == 1


def test_without_a_key_each_start_is_a_new_run(api, fay_account):
    body = {"provider_account": fay_account.pk, "prompt": "twice"}
    api("post", reverse("runs:api-runs"), body)
    api("post", reverse("runs:api-runs"), body)
    assert Run.objects.count() == 2


def test_it_records_when_a_token_was_last_used_to_the_minute(api, token):
    import datetime as dt

    from django.utils import timezone

    stored = ApiToken.objects.get(digest=ApiToken.digest_of(token))
    assert stored.last_used_at is None
    assert api("get", "/api/runs").status_code == 200
    stored.refresh_from_db()
    first = stored.last_used_at
    assert first is not None
    assert api("get", "/api/runs").status_code == 200
    stored.refresh_from_db()
    assert stored.last_used_at == first  # no write per call within the minute

    ApiToken.objects.filter(pk=stored.pk).update(last_used_at=first - dt.timedelta(minutes=2))
    assert api("get", "/api/runs").status_code == 200
    stored.refresh_from_db()
    assert stored.last_used_at > first - dt.timedelta(seconds=1)
    assert stored.last_used_at <= timezone.now()


def test_an_xpander_agent_id_that_walks_the_url_path_is_refused(api, acme):
    """A security finding: `../../../../internal/admin?x=` sent the team's key elsewhere."""
    account = ProviderAccount.objects.create(
        team=acme,
        kind="xpander",
        name="xpander",
        base_url="http://127.0.0.1:9/sim/xpander",
        api_key="sim-acme-xpander",
    )
    for agent in ("../../../../internal/admin?x=", "..", "a/b", "agent one"):
        response = api(
            "post",
            reverse("runs:api-runs"),
            {"provider_account": account.pk, "prompt": "hi", "options": {"agent_id": agent}},
        )
        assert response.status_code == 400, agent
        assert response.json()["error"]["field"] == "options"
        assert "agent id" in response.json()["error"]["message"]
    assert not Run.objects.exists()


def test_a_viewer_reads_account_names_only(client, carol, fay_account):
    token = ApiToken.issue(carol)
    response = client.get(
        reverse("runs:api-provider-accounts"), HTTP_AUTHORIZATION=f"Bearer {token}"
    )
    (account,) = response.json()["results"]
    assert account == {
        "id": fay_account.pk,
        "team": fay_account.team_id,
        "kind": "fay",
        "name": fay_account.name,
    }
