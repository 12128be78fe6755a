"""`manage.py serve` under both ASGI servers: pages, authenticated websockets with the
snapshot, and websocket messages over 64 KiB refused by the server itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.browser.conftest import database_url
from tests.conftest import Server

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["daphne", "uvicorn"])
def served(request: pytest.FixtureRequest, transactional_db: None) -> Iterator[Server]:
    live = Server(
        watcher=False,
        server=request.param,
        env={"DATABASE_URL": database_url(connection.vendor, connection.settings_dict)},
    )
    try:
        yield live
    finally:
        live.close()


def cookie_for(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def test_it_serves_pages_and_authenticated_sockets(served: Server, bob: Any, launch: Any) -> None:
    run = launch()
    ws = served.url.replace("http://", "ws://") + f"/ws/runs/{run.pk}/"
    headers = {"Cookie": f"sessionid={cookie_for(bob)}", "Origin": served.url}
    with connect(ws, additional_headers=headers, open_timeout=10) as sock:
        snapshot = sock.recv(timeout=10)
        assert f'id="run-status-{run.pk}"' in snapshot


def test_it_refuses_websocket_messages_over_64_kib(served: Server, bob: Any, launch: Any) -> None:
    run = launch()
    ws = served.url.replace("http://", "ws://") + f"/ws/runs/{run.pk}/"
    headers = {"Cookie": f"sessionid={cookie_for(bob)}", "Origin": served.url}
    with connect(ws, additional_headers=headers, open_timeout=10, max_size=None) as sock:
        sock.recv(timeout=10)
        sock.send("x" * (64 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            sock.recv(timeout=10)
    # Refused by the server's protocol layer: uvicorn says 1009 (message too big), daphne drops
    # the connection. Had the message reached the consumer, it would have closed with 4400.
    received = closed.value.rcvd
    assert received is None or received.code == 1009


def test_a_forged_forwarded_for_does_not_reset_the_login_limit(served: Server, bob: Any) -> None:
    """Behind a proxy on the same host every client shares 127.0.0.1; uvicorn's default
    trusts its X-Forwarded-For, so a fresh header was a fresh login limit."""
    import urllib.error
    import urllib.parse
    import urllib.request

    def attempt(forwarded: str) -> int:
        page = urllib.request.urlopen(f"{served.url}/accounts/login/")
        token = page.headers.get_all("Set-Cookie")[0].split("csrftoken=")[1].split(";")[0]
        body = urllib.parse.urlencode(
            {"username": "bob", "password": "wrong", "csrfmiddlewaretoken": token}
        ).encode()
        request = urllib.request.Request(
            f"{served.url}/accounts/login/",
            data=body,
            headers={
                "Cookie": f"csrftoken={token}",
                "X-Forwarded-For": forwarded,
                "Referer": f"{served.url}/accounts/login/",
            },
        )
        try:
            return urllib.request.urlopen(request).status
        except urllib.error.HTTPError as refused:
            return refused.code

    answers = [attempt(f"203.0.113.{n}") for n in range(12)]
    assert 429 in answers  # the ten failures of one address, whatever header it sent
