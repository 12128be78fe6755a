"""A websocket's user is read from the session once, at the handshake, with the checks a page
gets; the scope then keeps only that user, as little of it as the consumers need."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone

from runs.realtime.wsauth import SessionUserMiddleware
from webapp.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def logged_in(user: Any) -> tuple[Client, str]:
    client = Client()
    client.force_login(user)
    return client, client.cookies[settings.SESSION_COOKIE_NAME].value


def headers(cookie: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"origin", b"http://localhost"),
        (b"host", b"localhost"),
        (b"cookie", f"csrftoken=x; {settings.SESSION_COOKIE_NAME}={cookie}".encode()),
    ]


async def connects(path: str, cookie: str) -> bool:
    communicator = WebsocketCommunicator(application, path, headers=headers(cookie))
    try:
        connected, _ = await communicator.connect()
        return connected
    finally:
        await communicator.disconnect()


async def scope_for(cookie: str) -> dict[str, Any]:
    """The scope the middleware hands on, for a socket with this session cookie."""
    seen: dict[str, Any] = {}

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    scope = {"type": "websocket", "path": "/ws/x/", "headers": headers(cookie)}
    await SessionUserMiddleware(inner)(scope, None, None)
    return seen


async def test_it_keeps_only_the_users_id_and_name_and_no_cookies_or_session(bob):
    _client, cookie = await sync_to_async(logged_in)(bob)
    scope = await scope_for(cookie)
    assert "cookies" not in scope
    assert "session" not in scope
    user = scope["user"]
    assert user.is_authenticated
    assert (type(user), user.pk, user.username) == (type(bob), bob.pk, "bob")
    assert {"password", "email", "last_login"} <= user.get_deferred_fields()
    assert scope["headers"] == headers(cookie)  # the rest of the scope is passed on as it was


async def test_a_socket_without_a_session_cookie_is_anonymous_and_refused(acme):
    scope = await scope_for("")
    assert not scope["user"].is_authenticated
    assert not await connects(f"/ws/teams/{acme.pk}/", "")


async def test_a_logged_out_session_is_refused(bob, acme):
    client, cookie = await sync_to_async(logged_in)(bob)
    assert await connects(f"/ws/teams/{acme.pk}/", cookie)
    await sync_to_async(client.logout)()
    assert not await connects(f"/ws/teams/{acme.pk}/", cookie)


async def test_an_expired_session_is_refused(bob, acme):
    _client, cookie = await sync_to_async(logged_in)(bob)
    past = timezone.now() - dt.timedelta(seconds=1)
    await Session.objects.filter(session_key=cookie).aupdate(expire_date=past)
    assert not await connects(f"/ws/teams/{acme.pk}/", cookie)


async def test_a_password_change_ends_the_sessions_sockets_too(bob, acme):
    _client, cookie = await sync_to_async(logged_in)(bob)
    bob.set_password("a-new-password-entirely")
    await bob.asave()
    assert not await connects(f"/ws/teams/{acme.pk}/", cookie)
    # As on a page, the session that no longer verifies is flushed.
    assert not await Session.objects.filter(session_key=cookie).aexists()


async def test_a_deactivated_user_is_refused(bob, acme):
    _client, cookie = await sync_to_async(logged_in)(bob)
    bob.is_active = False
    await bob.asave()
    assert not await connects(f"/ws/teams/{acme.pk}/", cookie)


async def test_a_session_from_before_a_secret_key_rotation_keeps_its_key(bob, acme, settings):
    """A session hashed with a retired key (SECRET_KEY_FALLBACKS) still verifies; a page moves
    it to a new key, but a socket cannot give the browser that cookie, so it must not."""
    _client, cookie = await sync_to_async(logged_in)(bob)
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "a-new-secret-key-after-rotation-0123456789abcdefghijklmnop"
    assert await connects(f"/ws/teams/{acme.pk}/", cookie)
    assert await Session.objects.filter(session_key=cookie).aexists()
    settings.SECRET_KEY_FALLBACKS = []
    assert not await connects(f"/ws/teams/{acme.pk}/", cookie)
