"""Summarise a py-spy raw profile (collapsed stacks: `frame;frame;... count`, each frame
`function (file:line)`) into what the report shows: where the process's CPU went, by area
(the library or Runbrake module of the innermost frame), by Runbrake function (the innermost
frame in the measured tree's own code, with everything it called), and the hottest leaves."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
OURS = ("runs", "webapp", "simulators")
# The commands' frames are the roots every stack of the process has (serve's or runwatcher's
# loop): a stack with no Runbrake frame below them is the event loop and the libraries.
ROOTS = "runs/management/commands/"


def _frame(text: str) -> tuple[str, str]:
    found = FRAME.match(text.strip())
    if not found:
        return text.strip(), ""
    return found.group("func"), found.group("file")


def area(path: str) -> str:
    """A short name for where a frame's file lives (py-spy gives paths relative to the
    import path: `django/db/models/query.py`, `asyncio/events.py`, `runs/realtime/live.py`)."""
    parts = path.split("/")
    top = parts[0].removesuffix(".py")
    if top in OURS:
        return path
    if top == "django" and len(parts) > 2:
        return f"django.{parts[1]}"
    return top or "?"


def _ours(path: str) -> bool:
    return path.split("/")[0] in OURS and not path.startswith(ROOTS)


def summarise(raw: str, rate: int, duration: float, top: int = 12) -> dict[str, Any]:
    total = 0
    by_area: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    by_ours: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        func, path = frames[-1]
        by_area[area(path)] += count
        by_leaf[f"{func} ({area(path)})"] += count
        inner = next(((f, p) for f, p in reversed(frames) if _ours(p)), None)
        by_ours[f"{inner[0]} ({area(inner[1])})" if inner else "(loop and libraries only)"] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return (
            [[k, round(100 * v / total, 1)] for k, v in counter.most_common(top)] if total else []
        )

    return {
        "samples": total,
        "rate_hz": rate,
        "seconds": duration,
        # Thread-samples over wall-clock samples: 1.0 is one core busy the whole window.
        "busy_cores": round(total / (rate * duration), 2) if duration else None,
        "by_area": share(by_area),
        "by_runbrake_function": share(by_ours),
        "hottest": share(by_leaf),
    }
