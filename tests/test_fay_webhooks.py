"""Fay webhooks (fay-docs `webhooks`): each account's URL receives signed Status, Output and
Error events; the signature is checked on the raw body in constant time, each event id is
applied once, a bad signature is refused with 401 and logged, and with webhooks on a run
completes from its Output event with no status poll in between."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from runs.models import ProviderAccount, Run, RunEvent, Status, WebhookEvent
from runs.providers.base import Finished, Running
from runs.providers.fay import parse_webhook, signature_of, signature_ok
from tests.conftest import Server, database_url
from tests.wire import fixture

SECRET = "example-webhook-secret"
# The documented example bodies, restated (tests/fixtures/fay/README.md), and their signatures.
SIGNED = {
    "webhook_status.json": "93a302cc64cbc5134ad003532bdbee59ced1ed69da37ab1bd002ba19657e1faf",
    "webhook_output.json": "72ded3636f101d145b3df6b891b10eeaaf59e8f65af922a7f221684b472acd72",
    "webhook_error.json": "213f92bf3b513d6ce21ed324d0986d6790b2ba1c0b9c5442fe83db46864c8203",
}
REQUEST_ID = "3f6c2a9e-1b7d-4c55-9e8a-2d4f6b8c0a11"


# --- The signature, against the documented scheme ---------------------------------------------


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_it_signs_the_raw_body_as_fay_documents(name):
    body = fixture(f"fay/{name}")
    assert signature_of(body, SECRET) == f"sha256={SIGNED[name]}"
    assert signature_ok(body, f"sha256={SIGNED[name]}", SECRET)


def test_it_refuses_a_signature_over_reserialised_json():
    """The docs' Express example signs JSON.stringify(req.body): other bytes, another HMAC."""
    body = fixture("fay/webhook_status.json")
    reserialised = json.dumps(json.loads(body)).encode()
    assert not signature_ok(body, signature_of(reserialised, SECRET), SECRET)
    assert not signature_ok(body, "", SECRET)
    assert not signature_ok(body, f"sha256={SIGNED['webhook_status.json']}", "another-secret")


def test_it_reads_the_documented_events():
    status = parse_webhook(fixture("fay/webhook_status.json"))
    assert (status.event_id, status.kind, status.external_id) == (
        "evt_1000000001",
        "Status",
        REQUEST_ID,
    )
    assert isinstance(status.event, Running)
    assert status.event.provider_status == "PROCESSING"
    output = parse_webhook(fixture("fay/webhook_output.json")).event
    assert isinstance(output, Finished)
    assert output.status == "completed"
    assert (output.output or "").startswith("## Solid-state batteries")
    assert output.via == "webhook"
    error = parse_webhook(fixture("fay/webhook_error.json")).event
    assert isinstance(error, Finished)
    assert error.status == "failed"
    assert "Research could not be completed." in (error.error or "")


# --- The endpoint -------------------------------------------------------------------------------


@pytest.fixture
def hooked(acme: Any, bob: Any, fay_url: str) -> tuple[ProviderAccount, Run]:
    account = ProviderAccount.objects.create(
        team=acme,
        kind="fay",
        name="Fay with webhooks",
        base_url=fay_url,
        api_key="sim-acme-webhooks",
        webhook_secret=SECRET,
    )
    run = Run.objects.launch(
        account=account, user=bob, prompt="batteries", options={}, timeout_seconds=600
    )
    run.record_external_id(REQUEST_ID)
    return account, run


def deliver(account: ProviderAccount, name: str, signature: str | None = None) -> Any:
    body = fixture(f"fay/{name}")
    return Client().post(
        reverse("runs:fay-webhook", args=[account.webhook_token]),
        data=body,
        content_type="application/json",
        headers={"X-Fay-Signature": signature or signature_of(body, SECRET)},
    )


