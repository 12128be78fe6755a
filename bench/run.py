"""`make bench`: measure P1-P6 on both backends, write docs/PERFORMANCE.md.

Every server, simulator, watcher and load generator is its own process on loopback, stopped
at the end. The full run is sized to finish within 15 minutes on two cores; BENCH_QUICK=1 runs
smaller sizes for a quick check.

    BENCH_BEFORE=<git ref>   also measure that commit (a temporary detached `git worktree`,
                             the same venv and the same bench code), backend by backend next to
                             this checkout; the report puts before and after side by side
    BENCH_BACKENDS=sqlite,postgres   the backends (both by default)
    BENCH_SERVERS=both       P1, P2, P3 and P5 on daphne and on uvicorn (default: each
                             topology's own server: `make run`'s for SQLite, the Procfile's
                             for PostgreSQL)
    BENCH_ONLY=floors,stop,idle,stream,list   some phases only
    BENCH_P4_SIZES=100,200   the P4 growth table's sizes
    BENCH_PROFILE=0          no py-spy profile of the watcher at the largest P4 size
    BENCH_BASE=<results.json>   re-measure some rows (BENCH_ONLY) on top of an earlier run
    BENCH_OUT, BENCH_PG_DB, BENCH_REDIS_DB, BENCH_REDIS_PORT   where results, logs and data go
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import floors
import measure
from common import (
    OUT,
    QUICK,
    REDIS_DB,
    REDIS_PORT,
    ROOT,
    LagMark,
    Proc,
    Server,
    Tree,
    lag_since,
    log,
    machine,
    raise_nofile,
)
from report import write_report

SIZES = {
    # name: (quick, full)
    "p1_stops": (20, 40),
    "p2_viewers": (200, 1000),
    "p2_trials": (3, 5),
    "p3_sockets": (1000, 10_000),
    # 10,000 in 60 s is the rate the mass reconnect's target asks (5,000 in 30 s).
    "p3_connect_box_s": (15, 60),
    "p3_reconnect_box_s": (10, 40),
    "p4_watched": (25, 100),
    "p4_duration_s": (6, 12),
    "p4_chunks": (12, 24),
    "p5_big": (100_000, 1_000_000),
    "p5_requests": (40, 60),
    "rps_seconds": (4, 5),
}
P4_SIZES = ([25, 100], [100, 200, 500, 1000])

ONLY = {p for p in os.environ.get("BENCH_ONLY", "").split(",") if p}
PROFILE = os.environ.get("BENCH_PROFILE", "1") not in ("", "0", "false")


def wanted(phase: str) -> bool:
    return not ONLY or phase in ONLY


def size(name: str) -> int:
    quick, full = SIZES[name]
    return quick if QUICK else full


def p4_sizes() -> list[int]:
    given = os.environ.get("BENCH_P4_SIZES", "")
    if given:
        return [int(v) for v in given.split(",") if v]
    return P4_SIZES[0] if QUICK else P4_SIZES[1]


def servers_for(backend: str, root: Path) -> list[str | None]:
    """Each topology's own server unless BENCH_SERVERS says: the embedded default is what
    `make run` starts (serve's default); scaled out, what the Procfile runs."""
    given = os.environ.get("BENCH_SERVERS", "")
    if given == "both":
        return ["daphne", "uvicorn"]
    if given:
        return [s for s in given.split(",") if s]
    if backend == "sqlite":
        return [None]
    procfile = root / "Procfile"
    found = re.search(r"serve --server (\w+)", procfile.read_text()) if procfile.exists() else None
    return [found.group(1) if found else None]


def reset(backend: str) -> None:
    t = common.tree()
    if backend == "sqlite":
        for p in t.sqlite_path.parent.glob(t.sqlite_path.name + "*"):
            p.unlink()
        return
    for cmd in (
        ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", t.pg_db],
        ["createdb", "-h", "127.0.0.1", "-U", "postgres", t.pg_db],
        ["redis-cli", "-p", REDIS_PORT, "-n", REDIS_DB, "FLUSHDB"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)


class Phases:
    """Elapsed time of every phase, for the report."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def timed(self, backend: str, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = round(time.monotonic() - started, 1)
            self.rows.append(
                {
                    "tree": common.tree().name,
                    "backend": backend,
                    "phase": phase,
                    "seconds": seconds,
                }
            )
            log(f"phase {common.tree().name}/{backend}/{phase}: {seconds} s")


PHASES = Phases()


def attempt(results: dict[str, Any], key: str, fn: Callable[..., Any], *args: Any) -> None:
    started = time.monotonic()
    try:
        results[key] = fn(*args)
    except Exception as exc:
        traceback.print_exc()
        results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    log(f"{key}: {json.dumps(results[key])[:400]} ({time.monotonic() - started:.0f} s)")


def lag_file(name: str) -> str:
    return str(OUT / f"lag-{name}.json")


def start_webs(backend: str, server: str | None, label: str, count: int) -> list[Server]:
    """The embedded default is one process with its watcher; scaled out, `count` web
    processes and the watcher in its own process (started by the caller)."""
    embedded = backend == "sqlite"
    name = f"{label}-{backend}-{server or 'default'}-{common.tree().name}"
    webs: list[Server] = []
    try:
        for i in range(1 if embedded else count):
            webs.append(
                Server(
                    f"{name}-{i}",
                    backend,
                    server=server,
                    watcher=embedded,
                    lag_file=lag_file(f"{name}-{i}"),
                    wait=False,
                )
            )
        for w in webs:
            w.ready()
    except Exception:
        for w in webs:
            w.stop()
        raise
    return webs


def marks(webs: list[Server], watcher: Proc | None = None) -> dict[str, LagMark]:
    out = {f"web{i}": LagMark(w.lag_file) for i, w in enumerate(webs)}
    if watcher is not None:
        out["watcher"] = LagMark(lag_file(watcher.name))
    return out


def bench_backend(backend: str, results: dict[str, Any], first: bool) -> dict[str, Any]:
    res: dict[str, Any] = {}
    sims: list[Server] = []
    watcher: Proc | None = None
    try:
        with PHASES.timed(backend, "setup: database, simulators"):
            reset(backend)
            for i in range(2):
                sims.append(
                    Server(
                        f"sim{i}-{backend}-{common.tree().name}",
                        backend,
                        server="uvicorn",
                        wait=False,
                    )
                )
            for sim in sims:
                sim.ready()
        with PHASES.timed(backend, "setup: accounts, sessions"):
            data = common.script(
                backend, "bench/setup_data.py", "accounts", ",".join(s.url for s in sims), "20"
            )
        if first and wanted("floors") and "floors" not in results:
            with PHASES.timed("-", "floors"):
                results["floors"] = run_floors(sims)
        if backend == "postgres":
            watcher = measure.watcher_process(
                backend, lag_file(f"watcher-{backend}-{common.tree().name}")
            )
        seeded: dict[str, Any] | None = None
        for index, server in enumerate(servers_for(backend, common.tree().root)):
            main = index == 0
            if wanted("stop") or (main and wanted("stream")) or wanted("list"):
                with PHASES.timed(backend, "web start"):
                    webs = start_webs(backend, server, "live", 2)
                name = webs[0].server
                if main:
                    res["server"] = name
                try:
                    if wanted("stop"):
                        with PHASES.timed(backend, f"P1+P2 ({name})"):
                            m = marks(webs)
                            attempt(
                                res,
                                f"p1/{name}",
                                measure.p1_stop_overhead,
                                webs[0],
                                sims[0],
                                data,
                                size("p1_stops"),
                            )
                            attempt(
                                res,
                                f"p2/{name}",
                                measure.p2_fanout,
                                webs,
                                data,
                                size("p2_viewers"),
                                size("p2_trials"),
                            )
                            res[f"lag/p2/{name}"] = lag_since(m)
                    if main and wanted("stream"):
                        with PHASES.timed(backend, "P4 growth"):
                            lag_files = {"web0": webs[0].lag_file}
                            if watcher is not None:
                                lag_files["watcher"] = lag_file(watcher.name)
                            attempt(
                                res,
                                "p4",
                                measure.p4_growth,
                                backend,
                                webs[0],
                                (watcher or webs[0]).pid,
                                lag_files,
                                sims,
                                data,
                                p4_sizes(),
                                size("p4_watched"),
                                size("p4_duration_s"),
                                size("p4_chunks"),
                                PROFILE,
                            )
                    if wanted("list"):
                        if seeded is None:
                            with PHASES.timed(backend, "P5 seed"):
                                attempt(
                                    res,
                                    "p5/seed",
                                    common.script,
                                    backend,
                                    "bench/setup_data.py",
                                    "seed",
                                    str(size("p5_big")),
                                    "1000",
                                )
                                seeded = res["p5/seed"]
                        with PHASES.timed(backend, f"P5 ({name})"):
                            attempt(
                                res,
                                f"p5/{name}",
                                measure.p5_list,
                                webs[0],
                                seeded,
                                size("p5_requests"),
                            )
                            attempt(
                                res,
                                f"rps/{name}",
                                measure.list_rps,
                                webs[0],
                                seeded,
                                size("rps_seconds"),
                            )
                finally:
                    for w in webs:
                        w.stop()
            if wanted("idle"):
                # A fresh process: memory per socket is not flattered by freed memory.
                with PHASES.timed(backend, f"P3 ({server or 'default'})"):
                    webs = start_webs(backend, server, "idle", 1)
                    name = webs[0].server
                    try:
                        m = marks(webs)
                        attempt(
                            res,
                            f"p3/{name}",
                            measure.p3_capacity,
                            webs[0],
                            data,
                            size("p3_sockets"),
                            size("p3_connect_box_s"),
                            size("p3_reconnect_box_s"),
                        )
                        res[f"lag/p3/{name}"] = lag_since(m)
                    finally:
                        for w in webs:
                            w.stop()
    finally:
        if watcher is not None:
            watcher.stop()
        for s in sims:
            s.stop()
    return res


def run_floors(sims: list[Server]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    attempt(
        out,
        "websockets",
        floors.bare_websockets,
        size("p2_viewers"),
        size("p2_trials"),
        size("p3_sockets"),
        size("p3_reconnect_box_s"),
    )
    # The embedded default's server (daphne) frames and writes each send itself: its own
    # fan-out floor, beside uvicorn's (P2 on SQLite runs on it).
    attempt(
        out,
        "websockets_daphne",
        floors.bare_websockets,
        size("p2_viewers"),
        size("p2_trials"),
        0,
        0,
        "daphne",
    )
    attempt(
        out,
        "sse",
        floors.bare_sse,
        sims,
        p4_sizes()[-1],
        size("p4_duration_s"),
        size("p4_chunks"),
        size("p4_watched"),
    )
    return out


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def this_checkout() -> Tree:
    sha = git("rev-parse", "--short", "HEAD")
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return Tree("after", ROOT, f"{branch} @ {sha}{dirty}")


@contextmanager
def before_checkout(ref: str) -> Iterator[Tree]:
    """BENCH_BEFORE: the ref in a temporary detached worktree, removed afterwards."""
    sha = git("rev-parse", "--short", f"{ref}^{{commit}}")
    path = Path(tempfile.mkdtemp(prefix="bench-before-"))
    path.rmdir()
    git("worktree", "add", "--detach", str(path), sha)
    try:
        yield Tree("before", path, f"{ref} @ {sha}" if ref != sha else sha)
    finally:
        git("worktree", "remove", "--force", str(path))
        shutil.rmtree(path, ignore_errors=True)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    # A stopped bench still stops every process it started (the finally blocks run).
    signal.signal(signal.SIGTERM, _interrupted)
    raise_nofile()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    started = time.monotonic()
    backends = [b for b in os.environ.get("BENCH_BACKENDS", "sqlite,postgres").split(",") if b]
    ref = os.environ.get("BENCH_BEFORE", "")
    after = this_checkout()
    results: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ("BENCH_QUICK=1 " if QUICK else "")
        + (f"BENCH_BEFORE={ref} " if ref else "")
        + "make bench",
        "quick": QUICK,
        "sizes": {**{k: size(k) for k in SIZES}, "p4_sizes": p4_sizes()},
        "trees": {},
    }
    # BENCH_BASE=<results.json>: re-measure some rows (BENCH_ONLY) on top of an earlier run.
    base = os.environ.get("BENCH_BASE")
    if base:
        earlier = json.loads(Path(base).read_text())
        results = {**earlier, "date": results["date"], "machine": results["machine"]}
        results["remeasured"] = sorted(ONLY) or ["everything"]
    with before_checkout(ref) if ref else _no_tree() as before:
        trees = [t for t in (before, after) if t is not None]
        for i, backend in enumerate(backends):
            # Backend by backend, the older tree first then this one: same conditions, close
            # in time.
            for t in trees:
                common.use_tree(t)
                log(f"backend {backend}, {t.name}: {t.label}")
                entry = results["trees"].setdefault(t.name, {})
                entry["label"] = t.label
                entry[backend] = {
                    **entry.get(backend, {}),
                    **bench_backend(backend, results, first=i == 0 and t is after),
                }
    common.use_tree(after)
    results["phases"] = PHASES.rows
    results["seconds"] = round(time.monotonic() - started) + (
        results.get("seconds", 0) if base else 0
    )
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    target = ROOT / "docs" / "PERFORMANCE.md"
    write_report(results, target)
    log(f"wrote {target} and {OUT / 'results.json'} in {results['seconds']} s")


@contextmanager
def _no_tree() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
