"""`manage.py serve` under both ASGI servers: pages, authenticated websockets with the
snapshot, and websocket messages over 64 KiB refused by the server itself."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from runs.models import Run, Status
from tests.conftest import Server, database_url, sim_account

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


def _until(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_ctrl_c_frees_the_port_at_once_sends_browsers_elsewhere_and_twice_ends_the_wait(
    server: str, bob: Any, acme: Any
) -> None:
    """Stopping `make run` with an IntelligenceBox stream in flight (closing it would end the
    chat, so the watcher lets it finish): the port is free for a restart at once, open pages
    are told to reconnect (4012) rather than left on a server that no longer pushes, and a
    second Ctrl-C ends the wait."""
    env = {
        "DATABASE_URL": database_url(connection.vendor, connection.settings_dict),
        # Long enough that only a second Ctrl-C can end the wait within the test.
        "RUNBRAKE_WATCHER_DRAIN_SECONDS": "600",
    }
    old = Server(watcher=True, server=server, env=env)
    new: Server | None = None
    try:
        account = sim_account(acme, old, "intelligencebox")
        run = Run.objects.launch(
            account=account,
            user=bob,
            prompt="Long chat sim:pending=0 sim:duration=600 sim:chunks=600",
            options={},
            timeout_seconds=3600,
        )
        _until(lambda: Run.objects.filter(pk=run.pk, status=Status.RUNNING).exists(), "running")
        ws = old.url.replace("http://", "ws://") + f"/ws/teams/{acme.pk}/"
        headers = {"Cookie": f"sessionid={cookie_for(bob)}", "Origin": old.url}
        with connect(ws, additional_headers=headers, open_timeout=10) as sock:
            sock.recv(timeout=10)
            old.proc.send_signal(signal.SIGINT)
            try:
                while True:
                    sock.recv(timeout=30)
            except ConnectionClosed as closed:
                told = closed.rcvd
            except TimeoutError:
                raise AssertionError(f"the socket stayed open:\n{old.output()}") from None
        assert told is not None, old.output()
        assert told.code == 4012
        # A restart binds the same port while the old process still lets the chat finish.
        new = Server(watcher=False, server=server, port=old.port, env=env)
        assert old.proc.poll() is None
        assert new.requests("intelligencebox") == []  # new's own token: new answered
        old.proc.send_signal(signal.SIGINT)
        assert old.proc.wait(timeout=60) is not None
        run.refresh_from_db()
        assert run.watched_by == ""  # handed back for the next watcher, not left leased
        assert "Traceback" not in old.output(), old.output()
    finally:
        old.close()
        if new is not None:
            new.close()
