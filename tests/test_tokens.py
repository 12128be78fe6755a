"""A user's API tokens page: create (named, optionally expiring, shown once), last use,
revoke; only the owner's tokens, another's is a 404."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.utils import timezone

from runs.models import ApiToken

pytestmark = pytest.mark.django_db

HTMX: dict[str, Any] = {"HTTP_HX_REQUEST": "true"}


def test_a_token_is_shown_once_works_then_is_revoked(client, bob):
    client.force_login(bob)
    created = client.post(
        "/account/tokens/", {"action": "create", "name": "nightly report", "expires": "30"}, **HTMX
    )
    html = created.content.decode()
    shown = re.search(r'value="(rb_[^"]+)"', html)
    assert shown is not None
    token = shown.group(1)
    assert "shown only this once" in created["HX-Trigger"]
    stored = ApiToken.objects.get(user=bob)
    assert stored.name == "nightly report"
    assert token not in stored.digest  # only a fingerprint is kept
    assert stored.expires_at is not None
    assert dt.timedelta(days=29) < stored.expires_at - timezone.now() <= dt.timedelta(days=30)
    listing = client.get("/account/tokens/").content.decode()
    assert token not in listing  # never again
    assert "nightly report" in listing
    api = client.get("/api/runs", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert api.status_code == 200
    client.post("/account/tokens/", {"action": "revoke", "token": stored.pk}, **HTMX)
    assert client.get("/api/runs", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 401


def test_an_expired_token_is_refused(client, bob):
    token = ApiToken.issue(bob, expires_at=timezone.now() - dt.timedelta(minutes=1))
    assert client.get("/api/runs", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 401


def test_another_users_token_is_a_404_and_stays(client, bob, alice):
    ApiToken.issue(alice, name="alice's")
    theirs = ApiToken.objects.get(user=alice)
    client.force_login(bob)
    assert "alice&#x27;s" not in client.get("/account/tokens/").content.decode()
    response = client.post("/account/tokens/", {"action": "revoke", "token": theirs.pk})
    assert response.status_code == 404
    assert ApiToken.objects.filter(pk=theirs.pk).exists()


def test_the_tokens_page_needs_a_login(client):
    response = client.get("/account/tokens/")
    assert response.status_code == 302
