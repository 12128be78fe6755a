"""Where provider calls may go. A provider account's base URL is user input: in production it
must not reach the server's own network (loopback, private ranges, link-local cloud metadata).
Checked when an account is saved and again before every connection (names can re-resolve)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from urllib.parse import urlsplit

from .errors import ProviderError

_CACHE_SECONDS = 60.0
_checked: dict[tuple[str, int], float] = {}


def refused_reason(address: str) -> str | None:
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return "a reserved address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private network address"
    return None


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderError("DESTINATION_REFUSED", "The base URL must be an http(s) URL.")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _judge(host: str, addresses: list[str]) -> None:
    for address in addresses:
        if reason := refused_reason(address):
            raise ProviderError(
                "DESTINATION_REFUSED",
                f"The base URL's host {host} resolves to {reason} ({address}), which Runbrake "
                "does not call in production. Use the provider's public address.",
            )


def check_url(url: str) -> None:
    """Synchronous check, for forms and model validation."""
    host, port = _target(url)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        raise ProviderError(
            "DESTINATION_REFUSED", f"The base URL's host {host} does not resolve."
        ) from None
    _judge(host, [str(info[4][0]) for info in infos])


async def acheck_url(url: str) -> None:
    """The same check before connecting; a host that passed is trusted for a minute."""
    host, port = _target(url)
    if _checked.get((host, port), 0.0) > time.monotonic():
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        raise ProviderError(
            "PROVIDER_UNREACHABLE", f"The base URL's host {host} does not resolve.", retryable=True
        ) from None
    _judge(host, [str(info[4][0]) for info in infos])
    _checked[(host, port)] = time.monotonic() + _CACHE_SECONDS
