"""The chaos soak catches a broken build: the short soak, run with a deliberate bug put into
the web and watcher processes by the harness (bench/chaos_break/sitecustomize.py, never by
product code), must fail the checker on the invariant that bug breaks.

Minutes each, so marked `chaos`: not in the quick suite; CI runs them after `make chaos-short`
(`pytest -m chaos`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.chaos


@pytest.mark.parametrize(
    ("bug", "invariant"),
    [
        # The stop intent is rolled back, not committed, before the provider call.
        ("stop_commit", 2),
    ],
)
def test_the_short_soak_fails_a_broken_build_on_the_invariant_it_breaks(
    bug: str, invariant: int
) -> None:
    # Not pytest's tmp_path: the soak's PostgreSQL runs as the postgres user, who must be able
    # to reach its data directory (pytest's base directory is private to its user).
    out = Path(tempfile.mkdtemp(prefix=f"chaos-{bug}-", dir="/tmp"))
    out.chmod(0o755)
    env = {
        **os.environ,
        "CHAOS_BREAK": bug,
        "CHAOS_SECONDS": os.environ.get("CHAOS_BREAK_SECONDS", "60"),
        "CHAOS_SEED": "15",
        "CHAOS_QUIET_SECONDS": "150",
        "CHAOS_OUT": str(out / "soak"),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-4000:]
    summary = json.loads((out / "soak" / "summary.json").read_text())
    assert summary["break_"] == bug
    assert summary["invariants"][str(invariant)] is False, summary["violations_list"][:10]
    assert any(f"invariant {invariant} " in v for v in summary["violations_list"])
