"""Liveness and readiness endpoints, against the real database and channel layer."""

from __future__ import annotations

import pytest
from channels.layers import channel_layers

pytestmark = pytest.mark.django_db


def test_liveness_needs_no_login_and_says_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


def test_readiness_checks_the_database_and_the_channel_layer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"].startswith("ok")
    assert set(body["checks"]) == {"database", "channel_layer"}


def test_readiness_is_503_and_names_the_failing_check(client, settings):
    # A channel layer pointing at a port where nothing listens: what a Redis outage looks like.
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:9/0"]},
        }
    }
    channel_layers.backends.clear()
    try:
        response = client.get("/readyz")
    finally:
        channel_layers.backends.clear()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["channel_layer"] == "failing"  # details in the log, not the answer
    assert "127.0.0.1" not in response.content.decode()
    assert body["checks"]["database"].startswith("ok")


def test_health_endpoints_refuse_writes(client):
    assert client.post("/healthz").status_code == 405
