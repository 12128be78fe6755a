"""Keep secrets out of logs: a logging filter (installed on every handler in settings.LOGGING)
that masks provider keys this process has seen, bearer tokens and key-like header values in
a record's message, its arguments and its traceback.

Pure Python and cheap: the keys are registered by runs/security/crypto.py when they are encrypted or
decrypted, so the filter never touches the database."""

from __future__ import annotations

import logging
import re
import threading

_lock = threading.Lock()
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None

# Values that are secrets whatever they belong to: bearer tokens, API-key headers or fields,
# and the shapes of common provider keys (OpenAI/Anthropic-style sk-…, Dify app-…).
_SHAPES = re.compile(
    r"(?P<lead>\bBearer\s+|\b(?:x-api-key|api[_-]?key|apikey|secret|password)"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<secret>[^\s\"',;}{)\]]{6,})"
    r"|(?P<shaped>\b(?:sk|app|rb)[-_][A-Za-z0-9_-]{12,})",
    re.IGNORECASE,
)


def mask(secret: str) -> str:
    """What a human may see of a key: its last four characters, enough to tell two apart and
    to match it with the provider's dashboard, never enough to use (its first four would often
    be a known prefix like `sk-`; together they gave away eight)."""
    if not secret:
        return ""
    if len(secret) <= 12:
        return "•" * 8
    return f"••••{secret[-4:]}"


def remember(secret: str) -> None:
    """Mask this exact value from now on (keys too short to be distinctive are left alone)."""
    global _known_pattern
    if not secret or len(secret) < 8 or secret in _known:
        return
    with _lock:
        _known.add(secret)
        # Longest first, so a key containing another is masked whole.
        ordered = sorted(_known, key=len, reverse=True)
        _known_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def scrub(text: str) -> str:
    pattern = _known_pattern
    if pattern is not None:
        text = pattern.sub(lambda m: mask(m.group(0)), text)

    def shape(m: re.Match[str]) -> str:
        if m.group("shaped"):
            return mask(m.group("shaped"))
        return m.group("lead") + mask(m.group("secret"))

    return _SHAPES.sub(shape, text)


class ScrubSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the formatter's problem, not ours
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True
