"""What every simulator shares: the request log, prompt directives, keys and rate limits.

State lives in this process's memory on purpose: a simulator is a stand-in for a remote
service, and restarting it loses its runs just as a real outage would.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, JsonResponse

DIRECTIVE = re.compile(r"\bsim:([a-z_]+)(?:=([\w.\-]+))?")
LOG_LIMIT = 20_000

_log: deque[dict[str, Any]] = deque(maxlen=LOG_LIMIT)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def iso_at(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


def mask_key(key: str) -> str:
    if len(key) <= 8:
        return "•" * len(key)
    return f"{key[:4]}…{key[-4:]}"


def parse_body(request: HttpRequest) -> Any:
    """The JSON body, or None when empty; raises ValueError when it is not JSON."""
    if not request.body:
        return None
    return json.loads(request.body)


def record(provider: str, request: HttpRequest, api_key: str) -> None:
    try:
        body: Any = parse_body(request)
    except ValueError:
        body = request.body.decode(errors="replace")[:2000]
    record_entry(
        {
            "provider": provider,
            "method": request.method,
            "path": request.path,
            "body": body,
            "api_key": mask_key(api_key) if api_key else "",
        }
    )


def record_entry(entry: dict[str, Any]) -> None:
    """Log something a simulator did (a request received, a webhook sent)."""
    _log.append({**entry, "at": now_iso()})


def requests_for(provider: str | None) -> list[dict[str, Any]]:
    return [entry for entry in _log if provider in (None, "", entry["provider"])]


def clear_log() -> None:
    _log.clear()


@dataclass
class Directives:
    values: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Directives:
        return cls({m.group(1): m.group(2) or "true" for m in DIRECTIVE.finditer(text or "")})

    def number(self, name: str, default: float, *, lo: float = 0.0, hi: float = 3600.0) -> float:
        try:
            return min(hi, max(lo, float(self.values[name])))
        except (KeyError, ValueError):
            return default

    def get(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)


def bearer_key(request: HttpRequest) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else ""


def key_is_valid(key: str) -> bool:
    return key.startswith("sim-") and len(key) > 4


class HourlyLimiter:
    """Quotas by key prefix (a tier): per key and endpoint a rolling one-hour window, and
    `month` over all of a key's calls in the calendar month (UTC). Keys of no tier are
    unlimited."""

    def __init__(self, tiers: dict[str, dict[str, int]]) -> None:
        self.tiers = tiers
        self.calls: dict[tuple[str, str], deque[float]] = {}
        self.monthly: dict[tuple[str, str], int] = {}

    def limits(self, key: str) -> dict[str, int]:
        return next((v for prefix, v in self.tiers.items() if key.startswith(prefix)), {})

    def allow(self, key: str, endpoint: str) -> bool:
        limits = self.limits(key)
        if not limits:
            return True
        month = (key, datetime.now(UTC).strftime("%Y-%m"))
        if "month" in limits and self.monthly.get(month, 0) >= limits["month"]:
            return False
        window = self.calls.setdefault((key, endpoint), deque())
        cutoff = time.monotonic() - 3600
        while window and window[0] < cutoff:
            window.popleft()
        if endpoint in limits and len(window) >= limits[endpoint]:
            return False
        window.append(time.monotonic())
        self.monthly[month] = self.monthly.get(month, 0) + 1
        return True


class TransientFaults:
    """`sim:fail=rate_limit|server_error`: the run's first N calls fail, then all is normal.

    Before the provider has an id for the run, its calls are the create attempts, keyed by
    (key, prompt); what is left carries over to the run once a create succeeds.
    """

    CALLS = 3

    def __init__(self) -> None:
        self.remaining: dict[Any, int] = {}

    def take(self, identity: Any, kind: str) -> bool:
        if kind not in ("rate_limit", "server_error"):
            return False
        left = self.remaining.setdefault(identity, self.CALLS)
        if left <= 0:
            return False
        self.remaining[identity] = left - 1
        return True

    def carry(self, before: Any, after: Any) -> None:
        """The create succeeded: the run keeps what is left of its faults (usually none)."""
        self.remaining[after] = self.remaining.pop(before, 0)


def json_response(payload: Any, status: int = 200, **headers: str) -> JsonResponse:
    response = JsonResponse(payload, status=status, safe=False)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response
