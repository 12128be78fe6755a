"""Input from browsers, API clients and providers is hostile: these checks turn what would be a
500 deep inside (a recursion limit, PostgreSQL refusing a NUL or a lone surrogate, an id past a
64-bit column, `"²".isdigit()`) into a clear refusal at the edge."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# Deeper JSON than any real option needs; Python's own limit is ~1,000 and a schema validator
# recurses per level (300 levels once held a process at 100 % CPU for minutes).
MAX_DEPTH = 20
# Ids fit a signed 64-bit column.
MAX_ID = 2**63 - 1
_ID = re.compile(r"[0-9]{1,19}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored as text (None when it can)."""
    if "\x00" in value:
        return "contains a NUL character"
    if _SURROGATE.search(value):
        return "contains a lone surrogate (text that is not valid Unicode)"
    return None


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why a JSON value cannot be kept as it is (None when it can): too deep, text that
    cannot be stored, or a number too large for the database."""
    if depth > MAX_DEPTH:
        return f"is nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, str):
        return text_problem(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_ID else "holds a number too large to store"
    if isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(str(key)) or json_problem(item, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, list):
        for item in value:
            if problem := json_problem(item, depth + 1):
                return problem
    return None


def as_id(raw: Any) -> int | None:
    """A database id from a URL or form value ("12"), or None: not "²" (which isdigit()
    accepts), not "-1", not 10**30."""
    return as_whole_number(raw, maximum=MAX_ID)


def as_whole_number(raw: Any, *, maximum: int) -> int | None:
    """A number from 1 to `maximum` given as an int or as ASCII digits, or None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if 0 < raw <= maximum else None
    if isinstance(raw, str) and _ID.fullmatch(raw):
        number = int(raw)
        return number if 0 < number <= maximum else None
    return None


# A stop's reason is kept up to this many characters (the column's size).
STOP_REASON_MAX = 500


def stop_reason(said: Sequence[object] | str) -> str:
    """A stop's reason as it is kept: the first one given (a one-click reason and the free
    text share a name), without characters that cannot be stored, at most 500 characters.
    Cleaned, not refused: nothing may stand in the way of a stop."""
    candidates = [said] if isinstance(said, str) else said
    for text in candidates:
        if not isinstance(text, str):
            continue
        kept = _SURROGATE.sub("", text.replace("\x00", "")).strip()
        if kept:
            return kept[:STOP_REASON_MAX]
    return ""
