"""`make bench`: measure P1-P6 on both backends and daphne vs uvicorn, write docs/PERFORMANCE.md.

BENCH_QUICK=1 runs smaller sizes (~2 min); the full run stays under ~15 minutes. Every server,
simulator, watcher and load generator is its own process on loopback, stopped at the end.
BENCH_BACKENDS=sqlite,postgres picks the backends (both by default)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import measure
from common import OUT, PY, QUICK, ROOT, Server, log, machine, raise_nofile
from report import write_report

SIZES = {
    # name: (quick, full)
    "p1_stops": (20, 40),
    "p2_viewers": (300, 1000),
    "p2_trials": (4, 6),
    "p3_sockets": (1000, 5000),
    "p4_runs": (200, 1000),
    "p4_watched": (50, 200),
    "p5_big": (100_000, 1_000_000),
    "p5_requests": (40, 60),
    "rps_seconds": (5, 8),
}


# For working on one row: BENCH_ONLY=stop,idle,stream,list and BENCH_SERVERS=daphne,uvicorn.
ONLY = {p for p in os.environ.get("BENCH_ONLY", "").split(",") if p}
SERVERS = [s for s in os.environ.get("BENCH_SERVERS", "daphne,uvicorn").split(",") if s]


def wanted(phase: str) -> bool:
    return not ONLY or phase in ONLY


def size(name: str) -> int:
    quick, full = SIZES[name]
    return quick if QUICK else full


def reset(backend: str) -> None:
    if backend == "sqlite":
        for p in Path("/tmp").glob("bench-run.sqlite3*"):
            p.unlink()
        return
    for cmd in (
        ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", "bench_main"],
        ["createdb", "-h", "127.0.0.1", "-U", "postgres", "bench_main"],
        ["redis-cli", "-n", "2", "FLUSHDB"],
    ):
        subprocess.run(cmd, check=True, capture_output=True)


def setup(backend: str, sims: list[Server]) -> dict[str, Any]:
    out = subprocess.run(
        [PY, "bench/setup_data.py", "accounts", ",".join(s.url for s in sims), "20"],
        cwd=ROOT,
        env=measure.env_for(backend),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def seed(backend: str, big: int) -> dict[str, Any]:
    out = subprocess.run(
        [PY, "bench/setup_data.py", "seed", str(big), "1000"],
        cwd=ROOT,
        env=measure.env_for(backend),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def webs_for(backend: str, server: str, phase: str, count: int) -> list[Server]:
    """The embedded default is one process with its watcher; scaled out, `count` web processes
    and the watcher in its own process (started by the caller)."""
    embedded = backend == "sqlite"
    return [
        Server(
            f"{phase}-{backend}-{server}-{i}",
            backend,
            server=server,
            watcher=embedded,
            lag_file=str(OUT / f"lag-{phase}-{backend}-{server}-{i}.json"),
        )
        for i in range(1 if embedded else count)
    ]


def attempt(results: dict[str, Any], key: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    started = time.monotonic()
    try:
        results[key] = fn(*args, **kwargs)
    except Exception as exc:
        traceback.print_exc()
        results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    log(f"{key}: {json.dumps(results[key])[:400]} ({time.monotonic() - started:.0f} s)")


def bench_backend(backend: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    reset(backend)
    sims = [Server(f"sim{i}-{backend}", backend, server="uvicorn", watcher=False) for i in range(2)]
    watcher = None
    try:
        data = setup(backend, sims)
        if backend == "postgres":
            watcher = measure.watcher_process(backend, str(OUT / f"lag-watcher-{backend}.json"))
        for server in SERVERS:
            if not wanted("stop"):
                break
            webs = webs_for(backend, server, "stop", 2)
            try:
                attempt(
                    res,
                    f"p1/{server}",
                    measure.p1_stop_overhead,
                    backend,
                    webs[0],
                    sims[0],
                    data,
                    size("p1_stops"),
                )
                attempt(
                    res,
                    f"p2/{server}",
                    measure.p2_fanout,
                    backend,
                    webs,
                    data,
                    size("p2_viewers"),
                    size("p2_trials"),
                )
            finally:
                for w in webs:
                    w.stop()
            res[f"lag-p2/{server}"] = measure.lag_summary(
                [str(OUT / f"lag-stop-{backend}-{server}-{i}.json") for i in range(len(webs))]
            )
        # Scaled out, connecting 5,000 sockets costs two PostgreSQL connections each (no pool):
        # P3 runs on the default server only there, to keep the bench within its time box.
        for server in SERVERS if backend == "sqlite" else SERVERS[:1]:
            if not wanted("idle"):
                break
            webs = webs_for(backend, server, "idle", 1)
            try:
                attempt(
                    res,
                    f"p3/{server}",
                    measure.p3_capacity,
                    backend,
                    webs[0],
                    data,
                    size("p3_sockets"),
                )
            finally:
                for w in webs:
                    w.stop()
            res[f"lag-p3/{server}"] = measure.lag_summary(
                [str(OUT / f"lag-idle-{backend}-{server}-0.json")]
            )
        if wanted("stream"):
            # P4 on the default server (daphne).
            webs = webs_for(backend, "daphne", "stream", 1)
            try:
                attempt(
                    res,
                    "p4",
                    measure.p4_watcher,
                    backend,
                    webs[0],
                    sims,
                    data,
                    size("p4_runs"),
                    size("p4_watched"),
                    duration=20,
                    chunks=40,
                )
            finally:
                for w in webs:
                    w.stop()
            lag_files = [str(OUT / f"lag-stream-{backend}-daphne-0.json")]
            if watcher is not None:
                lag_files.append(str(OUT / f"lag-watcher-{backend}.json"))
                res["lag-watcher"] = measure.lag_summary(lag_files[-1:])
            res["lag-p4"] = measure.lag_summary(lag_files)
        if watcher is not None:
            watcher.stop()
            watcher = None
        if wanted("list"):
            # P5 and the list rps: a seeded team of size("p5_big") runs next to one of 1,000.
            attempt(res, "p5/seed", seed, backend, size("p5_big"))
            seeded: dict[str, Any] = res["p5/seed"]
            for server in SERVERS:
                web = Server(f"list-{backend}-{server}", backend, server=server, watcher=False)
                try:
                    attempt(
                        res,
                        f"p5/{server}",
                        measure.p5_list,
                        web,
                        seeded,
                        size("p5_requests"),
                    )
                    attempt(
                        res,
                        f"rps/{server}",
                        measure.list_rps,
                        web,
                        seeded,
                        size("rps_seconds"),
                    )
                finally:
                    web.stop()
    finally:
        if watcher is not None:
            watcher.stop()
        for s in sims:
            s.stop()
    return res


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
    backends = os.environ.get("BENCH_BACKENDS", "sqlite,postgres").split(",")
    results: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "BENCH_QUICK=1 make bench" if QUICK else "make bench",
        "quick": QUICK,
        "sizes": {k: size(k) for k in SIZES},
    }
    # BENCH_BASE=<results.json>: re-measure some rows (BENCH_ONLY) on top of an earlier run.
    base = os.environ.get("BENCH_BASE")
    if base:
        earlier = json.loads(Path(base).read_text())
        results = {**earlier, "date": results["date"], "machine": results["machine"]}
        results["remeasured"] = sorted(ONLY) or ["everything"]
    for backend in backends:
        log(f"backend {backend}")
        results[backend] = {**results.get(backend, {}), **bench_backend(backend)}
    results["seconds"] = round(time.monotonic() - started) + (
        results.get("seconds", 0) if base else 0
    )
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    target = ROOT / "docs" / "PERFORMANCE.md"
    write_report(results, target)
    log(f"wrote {target} and {OUT / 'results.json'} in {results['seconds']} s")


if __name__ == "__main__":
    main()
