"""What every bench script shares: the two backends' environments, the tree being measured
(this checkout, or a BENCH_BEFORE checkout of an older commit), server processes that are
stopped for sure, percentiles, and the machine's facts. Loopback only; everything bounded."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
OUT = Path(os.environ.get("BENCH_OUT", "/tmp/bench-out"))
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0", "false")
ORIGIN = "http://127.0.0.1"
# The bench reads the simulators' request log (when each stop reached the provider).
SIM_INSPECT_TOKEN = "bench-sim-inspect-token"
# A fixed development-only Fernet key: bench data is throwaway.
BENCH_FERNET = "YmVuY2gtb25seS1rZXktbm90LWZvci1wcm9kdWN0ISE="
# Where the bench's data lives: a PostgreSQL database per measured tree (named from this) and
# one Redis database, flushed between trees. Several checkouts on one machine pick their own.
# Pub/sub channels are shared by every database of a Redis server: a bench beside a test suite
# that uses Redis wants a server of its own (BENCH_REDIS_PORT).
PG_DB = os.environ.get("BENCH_PG_DB", "bench_main")
REDIS_DB = os.environ.get("BENCH_REDIS_DB", "2")
REDIS_PORT = os.environ.get("BENCH_REDIS_PORT", "6379")
PG_URL = "postgres://postgres@127.0.0.1:5432/"
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/{REDIS_DB}"

BACKENDS = {
    "sqlite": {"label": "embedded (SQLite, in-memory channel layer)"},
    "postgres": {"label": "PostgreSQL + Redis (channels-redis pub/sub)"},
}


@dataclass
class Tree:
    """The checkout being measured: its manage.py, simulators and migrations serve every
    row; the bench code, the venv and the load generators are always this checkout's."""

    name: str  # "after" (this checkout) or "before" (BENCH_BEFORE)
    root: Path
    label: str

    @property
    def pg_db(self) -> str:
        return PG_DB if self.name == "after" else f"{PG_DB}_{self.name}"

    @property
    def sqlite_path(self) -> Path:
        return OUT / f"bench-{self.name}.sqlite3"

    def database_url(self, backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{self.sqlite_path}"
        return PG_URL + self.pg_db


_tree = Tree("after", ROOT, "this checkout")


def tree() -> Tree:
    return _tree


def use_tree(t: Tree) -> None:
    global _tree
    _tree = t


def env_for(backend: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DEBUG": "false",
        "SECRET_KEY": "bench-secret-key-not-for-production-0123456789abcdef",
        "RUNBRAKE_ENCRYPTION_KEYS": BENCH_FERNET,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "CSRF_TRUSTED_ORIGINS": ORIGIN,
        "SECURE_SSL_REDIRECT": "false",
        "RUNBRAKE_SIMULATORS": "true",
        "RUNBRAKE_SIM_INSPECT_TOKEN": SIM_INSPECT_TOKEN,
        "RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS": "true",
        "RUNBRAKE_RATE_LAUNCH": "1000000/60",
        "RUNBRAKE_RATE_STOP": "1000000/60",
        "RUNBRAKE_RATE_LOGIN": "1000000/60",
        "DATABASE_URL": _tree.database_url(backend),
        "REDIS_URL": REDIS_URL if backend == "postgres" else "",
        # setup_data.py and chunks.py import the measured tree's code.
        "BENCH_APP": str(_tree.root),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def raise_nofile(limit: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process (server, watcher, load generator) that is always stopped at the end;
    daphne sometimes ignores SIGTERM after load, so stopping escalates to SIGKILL. Servers and
    watchers run in the measured tree; the bench's own scripts pass cwd=ROOT."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = OUT / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, cwd=cwd or _tree.root, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self.log.close()


class Server(Proc):
    """`manage.py serve` of the measured tree. server=None serves with the tree's own default
    (what `make run` starts); `self.server` is then read from its banner."""

    def __init__(
        self,
        name: str,
        backend: str,
        *,
        server: str | None = None,
        watcher: bool = False,
        lag_file: str = "",
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lag_file = lag_file
        argv = [PY, "manage.py", "serve", "--port", str(self.port)]
        if server:
            argv += ["--server", server]
        if not watcher:
            argv.append("--no-watcher")
        if lag_file:
            argv += ["--loop-lag-file", lag_file]
        env = env_for(
            backend,
            RUNBRAKE_EMBEDDED_WATCHER="true" if watcher else "false",
            **(extra_env or {}),
        )
        super().__init__(name, argv, env)
        self.asked = server
        self.server = server or "default"
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait until it answers (several can start at once: `wait=False`, then this)."""
        self.wait_ready()
        self.server = self.asked or self._banner_server()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/sim/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start in {timeout} s:\n{self.tail()}")

    def _banner_server(self) -> str:
        for _ in range(50):
            for name in ("daphne", "uvicorn"):
                if f"({name})" in self.tail(200):
                    return name
            time.sleep(0.1)
        return "default"

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMark:
    """How many cores each process kept busy from now until `cores()`."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.start = {name: sum(cpu_seconds(p) for p in ps) for name, ps in pids.items()}

    def cores(self) -> dict[str, float]:
        wall = max(1e-6, time.monotonic() - self.started)
        return {
            name: round((sum(cpu_seconds(p) for p in ps) - self.start[name]) / wall, 2)
            for name, ps in self.pids.items()
        }


def script(backend: str, path: str, *args: str, timeout: float = 900) -> Any:
    """Run a bench script (this checkout's) against the measured tree, in its own process;
    it prints one JSON document last."""
    done = subprocess.run(
        [PY, str(ROOT / path), *args],
        cwd=_tree.root,
        env=env_for(backend),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{path} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class LagMark:
    """The event-loop lag samples a process wrote (`--loop-lag-file`) from now on: the file
    holds every sample since the process started, so a phase is a slice of it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = len(read_lag(path))

    def samples(self) -> list[float]:
        return read_lag(self.path)[self.start :]


def lag_since(marks: dict[str, LagMark]) -> dict[str, dict[str, float]]:
    """Each process's event-loop lag since its mark (a phase)."""
    # The probe writes once a second: wait for the phase's last samples to be written.
    time.sleep(1.1)
    return {name: summary(m.samples()) for name, m in marks.items()}


def pct(values: Iterable[float], p: float) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(pct(values, 50), 2),
        "p95": round(pct(values, 95), 2),
        "p99": round(pct(values, 99), 2),
        "max": round(max(values), 2) if values else float("nan"),
    }


def read_lag(path: str | Path) -> list[float]:
    try:
        return [float(v) for v in json.loads(Path(path).read_text())]
    except (OSError, ValueError):
        return []


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
