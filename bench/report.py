"""Turn bench results into docs/PERFORMANCE.md (tables generated; the analysis is the
hand-written bench/analysis.md, included as is).

    report.py <results.json> <target>   re-render from a saved run
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

LABELS = {
    "sqlite": "Embedded default: SQLite (WAL), in-memory channel layer, one process "
    "(web + watcher)",
    "postgres": "Scaled out: PostgreSQL + Redis (channels-redis pub/sub), two web processes for "
    "P2, the watcher in its own process",
}


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def _num(v: Any, unit: str = "") -> str:
    if not _real(v):
        return "—"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v:,.1f}{unit}" if abs(v) < 1000 else f"{v:,.0f}{unit}"


@dataclass
class Row:
    """One target row: `value` picks the compared number from a backend's results, `show`
    what the cell says (defaults to the number), `floor` the bare cost beside it."""

    label: str
    target: str
    value: Callable[[dict[str, Any]], Any]
    ok: Callable[[Any, dict[str, Any]], bool]
    unit: str = ""
    show: Callable[[dict[str, Any]], str] | None = None
    floor: Callable[[dict[str, Any]], str] | None = None
    only: str = ""  # the target holds on this backend only
    # Whether the row was measured at the target's size (quick mode is not).
    sized: Callable[[dict[str, Any]], bool] | None = None

    def floor_cell(self, r: dict[str, Any]) -> str:
        # A floor whose measurement is missing says nothing rather than dashes.
        text = self.floor(r) if self.floor else ""
        return "" if "—" in text else text

    def cell(self, r: dict[str, Any] | None) -> str:
        if r is None:
            return "—"
        if self.show is not None:
            return self.show(r)
        return _num(self.value(r), self.unit)

    def result(self, r: dict[str, Any], backend: str) -> str:
        v = self.value(r)
        if not _real(v):
            error = next((e for e in _errors(r)), None)
            return f"not measured ({error})" if error else "not measured"
        if self.only and backend != self.only:
            return f"(target on {self.only})"
        if self.sized is not None and not self.sized(r):
            return "not at the target's size"
        return "**pass**" if self.ok(v, r) else "**miss**"


def _errors(r: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {v['error']}"[:120] for k, v in r.items() if isinstance(v, dict) and "error" in v
    ]


def _server(r: dict[str, Any]) -> str:
    return str(r.get("server") or "default")


def _p(r: dict[str, Any], row: str, *path: str) -> Any:
    return _get(r, f"{row}/{_server(r)}", *path)


def _p4_largest(r: dict[str, Any]) -> dict[str, Any]:
    sizes = _get(r, "p4", "sizes") or {}
    if not sizes:
        return {}
    largest: dict[str, Any] = sizes[max(sizes, key=int)]
    return largest


def _growth(r: dict[str, Any], kind: str) -> float | None:
    """The worst (lag growth ÷ work growth) over the sizes, from the smallest size's p99."""
    sizes = _get(r, "p4", "sizes") or {}
    ordered = sorted((int(k), v) for k, v in sizes.items() if _real(_get(v, kind, "p99")))
    if len(ordered) < 2:
        return None
    n0, first = ordered[0]
    base = max(first[kind]["p99"], 1.0)
    worst: float = max((v[kind]["p99"] / base) / (n / n0) for n, v in ordered[1:])
    return round(worst, 2)


def _p4_lag(kind: str) -> Callable[[dict[str, Any]], Any]:
    def value(r: dict[str, Any]) -> Any:
        return _get(_p4_largest(r), f"{kind}_lag", "p99")

    return value


def _growth_of(kind: str) -> Callable[[dict[str, Any]], Any]:
    def value(r: dict[str, Any]) -> Any:
        return _growth(r, f"{kind}_lag")

    return value


