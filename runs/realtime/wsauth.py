"""Who a websocket belongs to, decided once, at the handshake.

Channels' AuthMiddlewareStack keeps the cookies, a lazy session and a lazy user (the whole
row) in every socket's scope for the socket's whole life, a few kilobytes each. A consumer
needs only who the user is: whether they may see a team or a run is read from the database
when it connects and whenever a membership changes (runs/realtime/consumers.py), and logging
out closes their sockets (runs/realtime/signals.py). So this middleware reads the session
cookie, checks the session exactly as Django's auth does for a page (`get_user`: its backend,
an active user, and the session hash that a password change invalidates), and leaves in the
scope only `user`: a User with its id and username loaded, or AnonymousUser. No `cookies`, no
`session`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.contrib.auth.models import AnonymousUser
from django.db import router
from django.http import parse_cookie

# What Channels' session and auth middleware put in a scope; never passed on from here.
DROPPED = ("cookies", "session")


class _HandshakeSession:
    """The session as the handshake may use it: read, and flushed when it does not verify
    (as a page would), but never moved to a new key. `get_user` moves a session that verifies
    only with a retired SECRET_KEY (SECRET_KEY_FALLBACKS) to a new key and a fresh hash, and
    a socket cannot send the browser that new cookie: the page's session would be lost. Its
    next page request moves it instead."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getitem__(self, key: str) -> Any:
        return self.store[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.store.get(key, default)

    def flush(self) -> None:
        self.store.flush()

    def cycle_key(self) -> None:
        pass

    def __setitem__(self, key: str, value: Any) -> None:
        pass


class _Handshake:
    """What `get_user` reads of a request: its session."""

    def __init__(self, session: _HandshakeSession) -> None:
        self.session = session


def session_key(scope: dict[str, Any]) -> str | None:
    cookies = b"; ".join(value for name, value in scope.get("headers", []) if name == b"cookie")
    return parse_cookie(cookies.decode("latin-1")).get(settings.SESSION_COOKIE_NAME) or None


@database_sync_to_async
def user_for(key: str) -> Any:
    """The session's user, as little of it as a socket needs, or AnonymousUser."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(key)
    user = get_user(_Handshake(_HandshakeSession(store)))  # type: ignore[arg-type]
    if not user.is_authenticated:
        return user
    model = type(user)
    fields = [model._meta.pk.attname, model.USERNAME_FIELD]
    return model.from_db(
        router.db_for_read(model), fields, [getattr(user, name) for name in fields]
    )


class SessionUserMiddleware:
    """ASGI middleware: `scope["user"]` from the session cookie, checked at the handshake."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        key = session_key(scope)
        user = await user_for(key) if key else AnonymousUser()
        inner = {name: value for name, value in scope.items() if name not in DROPPED}
        inner["user"] = user
        return await self.application(inner, receive, send)
