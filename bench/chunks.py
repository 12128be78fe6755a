"""Where each simulated IntelligenceBox chunk ends, from the measured tree's own simulator
(the bench's output lag needs the character count after each chunk).

    chunks.py < [[prompt, count], ...]   -> [[cumulative length after chunk 1, 2, ...], ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ.get("BENCH_APP") or str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

import django

django.setup()

from simulators.intelligencebox import answer_chunks  # noqa: E402


def main() -> None:
    out = []
    for prompt, count in json.load(sys.stdin):
        total, cum = 0, []
        for chunk in answer_chunks(prompt, count):
            total += len(chunk)
            cum.append(total)
        out.append(cum)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
