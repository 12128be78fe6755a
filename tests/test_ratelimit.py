"""Floods of launches, stops and logins are refused past the limit, before any provider call."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.cache import cache
from django.urls import reverse

from runs.models import ApiToken, Run, Status

HTMX: dict[str, Any] = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture(autouse=True)
def tight_limits(settings):
    settings.RUNBRAKE_RATE_LIMITS = {
        "launch": (2, 60),
        "stop": (2, 60),
        "login": (3, 300),
        "login_name": (6, 900),
    }
    cache.clear()
    yield
    cache.clear()


def test_launches_past_the_limit_are_refused_in_words(client, bob, acme, fay_account):
    client.force_login(bob)
    post = {"provider_account": fay_account.pk, "prompt": "x", "timeout_seconds": 60}
    for _ in range(2):
        client.post(reverse("runs:launch", args=[acme.pk]), post, **HTMX)
    refused = client.post(reverse("runs:launch", args=[acme.pk]), post, **HTMX)
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert "Too many launches" in json.loads(refused["HX-Trigger"])["toast"]["message"]
    assert Run.objects.count() == 2


def test_the_api_answers_429_with_retry_after(client, bob, fay_account):
    token = ApiToken.issue(bob)
    call = lambda: client.post(  # noqa: E731
        reverse("runs:api-runs"),
        data=json.dumps({"provider_account": fay_account.pk, "prompt": "x"}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert [call().status_code for _ in range(3)] == [201, 201, 429]
    refused = call()
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    assert refused["Retry-After"]


def test_stops_past_the_limit_make_no_provider_call(client, bob, launch):
    client.force_login(bob)
    runs = [launch(f"r{i}") for i in range(3)]
    codes = [client.post(reverse("runs:stop", args=[r.pk]), **HTMX).status_code for r in runs]
    assert codes == [200, 200, 429]
    runs[2].refresh_from_db()
    assert runs[2].status == Status.PENDING  # no stop recorded, so no provider call


def test_logins_past_the_limit_are_refused_even_with_the_right_password(client, bob, password):
    for _ in range(3):
        client.post(reverse("login"), {"username": "bob", "password": "wrong"})
    refused = client.post(reverse("login"), {"username": "bob", "password": password})
    assert refused.status_code == 429
    assert "Too many failed logins" in refused.content.decode()
    assert "_auth_user_id" not in client.session


def test_a_login_within_the_limit_works(client, bob, password):
    response = client.post(reverse("login"), {"username": "bob", "password": password})
    assert response.status_code == 302
    assert client.session["_auth_user_id"] == str(bob.pk)


def test_limits_are_per_user(client, bob, alice, acme, fay_account):
    post = {"provider_account": fay_account.pk, "prompt": "x", "timeout_seconds": 60}
    client.force_login(bob)
    for _ in range(3):
        client.post(reverse("runs:launch", args=[acme.pk]), post, **HTMX)
    client.force_login(alice)
    ok = client.post(reverse("runs:launch", args=[acme.pk]), post, **HTMX)
    assert ok.status_code == 200


@pytest.mark.parametrize("spelling", ["  bob ", "BOB", "\uff42\uff4f\uff42"])  # fullwidth
def test_a_respelled_username_counts_in_the_same_bucket(client, bob, password, spelling):
    """Django's form strips and NFKC-normalises the name: so does the count."""
    for _ in range(3):
        client.post(reverse("login"), {"username": spelling, "password": "wrong"})
    refused = client.post(reverse("login"), {"username": "bob", "password": password})
    assert refused.status_code == 429
    assert "_auth_user_id" not in client.session


def test_successful_logins_do_not_count(client, bob, password):
    for _ in range(5):
        ok = client.post(reverse("login"), {"username": "bob", "password": password})
        assert ok.status_code == 302
        client.logout()


def test_many_addresses_hit_a_higher_per_name_ceiling_and_other_names_are_untouched(
    client, bob, alice, password
):
    for n in range(6):
        client.post(
            reverse("login"),
            {"username": "bob", "password": "wrong"},
            REMOTE_ADDR=f"10.0.0.{n // 3}",
        )
    # A new address: not its own limit, but bob's name has had enough for now.
    refused = client.post(
        reverse("login"), {"username": "bob", "password": password}, REMOTE_ADDR="10.9.9.9"
    )
    assert refused.status_code == 429
    assert "for this username" in refused.content.decode()
    ok = client.post(reverse("login"), {"username": "alice", "password": password})
    assert ok.status_code == 302


def test_the_admin_login_is_limited_too(client, admin_user):
    for _ in range(3):
        client.post(reverse("admin:login"), {"username": "admin", "password": "wrong"})
    refused = client.post(reverse("admin:login"), {"username": "admin", "password": "password"})
    assert refused.status_code == 429
    assert "_auth_user_id" not in client.session


def test_run_again_counts_as_a_launch(client, bob, acme, fay_account):
    client.force_login(bob)
    done = Run.objects.launch(
        account=fay_account, user=bob, prompt="x", options={}, timeout_seconds=60
    )
    done.mark_completed(proof="status_read", output="x")
    for _ in range(2):
        assert client.post(reverse("runs:again", args=[done.pk]), **HTMX).status_code == 204
    refused = client.post(reverse("runs:again", args=[done.pk]), **HTMX)
    assert refused.status_code == 429
    assert Run.objects.count() == 3


def test_a_cache_that_cannot_count_lets_a_stop_through(client, bob, launch, monkeypatch, caplog):
    """Scaled out the cache is Redis: a limiter that cannot count must not keep anyone from
    stopping a run."""
    from django.core.cache import caches

    def down(*args, **kwargs):
        raise ConnectionError("the cache is down")

    monkeypatch.setattr(type(caches["default"]), "add", down)
    client.force_login(bob)
    runs = [launch(f"r{i}") for i in range(3)]
    codes = [client.post(reverse("runs:stop", args=[r.pk]), **HTMX).status_code for r in runs]
    assert codes == [200, 200, 200]
    assert Run.objects.filter(status=Status.STOPPING).count() == 3
    assert "rate limit stop not counted, the cache failed: the cache is down" in caplog.text
