"""/api/openapi.json is true: the API's answers match it, and schemathesis, fuzzing every
operation against a live server, finds no 500, no undocumented status or shape, no bad input
accepted and no endpoint that ignores the token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from django.urls import reverse

from runs.models import ApiToken, ProviderAccount, Run
from tests.livekit import serve
from tests.openapi_check import assert_documented


@pytest.fixture
def api(client, bob):
    token = ApiToken.issue(bob)

    def call(method, path, body=None):
        kwargs = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
        if body is not None:
            kwargs.update(data=json.dumps(body), content_type="application/json")
        response = getattr(client, method)(path, **kwargs)
        assert_documented(method, path, response)
        return response

    return call


def test_the_document_is_served_to_anyone_and_loads_in_schemathesis(client, db):
    import schemathesis
    from schemathesis.core.result import Ok

    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    schema = schemathesis.openapi.from_dict(response.json())
    operations = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.add((result.ok().method.upper(), result.ok().path))
    assert ("POST", "/api/runs/{id}/stop") in operations
    assert len(operations) == 6


def test_a_post_to_the_document_is_a_json_405(client, db):
    response = client.post("/api/openapi.json")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert response["Allow"] == "GET, HEAD"


def test_an_api_path_that_matches_no_endpoint_is_a_json_404(api):
    response = api("get", "/api/runs/abc")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("limit", ["0", "201", "-1", "lots", "²"])
def test_a_limit_outside_1_to_200_is_refused_not_clamped(api, limit):
    response = api("get", f"{reverse('runs:api-runs')}?limit={limit}")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "limit"


def test_empty_filters_mean_any(api, launch):
    run = launch()
    response = api("get", f"{reverse('runs:api-runs')}?status=&team=&provider=")
    assert [r["id"] for r in response.json()["results"]] == [run.pk]


@pytest.mark.parametrize(
    "chosen", [{"mine": "yes"}, {"provider": {}}, {"provider": "openai"}, {"team": "x"}]
)
def test_a_stop_filter_of_the_wrong_type_stops_nothing(api, launch, chosen):
    run = launch()
    response = api("post", reverse("runs:api-stop-many"), {"filter": chosen})
    assert response.status_code == 400
    run.refresh_from_db()
    assert run.stop_requested_at is None


def test_stop_many_outcomes_match_the_document(api, launch, mallory, globex_account):
    mine = launch()
    theirs = launch(user=mallory, account=globex_account)
    response = api(
        "post", reverse("runs:api-stop-many"), {"ids": [mine.pk, theirs.pk], "reason": "r"}
    )
    outcomes = {r["id"]: r["outcome"] for r in response.json()["results"]}
    assert outcomes == {mine.pk: "stopping", theirs.pk: "not_found"}
    another = launch()
    by_filter = api("post", reverse("runs:api-stop-many"), {"filter": {"mine": True}})
    # The stopping run is not picked again; mallory's is not bob's to pick.
    assert [r["id"] for r in by_filter.json()["results"]] == [another.pk]


def test_a_viewers_refusals_match_the_document(client, carol, fay_account, launch):
    token = ApiToken.issue(carol)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    run = launch()
    for method, path, body in [
        ("post", reverse("runs:api-runs"), {"provider_account": fay_account.pk, "prompt": "x"}),
        ("post", reverse("runs:api-stop", args=[run.pk]), {}),
        ("get", reverse("runs:api-provider-accounts"), None),
    ]:
        kwargs = dict(headers)
        if body is not None:
            kwargs.update(data=json.dumps(body), content_type="application/json")
        assert_documented(method, path, getattr(client, method)(path, **kwargs))
    assert Run.objects.count() == 1


SCHEMATHESIS_SEED = os.environ.get("RUNBRAKE_FUZZ_SEED", "20261201")


@pytest.mark.django_db(transaction=True)
def test_schemathesis_finds_nothing_against_a_live_server(acme, bob, mallory, globex):
    # Rate limits high enough for a fuzzer; everything else as deployed, watcher included, so
    # launched runs really reach the simulated Fay and stops really go out.
    server = serve(env={"RUNBRAKE_RATE_LAUNCH": "100000/60", "RUNBRAKE_RATE_STOP": "100000/60"})
    try:
        ours = ProviderAccount.objects.create(
            team=acme, kind="fay", name="Fay", base_url=server.url + "/sim/fay",
            api_key="sim-acme-fay", options={"poll_interval": 0.2},
        )  # fmt: skip
        theirs = ProviderAccount.objects.create(
            team=globex, kind="fay", name="Fay", base_url=server.url + "/sim/fay",
            api_key="sim-globex-fay",
        )  # fmt: skip
        Run.objects.launch(
            account=theirs, user=mallory, prompt="Globex's", options={}, timeout_seconds=600
        )
        schema = httpx.get(server.url + "/api/openapi.json").json()
        # Without a hint nearly every generated launch names an account that does not exist;
        # with it, the fuzzer gets past that check to the prompt, options and limits.
        launch = schema["components"]["schemas"]["Launch"]["properties"]
        launch["provider_account"] = {"type": "integer", "enum": [ours.pk]}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as document:
            json.dump(schema, document)
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("st")), "run", document.name,
                "--url", server.url,
                "--header", f"Authorization: Bearer {ApiToken.issue(bob)}",
                "--checks", "all",
                # Schema-valid is not always acceptable here, by design: run and account ids
                # that exist in no team of yours, cursors we did not issue, NUL characters and
                # numbers past 64 bits anywhere in a body are refused with a 4xx.
                "--exclude-checks", "positive_data_acceptance",
                "--max-examples", "40",
                "--seed", SCHEMATHESIS_SEED,
                "--workers", "2",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
        Path(document.name).unlink()
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        # The other team's run was never touched through bob's token.
        assert not Run.objects.filter(team=globex, stop_requested_at__isnull=False).exists()
        assert server.proc.poll() is None
        assert "Traceback" not in server.output()
    finally:
        server.close()