def test_it_completes_a_run_from_its_output_event(hooked):
    account, run = hooked
    assert deliver(account, "webhook_status.json").status_code == 200
    run.refresh_from_db()
    assert run.status == Status.RUNNING
    response = deliver(account, "webhook_output.json")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "applied": True}
    run.refresh_from_db()
    assert run.status == Status.COMPLETED
    assert run.output.startswith("## Solid-state batteries")
    assert run.proof == "webhook"


def test_a_replayed_event_changes_nothing(hooked):
    account, run = hooked
    deliver(account, "webhook_output.json")
    run.refresh_from_db()
    version = run.version
    replay = deliver(account, "webhook_output.json")
    assert replay.status_code == 200
    assert replay.json()["duplicate"] is True
    run.refresh_from_db()
    assert run.version == version
    assert run.events.filter(kind=RunEvent.Kind.COMPLETED).count() == 1
    assert WebhookEvent.objects.filter(account=account).count() == 1


def test_a_bad_signature_is_refused_with_401_and_logged(hooked, caplog):
    account, run = hooked
    caplog.set_level(logging.WARNING, logger="runs.web.webhooks")
    forged = "sha256=" + "0" * 64
    response = deliver(account, "webhook_output.json", signature=forged)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "BAD_SIGNATURE"
    assert "refused" in caplog.text
    assert SECRET not in caplog.text
    run.refresh_from_db()
    assert run.status == Status.PENDING
    assert not WebhookEvent.objects.exists()


def test_an_error_event_fails_the_run_in_fays_words(hooked):
    account, run = hooked
    deliver(account, "webhook_error.json")
    run.refresh_from_db()
    assert run.status == Status.FAILED
    assert "Research could not be completed." in run.error
    assert run.proof == "webhook"


def test_an_account_without_a_secret_or_an_unknown_token_receives_nothing(hooked):
    account, _run = hooked
    account.webhook_secret = ""
    account.save()
    assert deliver(account, "webhook_output.json").status_code == 404
    unknown = Client().post("/hooks/fay/not-a-token", data=b"{}", content_type="application/json")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "NOT_FOUND"


def test_malformed_deliveries_are_a_clear_400(hooked):
    account, _run = hooked
    for body in (b"not json", b"[]", b'{"type":"Output","data":{}}', b'{"id":"e1","data":[]}'):
        response = Client().post(
            reverse("runs:fay-webhook", args=[account.webhook_token]),
            data=body,
            content_type="application/json",
            headers={"X-Fay-Signature": signature_of(body, SECRET)},
        )
        assert response.status_code == 400, body
        assert response.json()["error"]["message"]


def test_the_webhook_endpoint_takes_only_post(hooked):
    account, _run = hooked
    response = Client().get(reverse("runs:fay-webhook", args=[account.webhook_token]))
    assert response.status_code == 405


# --- End to end: the simulator delivers to a real server ------------------------------------


@pytest.fixture
def live(transactional_db: Any) -> Iterator[Server]:
    from django.db import connection

    server = Server(
        watcher=True,
        env={
            "DATABASE_URL": database_url(connection.vendor, connection.settings_dict),
            "RUNBRAKE_WATCHER_TICK": "0.2",
        },
    )
    yield server
    server.close()


