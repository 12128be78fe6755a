"""The process's outbound HTTP client for providers.

One `httpx.AsyncClient` per event loop: building a client costs milliseconds (TLS context,
connection pool), which a stop call must not pay, and pooled keep-alive connections make the
next call to the same provider cheaper still.
"""

from __future__ import annotations

import asyncio
import weakref

import httpx

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def shared_client() -> httpx.AsyncClient | None:
    """The running loop's client, or None outside a loop (the provider then makes its own)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=5.0),
            follow_redirects=False,
            # No cap on open connections: each followed run holds one for its stream, and a
            # cap would queue streams and, worse, stop calls behind them (at 500 streams a
            # stop waited for a stream to end). Idle keep-alive ones stay bounded.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        )
        _clients[loop] = client
    return client
