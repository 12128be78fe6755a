"""Which pages may open Runbrake's websockets: the site itself, by scheme, host and port.

Channels' AllowedHostsOriginValidator compares the Origin's host name only, so a page served
from another port or scheme of the same host (http://127.0.0.1:8219 beside Runbrake on :8000)
could open a logged-in user's sockets and read their runs: cross-site websocket hijacking.
This validator admits an Origin only when it is exactly the socket's own origin (the scheme the
browser used, the Host header with its port) or one of CSRF_TRUSTED_ORIGINS (a TLS proxy's
public origin), and always checks the host against ALLOWED_HOSTS too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable
from channels.security.websocket import AllowedHostsOriginValidator, WebsocketDenier
from django.conf import settings

if TYPE_CHECKING:
    from channels.consumer import _ChannelScope


def _header(scope: Mapping[str, Any], name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def socket_origin(scope: Mapping[str, Any]) -> str:
    """The origin of the page a same-site socket comes from: https when the socket is secure
    (or the trusted proxy says the browser used TLS), else http; and the Host with its port."""
    secure = scope.get("scheme") == "wss"
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        header, value = proxy
        wanted = header.removeprefix("HTTP_").replace("_", "-").lower().encode()
        secure = secure or _header(scope, wanted) == value
    host = _header(scope, b"host")
    return f"{'https' if secure else 'http'}://{host}".lower()


def origin_allowed(scope: Mapping[str, Any]) -> bool:
    origin = _header(scope, b"origin").strip().lower()
    if not origin or urlsplit(origin).scheme not in ("http", "https"):
        return False
    trusted = {o.strip().rstrip("/").lower() for o in settings.CSRF_TRUSTED_ORIGINS}
    return origin.rstrip("/") in trusted or origin == socket_origin(scope)


class SameOriginValidator:
    """ASGI middleware: refuse the handshake (403) unless `origin_allowed`."""

    def __init__(self, application: Any) -> None:
        self.application = AllowedHostsOriginValidator(application)

    async def __call__(
        self, scope: _ChannelScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            await WebsocketDenier()(scope, receive, send)
            return
        await self.application(scope, receive, send)
