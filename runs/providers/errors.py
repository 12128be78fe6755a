"""The one error type of every provider client: a stable `code`, a sentence a user
understands, whether trying again later may succeed, and how long to wait when the provider
said so. Its own module so that every part of runs/providers/ can raise it without importing
the client interface (base.py) that uses those parts."""

from __future__ import annotations

from typing import Any


class ProviderError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.http_status = http_status

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "http_status": self.http_status}


class QuotaExhausted(ProviderError):
    """The account's budget for this kind of call is spent. `retry_after` says when the next
    call of this kind may go out; `message` says which quota, in words. Nothing was sent,
    unless `refused_by_provider`: the call went out and the provider refused it as over its
    quota (which proves it did nothing)."""

    def __init__(
        self, endpoint: str, retry_after: float, message: str, *, refused_by_provider: bool = False
    ) -> None:
        super().__init__("QUOTA_EXHAUSTED", message, retryable=True, retry_after=retry_after)
        self.endpoint = endpoint
        self.refused_by_provider = refused_by_provider
