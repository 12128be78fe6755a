"""Turn bench results into docs/PERFORMANCE.md (tables generated; the analysis is the
hand-written bench/analysis.md, included as is)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _num(v: Any, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def _row(
    metric: str, value: Any, target: float, *, unit: str, higher_is_better: bool = False
) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return f"| {metric} | — | {_num(target, unit)} | — | not measured |"
    ratio = f"{value / target:.2f}" if target else "—"
    ok = value >= target if higher_is_better else value <= target
    return (
        f"| {metric} | {_num(value, unit)} | {'≥' if higher_is_better else '≤'} "
        f"{_num(target, unit)} | {ratio} | {'**pass**' if ok else '**miss**'} |"
    )


def backend_table(r: dict[str, Any], server: str = "daphne") -> list[str]:
    rows = ["| metric | measured | target | ratio to target | result |", "|---|---|---|---|---|"]
    p1 = r.get(f"p1/{server}", {})
    rows.append(
        _row(
            "P1 stop overhead p95 (API stop → simulator has it)",
            _get(p1, "api_to_sim", "p95"),
            20,
            unit=" ms",
        )
    )
    rows.append(
        _row(
            "P1 ÷ bare httpx call to the same simulator (p95)", _get(p1, "ratio_p95"), 1.5, unit="x"
        )
    )
    p2 = r.get(f"p2/{server}", {})
    rows.append(
        _row(
            f"P2 stop → every viewer STOPPED, p99 ({_num(_get(p2, 'viewers'))} viewers)",
            _get(p2, "latency", "p99"),
            100,
            unit=" ms",
        )
    )
    p3 = r.get(f"p3/{server}", {})
    rows.append(
        _row(
            "P3 idle authenticated sockets on one process",
            _get(p3, "sockets"),
            5000,
            unit="",
            higher_is_better=True,
        )
    )
    rows.append(_row("P3 memory per socket", _get(p3, "kib_per_socket"), 32, unit=" KiB"))
    p4 = r.get("p4", {})
    completed = None
    if isinstance(_get(p4, "runs"), int):
        completed = p4["runs"] - (p4.get("not_completed") or 0)
    rows.append(
        _row(
            f"P4 streaming runs completed on one watcher (of {_num(_get(p4, 'runs'))})",
            completed,
            1000,
            unit="",
            higher_is_better=True,
        )
    )
    rows.append(_row("P4 status push lag p99", _get(p4, "status_lag", "p99"), 250, unit=" ms"))
    rows.append(_row("P4 output push lag p99", _get(p4, "output_lag", "p99"), 250, unit=" ms"))
    p5 = r.get(f"p5/{server}", {})
    rows.append(
        _row(
            f"P5 run list p95 at {_num(_get(p5, 'big_rows'))} runs",
            _get(p5, "big", "p95"),
            50,
            unit=" ms",
        )
    )
    rows.append(_row("P5 ratio big ÷ 1k-run team (p95)", _get(p5, "ratio_p95"), 1.5, unit="x"))
    lost = sum(
        v
        for v in (
            _get(r, f"p2/{server}", "lost"),
            _get(r, f"p3/{server}", "lost"),
            _get(r, "p4", "lost"),
        )
        if isinstance(v, int)
    )
    rows.append(_row("P6 lost terminal updates (P2-P4)", lost, 0, unit=""))
    lags = [
        _get(r, key, "p99")
        for key in (f"lag-p2/{server}", f"lag-p3/{server}", "lag-p4")
        if isinstance(_get(r, key, "p99"), float)
    ]
    rows.append(
        _row(
            "P6 event-loop lag p99 (worst process, P2-P4)",
            max(lags) if lags else None,
            20,
            unit=" ms",
        )
    )
    return rows


def details(r: dict[str, Any]) -> list[str]:
    out = ["```json", json.dumps(r, indent=1)[:12000], "```"]
    return out


def server_table(results: dict[str, Any], backends: list[Any]) -> list[str]:
    rows = [
        "| backend | server | P1 p95 (ms) | P1 ÷ bare | P2 p50 / p99 (ms) | P3 sockets | "
        "P3 KiB/socket | P3 connect (s) | list p95 1k (ms) | list rps (c=16) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in backends:
        r = results[b]
        for s in ("daphne", "uvicorn"):
            rows.append(
                f"| {b} | {s} | {_num(_get(r, f'p1/{s}', 'api_to_sim', 'p95'))} | "
                f"{_num(_get(r, f'p1/{s}', 'ratio_p95'))} | "
                f"{_num(_get(r, f'p2/{s}', 'latency', 'p50'))} / "
                f"{_num(_get(r, f'p2/{s}', 'latency', 'p99'))} | "
                f"{_num(_get(r, f'p3/{s}', 'sockets'))} | "
                f"{_num(_get(r, f'p3/{s}', 'kib_per_socket'))} | "
                f"{_num(_get(r, f'p3/{s}', 'connect_seconds'))} | "
                f"{_num(_get(r, f'p5/{s}', 'small', 'p95'))} | {_num(_get(r, f'rps/{s}'))} |"
            )
    return rows


def write_report(results: dict[str, Any], target: Path) -> None:
    m = results["machine"]
    backends = [b for b in ("sqlite", "postgres") if b in results]
    labels = {
        "sqlite": "Embedded default: SQLite (WAL), in-memory channel layer, one process "
        "(web + watcher), daphne",
        "postgres": "Scaled out: PostgreSQL 15 + Redis (channels-redis pub/sub), two web "
        "processes for P2, the watcher in its own process, daphne",
    }
    lines = [
        "# Performance",
        "",
        "Generated by `bench/run.py` (`make bench`); the analysis at the end is "
        "`bench/analysis.md`. Numbers are from one run on the machine below; everything "
        "(servers, simulators, watcher, PostgreSQL, Redis, load generators) shares its cores.",
        "",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- **Command:** `{results['command']}` — {results['date']}, took "
        f"{results.get('seconds', '?')} s"
        + (
            f" in all (re-measured in a second pass: {', '.join(results['remeasured'])})"
            if results.get("remeasured")
            else ""
        )
        + (" (**quick mode: smaller sizes, not the targets' sizes**)" if results["quick"] else ""),
        f"- **Sizes:** {', '.join(f'{k}={v:,}' for k, v in results['sizes'].items())}",
        "",
    ]
    for b in backends:
        lines += [f"## {labels[b]}", "", *backend_table(results[b]), ""]
    lines += [
        "## daphne vs uvicorn",
        "",
        "Same flags (`manage.py serve --server daphne|uvicorn`), same process layout.",
        "",
        *server_table(results, backends),
        "",
    ]
    analysis = HERE / "analysis.md"
    if analysis.exists():
        lines += [analysis.read_text().rstrip(), ""]
    lines += ["## Raw results", ""]
    for b in backends:
        lines += [
            f"<details><summary>{b}</summary>",
            "",
            *details(results[b]),
            "",
            "</details>",
            "",
        ]
    target.write_text("\n".join(lines))


if __name__ == "__main__":
    # Re-render from a results.json: report.py <results.json> <target>
    write_report(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