def _always(text: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: text


def _lost(r: dict[str, Any]) -> Any:
    parts = [_p(r, "p2", "lost"), _p(r, "p3", "lost")]
    parts += [v.get("lost") for v in (_get(r, "p4", "sizes") or {}).values()]
    found = [v for v in parts if isinstance(v, int)]
    return sum(found) if found else None


def _worst_lag(r: dict[str, Any]) -> Any:
    lags: list[float] = []
    for phase in (_get(r, f"lag/p2/{_server(r)}"), _get(r, f"lag/p3/{_server(r)}")):
        lags += [v["p99"] for v in (phase or {}).values() if _real(_get(v, "p99"))]
    for size in (_get(r, "p4", "sizes") or {}).values():
        lags += [v["p99"] for v in (size.get("loop_lag") or {}).values() if _real(_get(v, "p99"))]
    return max(lags) if lags else None


def _reconnect(r: dict[str, Any]) -> str:
    rc = _p(r, "p3", "reconnect")
    if not isinstance(rc, dict) or "seconds" not in rc:
        return "—"
    return f"{_num(rc['seconds'], ' s')} ({_num(rc['reconnected'])} of {_num(rc['sockets'])})"


def _sockets(r: dict[str, Any]) -> str:
    p3 = _p(r, "p3") or {}
    if not _real(p3.get("sockets")):
        return "—"
    text = f"{_num(p3['sockets'])}"
    if p3["sockets"] < p3.get("asked", 0):
        text += f" (in the {_num(p3.get('connect_box_seconds'))} s box)"
    return text + f", {_num(p3.get('connect_per_second'))}/s"


def rows(floors: dict[str, Any], sizes: dict[str, Any]) -> list[Row]:
    ws = floors.get("websockets") or {}
    wsd = floors.get("websockets_daphne") or {}
    sse = floors.get("sse") or {}
    big = max(sizes.get("p4_sizes") or [0])
    sse_lag = (
        f"bare SSE reader of {_num(sse.get('streams'))} streams: chunk lag p99 "
        f"{_num(_get(sse, 'lag', 'p99'), ' ms')}"
    )
    sse_cpu = (
        f"bare read: {_num(sse.get('cpu_us_per_chunk'))} µs CPU a chunk, "
        f"{_num(sse.get('busy_cores'))} of a core for {_num(sse.get('chunks_per_s'))} chunks/s"
    )
    return [
        Row(
            "P1 stop overhead p95 (API stop → simulator has it)",
            "≤ 20 ms",
            lambda r: _p(r, "p1", "api_to_sim", "p95"),
            lambda v, r: v <= 20,
            " ms",
            floor=lambda r: f"bare httpx call {_num(_p(r, 'p1', 'bare_to_sim', 'p95'), ' ms')}",
        ),
        Row(
            "P1 ÷ bare httpx call to the same simulator (p95)",
            "≤ 1.5x",
            lambda r: _p(r, "p1", "ratio_p95"),
            lambda v, r: v <= 1.5,
            "x",
        ),
        Row(
            f"P2 stop → {_num(sizes.get('p2_viewers'))} viewers see *Stopped*, p99",
            "≤ 100 ms",
            lambda r: _p(r, "p2", "latency", "p99"),
            lambda v, r: v <= 100,
            " ms",
            sized=lambda r: (_p(r, "p2", "viewers") or 0) >= 1000,
            floor=lambda r: (
                f"bare fan-out to {_num(ws.get('fanout_sockets'))} sockets p99: uvicorn "
                f"{_num(_get(ws, 'fanout_latency', 'p99'), ' ms')} "
                f"({_num(ws.get('send_us_per_socket'))} µs a send)"
                + (
                    f", daphne {_num(_get(wsd, 'fanout_latency', 'p99'), ' ms')} "
                    f"({_num(wsd.get('send_us_per_socket'))} µs a send)"
                    if wsd.get("fanout_latency")
                    else ""
                )
            ),
        ),
        Row(
            "P3 idle authenticated sockets on one process",
            "≥ 10,000",
            lambda r: _p(r, "p3", "sockets"),
            lambda v, r: v >= 10_000,
            show=_sockets,
            sized=lambda r: (_p(r, "p3", "asked") or 0) >= 10_000,
            floor=lambda r: f"bare connects {_num(ws.get('connect_per_second'))}/s",
        ),
        Row(
            "P3 memory per idle socket",
            "≤ 24 KiB",
            lambda r: _p(r, "p3", "kib_per_socket"),
            lambda v, r: v <= 24,
            " KiB",
            show=lambda r: (
                f"{_num(_p(r, 'p3', 'kib_per_socket'), ' KiB')} (at {_num(_p(r, 'p3', 'sockets'))})"
            ),
            sized=lambda r: (_p(r, "p3", "asked") or 0) >= 10_000,
            floor=lambda r: (
                f"bare {_num(ws.get('kib_per_socket'), ' KiB')} (at {_num(ws.get('sockets'))})"
            ),
        ),
        Row(
            "P3 mass reconnect (half the sockets drop and reconnect at once)",
            "5,000 in ≤ 30 s",
            lambda r: _p(r, "p3", "reconnect", "seconds"),
            lambda v, r: (
                v <= 30
                and (_p(r, "p3", "reconnect", "reconnected") or 0) >= 5000
                and _p(r, "p3", "reconnect", "reconnected") == _p(r, "p3", "reconnect", "sockets")
            ),
            show=_reconnect,
            sized=lambda r: (_p(r, "p3", "asked") or 0) >= 10_000,
            floor=lambda r: (
                f"bare {_num(_get(ws, 'reconnect', 'seconds'), ' s')} for "
                f"{_num(_get(ws, 'reconnect', 'sockets'))}"
            ),
            only="postgres",
        ),
        *(
            Row(
                f"P4 {kind} lag p99 at {_num(big)} streaming runs",
                "≤ 250 ms",
                _p4_lag(kind),
                lambda v, r: v <= 250,
                " ms",
                sized=lambda r: (_get(_p4_largest(r), "runs") or 0) >= 1000,
                floor=_always(floor),
            )
            for kind, floor in (("status", sse_lag), ("output", sse_cpu))
        ),
        *(
            Row(
                f"P4 {kind} lag growth ÷ work growth (worst size, p99)",
                "≤ 1",
                _growth_of(kind),
                lambda v, r: v <= 1,
                "x",
            )
            for kind in ("status", "output")
        ),
        Row(
            f"P5 run list p95 at {_num(sizes.get('p5_big'))} runs",
            "≤ 30 ms",
            lambda r: _p(r, "p5", "big", "p95"),
            lambda v, r: v <= 30,
            " ms",
            sized=lambda r: (_p(r, "p5", "big_rows") or 0) >= 1_000_000,
            floor=lambda r: f"bare ASGI request {_num(_get(ws, 'request', 'p95'), ' ms')}",
        ),
        Row(
            "P5 ratio big ÷ 1k-run team (p95)",
            "≤ 1.2x",
            lambda r: _p(r, "p5", "ratio_p95"),
            lambda v, r: v <= 1.2,
            "x",
        ),
        Row("P6 lost terminal updates (P2-P4)", "0", _lost, lambda v, r: v == 0),
        Row(
            "P6 event-loop lag p99 (worst process and phase, P2-P4)",
            "≤ 20 ms",
            _worst_lag,
            lambda v, r: v <= 20,
            " ms",
        ),
    ]


def backend_table(
    backend: str, after: dict[str, Any], before: dict[str, Any] | None, all_rows: list[Row]
) -> list[str]:
    if before is not None:
        out = [
            "| row | target | before | after | result (after) | floor on this machine |",
            "|---|---|---|---|---|---|",
        ]
    else:
        out = [
            "| row | target | measured | result | floor on this machine |",
            "|---|---|---|---|---|",
        ]
    for row in all_rows:
        floor = row.floor_cell(after)
        cells = [row.label, row.target]
        if before is not None:
            cells.append(row.cell(before))
        cells += [row.cell(after), row.result(after, backend), floor]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _pair(r: dict[str, Any] | None, kind: str) -> str:
    if r is None:
        return "—"
    return f"{_num(_get(r, kind, 'p50'))} / {_num(_get(r, kind, 'p99'))}"


def growth_table(after: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    p4 = after.get("p4") or {}
    sizes = p4.get("sizes") or {}
    if not sizes:
        return ["P4 not measured" + (f": {p4['error']}" if "error" in p4 else "."), ""]
    old = (before or {}).get("p4", {}).get("sizes", {}) if before is not None else None
    head = [
        f"Each run streams {p4.get('chunks')} chunks over {_num(p4.get('duration_s'))} s; all "
        "runs of a size stream at once (each run's start is set in its prompt), on one watcher; "
        f"{p4.get('watched')} runs have a viewer on their page. CPU cores = CPU time of each "
        "process over the streaming window. Work = chunks per second over "
        "all runs. x = p99 at this size ÷ p99 at the smallest size, next to the work's x: the "
        "lag grows no faster than the work while the lag's x stays at or under the work's.",
        "",
    ]
    cols = ["runs", "work (chunks/s)", "work x"]
    if old is not None:
        cols += ["status p50 / p99 ms before", "output p50 / p99 ms before"]
    cols += [
        "status p50 / p99 ms",
        "output p50 / p99 ms",
        "status p99 x",
        "output p99 x",
        "not completed · lost · chunks never shown",
        "loop lag p99 ms (web · watcher)",
        "CPU cores while streaming",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ordered = sorted(sizes.items(), key=lambda kv: int(kv[0]))
    n0, first = ordered[0]
    for n, r in ordered:
        work = int(n) / int(n0)
        cells = [_num(int(n)), _num(r.get("work_chunks_per_s")), f"{work:.1f}"]
        if old is not None:
            cells += [_pair(old.get(n), "status_lag"), _pair(old.get(n), "output_lag")]
        cells += [_pair(r, "status_lag"), _pair(r, "output_lag")]
        for kind in ("status_lag", "output_lag"):
            a, b = _get(r, kind, "p99"), _get(first, kind, "p99")
            cells.append(f"{a / max(b, 1.0):.1f}" if _real(a) and _real(b) else "—")
        if "error" in r:
            cells.append(r["error"][:80])
        else:
            text = " · ".join(
                _num(r.get(k)) for k in ("not_completed", "lost", "output_chunks_never_shown")
            )
            # The plan did not hold: some streams started before their viewers or late.
            if r.get("viewers_late"):
                text += " (viewers late)"
            if r.get("launched_late"):
                text += f" ({r['launched_late']} started late)"
            cells.append(text)
        lag = r.get("loop_lag") or {}
        cells.append(" · ".join(_num(_get(v, "p99")) for v in lag.values()) or "—")
        cpu = r.get("cpu_cores") or {}
        cells.append(", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if _real(v)) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return [*head, *lines, ""]


def floors_table(floors: dict[str, Any]) -> list[str]:
    ws = floors.get("websockets") or {}
    sse = floors.get("sse") or {}
    if not ws and not sse:
        return ["Not measured.", ""]
    lines = [
        "What the same machine does with nothing of Runbrake in the way (`bench/floors.py`): a "
        "bare ASGI app on the product's uvicorn stack (websockets, uvloop, no compression; "
        "its fan-out also on daphne, the embedded default's server) "
        "and a bare reader of the simulator's SSE streams (httpx + httpx-sse + json, no "
        "Django, no database). Measured once per run, beside the rows above.",
        "",
        "| floor | measured |",
        "|---|---|",
    ]
    if "error" in ws:
        lines.append(f"| bare websockets | not measured: {ws['error'][:120]} |")
    elif ws:
        rc = ws.get("reconnect") or {}
        lines += [
            f"| one pre-built ~2 KiB frame to {_num(ws.get('fanout_sockets'))} sockets, "
            "receipt p50 / p99 | "
            f"{_pair(ws, 'fanout_latency')} ms |",
            f"| ASGI send loop, per socket | {_num(ws.get('send_us_per_socket'))} µs |",
            *(
                [
                    f"| the same frame to {_num(wsd.get('fanout_sockets'))} sockets on daphne "
                    f"(the embedded default's server), receipt p50 / p99 | "
                    f"{_pair(wsd, 'fanout_latency')} ms |",
                    f"| daphne's send loop, per socket | "
                    f"{_num(wsd.get('send_us_per_socket'))} µs |",
                ]
                if (wsd := floors.get("websockets_daphne") or {}).get("fanout_latency")
                else []
            ),
            f"| memory per idle socket at {_num(ws.get('sockets'))} | "
            f"{_num(ws.get('kib_per_socket'), ' KiB')} |",
            f"| connects per second | {_num(ws.get('connect_per_second'))} |",
            f"| mass reconnect of {_num(rc.get('sockets'))} | "
            f"{_num(rc.get('seconds'), ' s')} ({_num(rc.get('reconnected'))} reconnected) |",
            f"| sequential request p50 / p95 | {_pair(ws, 'request')} ms |",
        ]
    if "error" in sse:
        lines.append(f"| bare SSE reader | not measured: {sse['error'][:120]} |")
    elif sse:
        lines += [
            f"| SSE: {_num(sse.get('streams'))} streams ({_num(sse.get('chunks_per_s'))} "
            "chunks/s), CPU per chunk read and parsed | "
            f"{_num(sse.get('cpu_us_per_chunk'))} µs ({_num(sse.get('busy_cores'))} of a core) |",
            f"| SSE: chunk lag p50 / p99 (simulator emits → reader has it) | "
            f"{_pair(sse, 'lag')} ms |",
            f"| SSE: the two simulator processes meanwhile | "
            f"{_num(sse.get('simulators_busy_cores'))} cores busy |",
        ]
    return [*lines, ""]


def profile_section(profile: dict[str, Any] | None, n: int) -> list[str]:
    if not profile:
        return []
    if "error" in profile:
        return [f"Profile not taken: {profile['error'][:200]}", ""]
    lines = [
        f"py-spy on the watcher's process for the streaming window at {_num(n)} runs "
        f"({profile.get('samples')} samples at {profile.get('rate_hz')} Hz; busy ≈ "
        f"{profile.get('busy_cores')} cores).",
        "",
        "| by area (innermost frame) | % | Runbrake function (with what it calls) | % "
        "| hottest function | % |",
        "|---|---|---|---|---|---|",
    ]
    cols = [profile.get(k) or [] for k in ("by_area", "by_runbrake_function", "hottest")]
    for i in range(max(len(c) for c in cols)):
        cells: list[str] = []
        for c in cols:
            name, pct = c[i] if i < len(c) else ("", "")
            cells += [f"`{name}`" if name else "", str(pct)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def server_table(results: dict[str, Any], backends: list[str]) -> list[str]:
    rows_ = [
        "| backend | server | P1 p95 (ms) | P1 ÷ bare | P2 p50 / p99 (ms) | P3 sockets | "
        "P3 KiB/socket | P3 reconnect (s) | list p95 1k (ms) | list rps (c=16) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    after = results["trees"].get("after", {})
    for b in backends:
        r = after.get(b) or {}
        for s in ("daphne", "uvicorn"):
            rows_.append(
                f"| {b} | {s} | {_num(_get(r, f'p1/{s}', 'api_to_sim', 'p95'))} | "
                f"{_num(_get(r, f'p1/{s}', 'ratio_p95'))} | "
                f"{_pair(_get(r, f'p2/{s}'), 'latency')} | "
                f"{_num(_get(r, f'p3/{s}', 'sockets'))} | "
                f"{_num(_get(r, f'p3/{s}', 'kib_per_socket'))} | "
                f"{_num(_get(r, f'p3/{s}', 'reconnect', 'seconds'))} | "
                f"{_num(_get(r, f'p5/{s}', 'small', 'p95'))} | {_num(_get(r, f'rps/{s}'))} |"
            )
    return rows_


def phases_table(results: dict[str, Any]) -> list[str]:
    phases = results.get("phases") or []
    if not phases:
        return []
    lines = ["| tree | backend | phase | seconds |", "|---|---|---|---|"]
    for p in phases:
        lines.append(f"| {p['tree']} | {p['backend']} | {p['phase']} | {_num(p['seconds'])} |")
    lines.append(f"| | | **the whole run** | **{_num(results.get('seconds'))}** |")
    return [*lines, ""]


def _both_servers(results: dict[str, Any], backends: list[str]) -> bool:
    after = results["trees"].get("after", {})
    return any(
        "p1/daphne" in (after.get(b) or {}) and "p1/uvicorn" in (after.get(b) or {})
        for b in backends
    )


def write_report(results: dict[str, Any], target: Path) -> None:
    m = results["machine"]
    trees = results.get("trees") or {}
    after_tree = trees.get("after") or {}
    before_tree = trees.get("before")
    backends = [b for b in ("sqlite", "postgres") if b in after_tree]
    floors = results.get("floors") or {}
    sizes = results.get("sizes") or {}
    compared = (
        f"- **Before / after:** `{before_tree.get('label')}` / `{after_tree.get('label')}`, "
        "measured in this one run, backend by backend (the older tree first), with the same "
        "venv and bench code"
        if before_tree
        else f"- **Measured:** `{after_tree.get('label')}` (`BENCH_BEFORE=<ref>` adds a before "
        "column)"
    )
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
        f"{_num(results.get('seconds'))} s"
        + (
            f" in all (re-measured in a second pass: {', '.join(results['remeasured'])})"
            if results.get("remeasured")
            else ""
        )
        + (" (**quick mode: smaller sizes, not the targets' sizes**)" if results["quick"] else ""),
        compared,
        "- **Sizes:** "
        + ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in sizes.items()),
        "",
    ]
    all_rows = rows(floors, sizes)
    for b in backends:
        after = after_tree[b]
        before = before_tree.get(b) if before_tree else None
        lines += [
            f"## {LABELS[b]}, {after.get('server') or 'default server'}",
            "",
            *backend_table(b, after, before, all_rows),
            "",
            f"### P4 growth ({b})",
            "",
            *growth_table(after, before),
            f"### Profile of what is left ({b})",
            "",
            *(
                profile_section(_get(after, "p4", "profile"), max(sizes.get("p4_sizes") or [0]))
                or ["Not taken (BENCH_PROFILE=0 or P4 not measured).", ""]
            ),
        ]
        if errors := _errors(after):
            lines += ["Errors: " + "; ".join(errors), ""]
    lines += ["## Floors on this machine", "", *floors_table(floors)]
    if _both_servers(results, backends):
        lines += [
            "## daphne vs uvicorn",
            "",
            "Same flags (`manage.py serve --server daphne|uvicorn`), same process layout.",
            "",
            *server_table(results, backends),
            "",
        ]
    lines += ["## Time per phase", "", *phases_table(results)]
    analysis = HERE / "analysis.md"
    if analysis.exists():
        lines += [analysis.read_text().rstrip(), ""]
    lines += ["## Raw results", ""]
    for name, t in trees.items():
        for b in backends:
            if b in t:
                lines += [
                    f"<details><summary>{name}: {b}</summary>",
                    "",
                    "```json",
                    json.dumps(t[b], indent=1)[:20000],
                    "```",
                    "",
                    "</details>",
                    "",
                ]
    if floors:
        lines += [
            "<details><summary>floors</summary>",
            "",
            "```json",
            json.dumps(floors, indent=1),
            "```",
            "",
            "</details>",
            "",
        ]
    target.write_text("\n".join(lines))


if __name__ == "__main__":
    write_report(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