def register(server: Server, key: str, url: str) -> str:
    request = urllib.request.Request(
        f"{server.url}/sim/fay/dashboard/webhooks",
        data=json.dumps({"url": url}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request) as answer:
        return json.load(answer)["data"]["secret"]


def webhook_account(acme: Any, server: Server) -> ProviderAccount:
    key = f"sim-hooks-{uuid.uuid4().hex[:8]}"
    account = ProviderAccount.objects.create(
        team=acme,
        kind="fay",
        name=f"Fay {key}",
        base_url=f"{server.url}/sim/fay/api/v1",
        api_key=key,
    )
    hook_url = server.url + reverse("runs:fay-webhook", args=[account.webhook_token])
    account.webhook_secret = register(server, key, hook_url)
    account.save()
    return account


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status_reads(server: Server, request_id: str) -> list[dict[str, Any]]:
    return [r for r in server.requests("fay") if r["path"].endswith(f"/{request_id}/status")]


def deliveries(server: Server, request_id: str) -> list[dict[str, Any]]:
    return [r for r in server.requests("fay-webhook") if r["body"]["request_id"] == request_id]


def fresh(run: Run) -> Run:
    run.refresh_from_db()
    return run


def test_a_run_completes_from_the_output_webhook_with_no_status_poll(live, acme, bob):
    account = webhook_account(acme, live)
    run = Run.objects.launch(
        account=account,
        user=bob,
        prompt=f"{uuid.uuid4()} sim:pending=0.5 sim:duration=1.5",
        options={},
        timeout_seconds=600,
    )
    wait_for(lambda: fresh(run).status == Status.COMPLETED, "the Output webhook")
    assert run.proof == "webhook"
    assert run.output.startswith("### Research:")
    assert status_reads(live, run.external_id) == []
    kinds = {d["body"]["type"] for d in deliveries(live, run.external_id)}
    assert kinds == {"Status", "Output"}


def test_duplicate_deliveries_are_applied_once(live, acme, bob):
    account = webhook_account(acme, live)
    run = Run.objects.launch(
        account=account,
        user=bob,
        prompt=f"{uuid.uuid4()} sim:pending=0.2 sim:duration=0.8 sim:webhook=duplicate",
        options={},
        timeout_seconds=600,
    )
    wait_for(lambda: fresh(run).status == Status.COMPLETED, "the Output webhook")
    wait_for(lambda: len(deliveries(live, run.external_id)) >= 6, "every copy delivered")
    assert run.events.filter(kind=RunEvent.Kind.COMPLETED).count() == 1
    assert run.events.filter(kind=RunEvent.Kind.RUNNING).count() == 1


def test_deliveries_with_a_bad_signature_are_refused_and_change_nothing(live, acme, bob):
    account = webhook_account(acme, live)
    run = Run.objects.launch(
        account=account,
        user=bob,
        prompt=f"{uuid.uuid4()} sim:pending=0.2 sim:duration=0.5 sim:webhook=bad_signature",
        options={},
        timeout_seconds=600,
    )
    # Fay retries each refused delivery three times: four 401s for the first event.
    wait_for(
        lambda: [d for d in deliveries(live, fresh(run).external_id) if d["attempt"] == 4],
        "Fay's last retry",
    )
    refused = deliveries(live, run.external_id)
    assert {d["status"] for d in refused} == {401}
    run.refresh_from_db()
    assert run.status in (Status.PENDING, Status.RUNNING)
    assert not WebhookEvent.objects.filter(account=account).exists()
    assert "refused" in live.output()


def test_a_delivery_before_the_runs_id_is_saved_is_refused_so_fay_delivers_it_again(
    acme, bob, fay_url
):
    account = ProviderAccount.objects.create(
        team=acme,
        kind="fay",
        name="Fay",
        base_url=fay_url,
        api_key="sim-acme-webhooks",
        webhook_secret=SECRET,
    )
    run = Run.objects.launch(account=account, user=bob, prompt="q", options={}, timeout_seconds=60)
    assert run.claim_start()  # the create call is out; its answer not saved yet
    early = deliver(account, "webhook_status.json")
    assert early.status_code == 409
    assert not WebhookEvent.objects.exists()
    run.record_external_id(REQUEST_ID)
    again = deliver(account, "webhook_status.json")
    assert again.json() == {"status": "ok", "applied": True}
    run.refresh_from_db()
    assert run.status == Status.RUNNING


def test_a_delivery_for_a_run_runbrake_did_not_launch_is_answered_and_ignored(hooked):
    account, run = hooked
    Run.objects.filter(pk=run.pk).update(external_id="someone-elses")
    response = deliver(account, "webhook_output.json")
    assert response.json() == {"status": "ok", "applied": False}
