"""Provider clients. Each module maps between Runbrake's values and one provider's API."""

from __future__ import annotations

import httpx

from .base import Budget, Provider, ProviderConfig
from .dify import DifyProvider
from .errors import ProviderError
from .fay import FayProvider
from .intelligencebox import IntelligenceBoxProvider
from .xpander import XpanderProvider

PROVIDERS: dict[str, type[Provider]] = {
    cls.kind: cls for cls in (FayProvider, DifyProvider, IntelligenceBoxProvider, XpanderProvider)
}


def get_provider(
    kind: str,
    config: ProviderConfig,
    client: httpx.AsyncClient | None = None,
    budget: Budget | None = None,
) -> Provider:
    try:
        cls = PROVIDERS[kind]
    except KeyError:
        raise ProviderError("UNKNOWN_PROVIDER", f"No client for provider {kind!r}.") from None
    return cls(config, client=client, budget=budget)


__all__ = ["PROVIDERS", "Provider", "ProviderConfig", "ProviderError", "get_provider"]
