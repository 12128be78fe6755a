"""Provider clients. Each module maps between Runbrake's values and one provider's API."""

from __future__ import annotations

import httpx

from .base import Provider, ProviderConfig, ProviderError
from .fay import FayProvider

PROVIDERS: dict[str, type[Provider]] = {
    FayProvider.kind: FayProvider,
}


def get_provider(
    kind: str, config: ProviderConfig, client: httpx.AsyncClient | None = None
) -> Provider:
    try:
        cls = PROVIDERS[kind]
    except KeyError:
        raise ProviderError("UNKNOWN_PROVIDER", f"No client for provider {kind!r}.") from None
    return cls(config, client=client)


__all__ = ["PROVIDERS", "Provider", "ProviderConfig", "ProviderError", "get_provider"]
