"""The chaos soak (issue 15): the scaled topology on this machine under mixed faults, with a
history of everything clients did and providers received, checked once the system is quiet.

    make chaos                       # 30 minutes (CHAOS_SECONDS), a random seed (printed)
    make chaos-short                 # the CI version: fixed seed, ~2.5 minutes in all
    CHAOS_SEED=1234 make chaos       # replay a schedule

Everything runs on private ports: its own PostgreSQL cluster (initdb into CHAOS_OUT) and
its own redis-server, two web and two watcher processes, and each provider simulator in a
process of its own (simulators/standalone.py, which keeps a request log on disk). Clients
launch runs on the four providers with a mix of `sim:` behaviours, stop them from several API
tokens and in bulk, and watch team lists and run pages over websockets, reconnecting when cut.
A seeded fault schedule kills, pauses and restarts processes, restarts Redis and PostgreSQL,
kills simulators and adds latency to their answers. At the end the faults stop, every process
is back, and once no run is in flight the history goes to bench/chaos_check.py.

Knobs: CHAOS_SECONDS (workload time, default 1800), CHAOS_SEED, CHAOS_OUT (default
/tmp/chaos-out), CHAOS_BREAK (a deliberate bug for the checker to find; see
bench/chaos_break/sitecustomize.py), CHAOS_QUIET_SECONDS (how long to wait for the system to
settle, default 240). Exit status 1 when an invariant broke, 2 when the soak itself failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_check
from ws_clients import parse as parse_frame

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
OUT = Path(os.environ.get("CHAOS_OUT", "/tmp/chaos-out"))
SECONDS = float(os.environ.get("CHAOS_SECONDS", "1800"))
SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 10**6))
QUIET_SECONDS = float(os.environ.get("CHAOS_QUIET_SECONDS", "240"))
BREAK = os.environ.get("CHAOS_BREAK", "")
PG_BIN = Path(os.environ.get("CHAOS_PG_BIN", "/usr/lib/postgresql/15/bin"))
ORIGIN = "http://127.0.0.1"
SIM_TOKEN = "chaos-sim-inspect-token"
FERNET = "Y2hhb3Mtb25seS1rZXktbm90LWZvci1wcm9kdWN0ISE="
PROVIDERS = ("fay", "intelligencebox", "dify", "xpander")
SIM_PATH = {
    "fay": "/sim/fay/api/v1",
    "intelligencebox": "/sim/intelligencebox",
    "dify": "/sim/dify/v1",
    "xpander": "/sim/xpander",
}
# Run lengths stay short so hundreds finish in a soak; the timeout ends what a lost provider
# would otherwise leave running.
RUN_TIMEOUT = 45
FAULT_KINDS = (
    "process_kill",
    "pause",
    "redis_restart",
    "pg_restart",
    "sim_kill",
    "latency",
)
STATUS_HTML = re.compile(
    r'id="run-(?:row|status)-(\d+)" (?:class="[^"]*" )?data-version="(\d+)" data-status="(\w+)"'
)
STARTED = time.time()


def log(msg: str) -> None:
    print(f"[chaos {time.time() - STARTED:7.1f}s] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Processes ----------------------------------------------------------------------------


class Proc:
    """A child process that can be killed, paused and started again with the same command."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int = 0) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = OUT / "logs" / f"{name}.log"
        self.lock = asyncio.Lock()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            out.write(f"\n=== start {time.time():.3f}\n")
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    async def wait_http(self, path: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=3) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{self.port}{path}")).status_code < 500:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Postgres:
    """A private cluster: initdb into OUT/pg (as the postgres user when we are root, since
    initdb refuses root), on its own port and socket directory."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.data = OUT / "pg"
        self.sockets = OUT / "pgsock"
        self.log_path = OUT / "logs" / "postgres.log"
        self.lock = asyncio.Lock()

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _ctl(self, *args: str, check: bool = True) -> None:
        argv = self._as_owner(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), *args]
        )
        subprocess.run(argv, check=check, stdout=subprocess.DEVNULL, timeout=120)

    def init(self) -> None:
        for path in (self.data, self.sockets):
            path.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(path, "postgres", "postgres")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        if os.geteuid() == 0:
            shutil.chown(self.log_path, "postgres", "postgres")
        subprocess.run(
            self._as_owner(
                [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            # fsync off: the machine does not crash here, only the server does (its writes are
            # in the OS cache). Commits stay synchronous, so a restart loses nothing acked.
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.sockets}'\nfsync = off\n"
                "full_page_writes = off\nmax_connections = 300\n"
            )

    def start(self) -> None:
        self._ctl("-w", "-t", "60", "start")

    def restart(self, mode: str) -> None:
        self._ctl("-w", "-t", "60", "-m", mode, "restart")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop", check=False)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/runbrake"


# --- The topology -------------------------------------------------------------------------


@dataclass
class Topology:
    pg: Postgres
    redis: Proc
    sims: dict[str, Proc]
    webs: list[Proc]
    watchers: list[Proc]
    env: dict[str, str]

    def processes(self) -> list[Proc]:
        return [*self.webs, *self.watchers, *self.sims.values()]


def product_env(pg: Postgres, redis_port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "DEBUG": "false",
        "SECRET_KEY": "chaos-secret-key-not-for-production-0123456789abcdef",
        "RUNBRAKE_ENCRYPTION_KEYS": FERNET,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "CSRF_TRUSTED_ORIGINS": ORIGIN,
        "SECURE_SSL_REDIRECT": "false",
        "RUNBRAKE_SIMULATORS": "false",
        "RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS": "true",
        "RUNBRAKE_EMBEDDED_WATCHER": "false",
        "RUNBRAKE_RATE_LAUNCH": "1000000/60",
        "RUNBRAKE_RATE_STOP": "1000000/60",
        "RUNBRAKE_RATE_LOGIN": "1000000/60",
        "DATABASE_URL": pg.url,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "PYTHONUNBUFFERED": "1",
    }
    if BREAK:
        # The deliberate bug lives in the harness, never in the product (see its docstring).
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "bench" / "chaos_break"), str(ROOT), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        env["CHAOS_BREAK"] = BREAK
    return env


def sim_env(base: dict[str, str], provider: str) -> dict[str, str]:
    env = {
        **base,
        "RUNBRAKE_SIMULATORS": "true",
        "RUNBRAKE_SIM_INSPECT_TOKEN": SIM_TOKEN,
        "RUNBRAKE_SIM_STATE_DIR": str(OUT / "sim-state"),
        "RUNBRAKE_SIM_LOG_FILE": str(OUT / f"sim-{provider}.jsonl"),
        # A simulator is a remote service: it shares nothing with the product.
        "DATABASE_URL": f"sqlite:///{OUT / 'sim.sqlite3'}",
        "REDIS_URL": "",
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
    }
    env.pop("PYTHONPATH", None)
    env.pop("CHAOS_BREAK", None)
    return env


def fresh_postgres() -> Postgres:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    OUT.chmod(0o755)
    pg = Postgres(free_port())
    pg.init()
    pg.start()
    subprocess.run(
        [
            PY,
            "-c",
            "import psycopg, sys; psycopg.connect(sys.argv[1], autocommit=True)"
            ".execute('CREATE DATABASE runbrake')",
            pg.url.rsplit("/", 1)[0] + "/postgres",
        ],
        check=True,
    )
    return pg


async def start_topology() -> Topology:
    pg = await asyncio.to_thread(fresh_postgres)
    log(f"PostgreSQL on {pg.port} ({pg.data})")
    redis_port = free_port()
    redis = Proc(
        "redis",
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        dict(os.environ),
        redis_port,
    )
    redis.start()
    log(f"Redis on {redis_port}")
    env = product_env(pg, redis_port)
    sims = {}
    for provider in PROVIDERS:
        port = free_port()
        sims[provider] = Proc(
            f"sim-{provider}",
            [
                PY,
                "-m",
                "uvicorn",
                "simulators.standalone:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            sim_env(env, provider),
            port,
        )
    # The simulators share nothing with the product: they start while the schema is made.
    for sim in sims.values():
        sim.start()
    await asyncio.to_thread(
        subprocess.run,
        [PY, "manage.py", "migrate", "--no-input", "-v0"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    webs = [
        Proc(
            f"web{i}",
            [PY, "manage.py", "serve", "--server", "uvicorn", "--port", str(port), "--no-watcher"],
            env,
            port,
        )
        for i, port in enumerate((free_port(), free_port()), 1)
    ]
    watchers = [Proc(f"watcher{i}", [PY, "manage.py", "runwatcher"], env) for i in (1, 2)]
    topo = Topology(pg, redis, sims, webs, watchers, env)
    for p in (*webs, *watchers):
        p.start()
    await asyncio.gather(
        *(s.wait_http("/sim/health") for s in sims.values()),
        *(w.wait_http("/healthz") for w in webs),
    )
    log("simulators " + ", ".join(f"{k}:{s.port}" for k, s in sims.items()))
    log(f"web {webs[0].port}, {webs[1].port}; watchers pid {[w.proc.pid for w in watchers]}")  # type: ignore[union-attr]
    return topo


async def ready(p: Proc) -> None:
    if p.name.startswith("sim-"):
        await p.wait_http("/sim/health")
    elif p.name.startswith("web"):
        await p.wait_http("/healthz")


def seed(topo: Topology) -> dict[str, Any]:
    sims = {k: f"http://127.0.0.1:{s.port}{SIM_PATH[k]}" for k, s in topo.sims.items()}
    done = subprocess.run(
        [PY, str(ROOT / "bench" / "chaos_setup.py"), json.dumps(sims)],
        cwd=ROOT,
        env=topo.env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"seeding failed:\n{done.stdout}\n{done.stderr}")
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


# --- The workload -------------------------------------------------------------------------

BEHAVIOURS: dict[str, list[str]] = {
    "fay": [
        "sim:pending=1 sim:duration={d}",
        "sim:pending=1 sim:duration={d} sim:fail=failed",
        "sim:pending=1 sim:duration={d} sim:fail=rate_limit",
        "sim:pending=1 sim:duration={d} sim:fail=server_error",
        "sim:pending=1 sim:duration={d} sim:stop=slow",
        "sim:pending=1 sim:duration={d} sim:stop=ignore sim:stop_delay=8",
        "sim:pending=1 sim:duration={d} sim:stop=error",
        "sim:pending=1 sim:duration={d} sim:stop=lose_first sim:stop_delay=8",
    ],
    "intelligencebox": [
        "sim:duration={d}",
        "sim:duration={d} sim:format=ui",
        "sim:duration={d} sim:fail=error",
        "sim:duration={d} sim:fail=rate_limit",
        "sim:duration={d} sim:stop=ignore",
        "sim:duration={d} sim:stop=slow",
        "sim:duration={d} sim:drop_stream",
    ],
    "dify": [
        "sim:duration={d}",
        "sim:duration={d} sim:fail=error",
        "sim:duration={d} sim:fail=rate_limit",
        "sim:duration={d} sim:fail=server_error",
        "sim:duration={d} sim:stop=ignore",
        "sim:duration={d} sim:stop=slow",
        "sim:duration={d} sim:drop_stream",
    ],
    "xpander": [
        "sim:duration={d}",
        "sim:duration={d} sim:fail=error",
        "sim:duration={d} sim:fail=rate_limit",
        "sim:duration={d} sim:stop=ignore",
        "sim:duration={d} sim:stop=slow",
        "sim:duration={d} sim:drop_stream",
    ],
}


@dataclass
class History:
    launches: list[dict[str, Any]] = field(default_factory=list)
    stops: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    viewers: list[Viewer] = field(default_factory=list)
    # Runs the clients know of: id -> provider, for stops and run-page viewers.
    runs: dict[int, str] = field(default_factory=dict)


class Viewer:
    """A live page (team list or run page) that reconnects with jittered backoff when cut,
    keeping per run the newest status it was shown (by data-version, as the page does)."""

    def __init__(self, name: str, kind: str, target: int, urls: list[str], cookie: str) -> None:
        self.name = name
        self.kind = kind
        self.target = target
        self.urls = urls
        self.cookie = cookie
        self.connected = False
        self.last_connect = 0.0
        self.seen: dict[int, tuple[str, int, float]] = {}
        self.versions: dict[int, int] = {}
        self.max_end: dict[int, int] = {}
        self.reconnects = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                async with connect(
                    url,
                    additional_headers={"Cookie": f"sessionid={self.cookie}", "Origin": ORIGIN},
                    open_timeout=15,
                    close_timeout=2,
                    max_size=2**22,
                ) as ws:
                    await self._read(ws, stop)
            except Exception:
                pass  # any cut is a reconnect, as in a browser
            self.connected = False
            if not stop.is_set():
                self.reconnects += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), random.uniform(0.3, 2.0))

    async def _read(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        first = True
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.recv(), 1.0)
            except TimeoutError:
                continue
            text = message if isinstance(message, str) else message.decode()
            if first:
                # What the page shows is rebuilt from this snapshot: forget the old page.
                first = False
                self.connected = True
                self.last_connect = time.time()
                self.seen = {}
                self.versions = {}
            self.take(text)

    def take(self, text: str) -> None:
        now = time.time()
        for run_id_s, version_s, status in STATUS_HTML.findall(text):
            run_id, version = int(run_id_s), int(version_s)
            if version >= self.versions.get(run_id, 0):
                self.versions[run_id] = version
                end = self.seen.get(run_id, ("", -1, 0.0))[1]
                self.seen[run_id] = (status, end, now)
        if self.kind == "run":
            _status, end = parse_frame(text, self.target)
            if end >= 0:
                self.max_end[self.target] = max(self.max_end.get(self.target, 0), end)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "target": self.target,
            "connected_at_end": self.connected,
            "last_connect": self.last_connect,
            "seen": {str(k): list(v) for k, v in self.seen.items()},
            "max_end": {str(k): v for k, v in self.max_end.items()},
            "reconnects": self.reconnects,
        }


class Workload:
    def __init__(self, topo: Topology, data: dict[str, Any], rng: random.Random) -> None:
        self.topo = topo
        self.data = data
        self.rng = rng
        self.history = History()
        self.stop_event = asyncio.Event()
        self.viewer_stop = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.serial = 0
        self.bases = [f"http://127.0.0.1:{w.port}" for w in topo.webs]
        self.ws_bases = [f"ws://127.0.0.1:{w.port}" for w in topo.webs]
        self.run_viewers = 0

    def base(self) -> str:
        return self.rng.choice(self.bases)

    async def start(self) -> None:
        team = self.data["team"]
        for i in range(2):
            urls = [f"{b}/ws/teams/{team}/" for b in self.ws_bases]
            urls = urls[i:] + urls[:i]
            self._viewer(f"team-viewer-{i}", "team", team, urls)
        for i in range(3):
            self.tasks.append(asyncio.create_task(self.launcher(i)))
        for i in range(2):
            self.tasks.append(asyncio.create_task(self.stopper(i)))
        self.tasks.append(asyncio.create_task(self.bulk_stopper()))

    def _viewer(self, name: str, kind: str, target: int, urls: list[str]) -> None:
        viewer = Viewer(name, kind, target, urls, self.rng.choice(self.data["cookies"]))
        viewer.task = asyncio.create_task(viewer.run(self.viewer_stop))
        self.history.viewers.append(viewer)

    async def launcher(self, index: int) -> None:
        token = self.data["tokens"][index % len(self.data["tokens"])]
        async with httpx.AsyncClient(timeout=20) as client:
            while not self.stop_event.is_set():
                await self.launch_one(client, token)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), self.rng.uniform(1.5, 4.5))

    async def launch_one(self, client: httpx.AsyncClient, token: str) -> None:
        self.serial += 1
        marker = f"chaos-L{self.serial}"
        provider = self.rng.choice(PROVIDERS)
        behaviour = self.rng.choice(BEHAVIOURS[provider]).format(d=self.rng.randint(3, 15))
        body = {
            "provider_account": self.data["accounts"][provider],
            "prompt": f"Soak run {marker}. {behaviour}",
            "timeout_seconds": RUN_TIMEOUT,
        }
        key = str(uuid.uuid4())
        # A client whose answer was lost (a web process killed under it) sends the same
        # launch again with the same key, until it gets an answer or gives up.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            base = self.base()
            at = time.time()
            entry: dict[str, Any] = {"marker": marker, "key": key, "t": at, "run": None}
            try:
                r = await client.post(
                    f"{base}/api/runs",
                    json=body,
                    headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
                )
                entry["http_status"] = r.status_code
                if r.status_code in (200, 201):
                    run_id = int(r.json()["id"])
                    entry["run"] = run_id
                    self.history.launches.append(entry)
                    self.history.runs[run_id] = provider
                    if self.rng.random() < 0.25:
                        self.run_viewers += 1
                        urls = [f"{b}/ws/runs/{run_id}/" for b in self.ws_bases]
                        self._viewer(f"run-viewer-{run_id}", "run", run_id, urls)
                    return
            except (httpx.HTTPError, ValueError) as exc:
                entry["http_status"] = None
                entry["error"] = type(exc).__name__
            self.history.launches.append(entry)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))

    async def stop_call(self, client: httpx.AsyncClient, token: str, run_id: int, via: str) -> None:
        at = time.time()
        entry: dict[str, Any] = {"run": run_id, "t": at, "via": via}
        try:
            r = await client.post(
                f"{self.base()}/api/runs/{run_id}/stop",
                json={"reason": f"chaos {via}"},
                headers={"Authorization": f"Bearer {token}"},
            )
            entry["http_status"] = r.status_code
            entry["answered_t"] = time.time()
            with contextlib.suppress(ValueError):
                entry["outcome"] = r.json().get("status") or r.json().get("error", {}).get("code")
        except httpx.HTTPError as exc:
            entry["http_status"] = None
            entry["error"] = type(exc).__name__
        self.history.stops.append(entry)

    async def stopper(self, index: int) -> None:
        tokens = self.data["tokens"]
        async with httpx.AsyncClient(timeout=30) as client:
            while not self.stop_event.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), self.rng.uniform(1.0, 3.0))
                recent = sorted(self.history.runs)[-12:]
                if not recent:
                    continue
                run_id = self.rng.choice(recent)
                if self.rng.random() < 0.2:
                    # Two clients at once (a double click, two tabs).
                    await asyncio.gather(
                        self.stop_call(client, tokens[0], run_id, "api-double"),
                        self.stop_call(client, tokens[-1], run_id, "api-double"),
                    )
                else:
                    await self.stop_call(client, tokens[index % len(tokens)], run_id, "api")

    async def bulk_stopper(self) -> None:
        token = self.data["tokens"][-1]
        async with httpx.AsyncClient(timeout=60) as client:
            while not self.stop_event.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), self.rng.uniform(8, 20))
                if self.stop_event.is_set():
                    return
                if self.rng.random() < 0.5:
                    ids = sorted(self.history.runs)[-8:]
                    if not ids:
                        continue
                    payload: dict[str, Any] = {"ids": ids}
                else:
                    payload = {"filter": {"provider": self.rng.choice(PROVIDERS)}}
                at = time.time()
                try:
                    r = await client.post(
                        f"{self.base()}/api/runs/stop",
                        json={**payload, "reason": "chaos bulk"},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    results = r.json().get("results", []) if r.status_code == 200 else []
                except (httpx.HTTPError, ValueError):
                    results = []
                for res in results:
                    ok = res.get("outcome") in ("stopped", "stopping", "unconfirmed")
                    self.history.stops.append(
                        {
                            "run": res["id"],
                            "t": at,
                            "via": "bulk",
                            "http_status": 200 if ok else None,
                            "outcome": res.get("outcome"),
                        }
                    )

    async def finish(self) -> None:
        self.stop_event.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# --- Faults -------------------------------------------------------------------------------


def schedule(rng: random.Random, seconds: float, topo: Topology) -> list[dict[str, Any]]:
    """Every kind of fault spread over the run (about one of each kind per 30 s, at least
    three of each), random but fixed by the seed."""
    plan: list[dict[str, Any]] = []
    window = max(10.0, seconds - 10)
    per_kind = max(3, round(seconds / 30))
    processes = [p.name for p in (*topo.webs, *topo.watchers)]
    for kind in FAULT_KINDS:
        for _ in range(per_kind):
            at = round(rng.uniform(5, window), 2)
            if kind == "process_kill":
                target = rng.choice(processes)
                length = round(rng.uniform(0.5, 3.0), 2)
            elif kind == "pause":
                target = rng.choice([*processes, *(f"sim-{p}" for p in PROVIDERS)])
                length = round(rng.uniform(2.0, 8.0), 2)
            elif kind in ("sim_kill", "latency"):
                target = rng.choice(PROVIDERS)
                seconds_off = rng.uniform(1.0, 4.0) if kind == "sim_kill" else rng.uniform(3, 15)
                length = round(seconds_off, 2)
            elif kind == "pg_restart":
                target = rng.choice(("fast", "immediate"))
                length = 0.0
            else:
                target = "redis"
                length = round(rng.uniform(0.5, 3.0), 2)
            extra = round(rng.uniform(0.3, 3.0), 2) if kind == "latency" else 0.0
            plan.append({"at": at, "kind": kind, "target": target, "length": length, "ms": extra})
    plan.sort(key=lambda f: f["at"])
    return plan


class Faults:
    def __init__(self, topo: Topology, history: History) -> None:
        self.topo = topo
        self.history = history
        self.by_name = {p.name: p for p in topo.processes()}

    async def run(self, plan: list[dict[str, Any]], began: float) -> None:
        pending = []
        for fault in plan:
            delay = began + fault["at"] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(self.inject(fault)))
        await asyncio.gather(*pending)

    async def inject(self, fault: dict[str, Any]) -> None:
        kind, target, length = fault["kind"], fault["target"], fault["length"]
        record = {"kind": kind, "target": target, "t": time.time(), "length": length}
        try:
            if kind in ("process_kill", "sim_kill"):
                proc = self.by_name[target if kind == "process_kill" else f"sim-{target}"]
                async with proc.lock:
                    record["t"] = time.time()
                    await asyncio.to_thread(proc.kill)
                    record["injected"] = True
                    await asyncio.sleep(length)
                    proc.start()
                    await ready(proc)
            elif kind == "pause":
                proc = self.by_name[target]
                async with proc.lock:
                    record["t"] = time.time()
                    proc.signal(signal.SIGSTOP)
                    record["injected"] = True
                    await asyncio.sleep(length)
                    proc.signal(signal.SIGCONT)
                if target.startswith("sim-"):
                    record["kind_detail"] = "pause_sim"
            elif kind == "redis_restart":
                async with self.topo.redis.lock:
                    record["t"] = time.time()
                    await asyncio.to_thread(self.topo.redis.stop)
                    record["injected"] = True
                    await asyncio.sleep(length)
                    self.topo.redis.start()
            elif kind == "pg_restart":
                async with self.topo.pg.lock:
                    record["t"] = time.time()
                    record["injected"] = True
                    await asyncio.to_thread(self.topo.pg.restart, target)
            elif kind == "latency":
                proc = self.by_name[f"sim-{target}"]
                record["injected"] = await self.latency(proc, fault["ms"])
                await asyncio.sleep(length)
                await self.latency(proc, 0)
        except Exception as exc:
            record["error"] = repr(exc)
            log(f"fault {kind} {target} failed: {exc!r}")
        record["until"] = time.time()
        self.history.faults.append(record)

    async def latency(self, proc: Proc, seconds: float) -> bool:
        """Whether the simulator took the setting (it may be down or paused just then)."""
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.post(
                    f"http://127.0.0.1:{proc.port}/chaos/latency?ms={round(seconds * 1000)}"
                )
                return r.status_code == 200
        except httpx.HTTPError:
            return False


async def heal(topo: Topology) -> None:
    """Every process back and answering, no latency left: the system may now settle."""
    for p in topo.processes():
        p.signal(signal.SIGCONT)
        if not p.alive():
            p.start()
    if not topo.redis.alive():
        topo.redis.start()
    await asyncio.gather(*(ready(p) for p in topo.processes()))
    async with httpx.AsyncClient(timeout=5) as client:
        for s in topo.sims.values():
            with contextlib.suppress(httpx.HTTPError):
                await client.post(f"http://127.0.0.1:{s.port}/chaos/latency?ms=0")


# --- Collecting the history ---------------------------------------------------------------


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(url) as conn:
                return list(conn.execute(sql).fetchall())
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def in_flight(url: str) -> int:
    rows = query(
        url, "SELECT count(*) FROM runs_run WHERE status IN ('pending', 'running', 'stopping')"
    )
    return int(rows[0][0])


def export_runs(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    runs = []
    for row in query(
        url,
        "SELECT id, team_id, status, provider, external_id, provider_refs, prompt, "
        "length(output), output_incomplete, proof, extract(epoch from created_at), error "
        "FROM runs_run ORDER BY id",
    ):
        (rid, team, status, provider, ext, refs, prompt, out_len, incomplete, proof, t, err) = row
        ids = [ext] + [v for v in (refs or {}).values() if isinstance(v, str)]
        found = chaos_check.MARKER.search(prompt)
        runs.append(
            {
                "id": rid,
                "team": team,
                "status": status,
                "provider": provider,
                "external_id": ext,
                "refs": [i for i in ids if i],
                "marker": found.group(0) if found else "",
                "prompt": prompt,
                "output_len": out_len or 0,
                "output_incomplete": incomplete,
                "proof": proof,
                "created_t": float(t),
                "error": err[:300],
            }
        )
    events = [
        {
            "id": eid,
            "run": run,
            "t": float(t),
            "kind": kind,
            "from": frm,
            "to": to,
            "channel": channel,
            "data": data,
        }
        for eid, run, t, kind, frm, to, channel, data in query(
            url,
            "SELECT id, run_id, extract(epoch from at), kind, from_status, to_status, channel, "
            "data FROM runs_runevent ORDER BY at, id",
        )
    ]
    return runs, events


def provider_requests() -> list[dict[str, Any]]:
    merged = []
    for provider in PROVIDERS:
        path = OUT / f"sim-{provider}.jsonl"
        if not path.exists():
            continue
        answers: dict[tuple[int, int], int] = {}
        requests = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a SIGKILL
            if entry["event"] == "answer":
                answers[(entry["pid"], entry["serial"])] = entry["status"]
            else:
                requests.append(entry)
        for r in requests:
            merged.append(
                {
                    "provider": provider,
                    "t": r["t"],
                    "method": r["method"],
                    "path": r["path"],
                    "body": r["body"],
                    "status": answers.get((r["pid"], r["serial"])),
                }
            )
    return merged


# --- Main ---------------------------------------------------------------------------------


async def soak() -> int:
    rng = random.Random(SEED)
    log(f"seed {SEED}; workload {SECONDS:g} s; out {OUT}" + (f"; BREAK={BREAK}" if BREAK else ""))
    topo = await start_topology()
    try:
        return await _soak(topo, rng)
    finally:
        for p in topo.processes():
            p.stop()
        topo.redis.stop()
        topo.pg.stop()


async def _soak(topo: Topology, rng: random.Random) -> int:
    data = seed(topo)
    plan = schedule(random.Random(rng.random()), SECONDS, topo)
    (OUT / "schedule.json").write_text(json.dumps({"seed": SEED, "faults": plan}, indent=1))
    log(f"fault schedule ({len(plan)} faults, {OUT / 'schedule.json'}):")
    for f in plan:
        log(f"  +{f['at']:7.2f}s {f['kind']:<14} {f['target']:<16} {f['length']:g}s")
    work = Workload(topo, data, random.Random(rng.random()))
    faults = Faults(topo, work.history)
    began = time.monotonic()
    await work.start()
    fault_task = asyncio.create_task(faults.run(plan, began))
    while time.monotonic() - began < SECONDS:
        await asyncio.sleep(min(30, max(0.1, SECONDS - (time.monotonic() - began))))
        log(
            f"{len(work.history.runs)} runs, {len(work.history.stops)} stops, "
            f"{len(work.history.faults)} faults so far"
        )
    log("workload over: clients finish, faults finish, every process comes back")
    await work.finish()
    await fault_task
    await heal(topo)
    deadline = time.monotonic() + QUIET_SECONDS
    while (left := await asyncio.to_thread(in_flight, topo.pg.url)) and time.monotonic() < deadline:
        log(f"waiting for {left} runs in flight")
        await asyncio.sleep(3)
    # The viewers settle too: each connected one has had the final pushes (or a snapshot);
    # polled with a deadline, then recorded as they are.
    runs, events = await asyncio.to_thread(export_runs, topo.pg.url)
    final = {r["id"]: r["status"] for r in runs}
    viewer_deadline = time.monotonic() + 30
    while time.monotonic() < viewer_deadline:
        behind = [
            v
            for v in work.history.viewers
            if not v.connected
            or any(final.get(rid) != s[0] for rid, s in v.seen.items())
            or (v.kind == "run" and v.seen.get(v.target, ("",))[0] != final.get(v.target))
        ]
        if not behind:
            break
        await asyncio.sleep(0.5)
    viewers = [v.record() for v in work.history.viewers]
    work.viewer_stop.set()
    await asyncio.gather(*(v.task for v in work.history.viewers if v.task), return_exceptions=True)
    runs, events = await asyncio.to_thread(export_runs, topo.pg.url)
    faults_out = []
    for f in work.history.faults:
        kind = f.get("kind_detail", f["kind"])
        target = f["target"]
        faults_out.append({**f, "kind": f["kind"], "detail": kind, "target": target})
    history = {
        "seed": SEED,
        "seconds": SECONDS,
        "break": BREAK,
        "runs": runs,
        "events": events,
        "provider_requests": provider_requests(),
        "launches": work.history.launches,
        "stops": work.history.stops,
        "viewers": viewers,
        "faults": _checker_faults(faults_out),
        "page_size": 25,
    }
    (OUT / "history.json").write_text(json.dumps(history, default=str))
    violations = chaos_check.check(history)
    result = chaos_check.summary(history, violations)
    result.update(
        seed=SEED,
        seconds=SECONDS,
        wall_seconds=round(time.time() - STARTED, 1),
        break_=BREAK,
        faults_injected=_fault_counts(work.history.faults),
        violations_list=[str(v) for v in violations[:200]],
    )
    (OUT / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    for v in violations[:50]:
        log(str(v))
    log(
        f"{'FAILED' if violations else 'passed'}: {result['runs']} runs, {result['stops']} stops, "
        f"{sum(result['faults_injected'].values())} faults; history in {OUT / 'history.json'}"
    )
    return 1 if violations else 0


def _fault_counts(faults: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in faults:
        if f.get("injected"):
            counts[f["kind"]] = counts.get(f["kind"], 0) + 1
    return dict(sorted(counts.items()))


def _checker_faults(faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checker's view: a paused simulator is a provider fault for its provider."""
    out = []
    for f in faults:
        entry = dict(f)
        if f.get("detail") == "pause_sim":
            entry["kind"] = "pause_sim"
            entry["target"] = f["target"].removeprefix("sim-")
        out.append(entry)
    return out


def main() -> int:
    try:
        return asyncio.run(soak())
    except Exception as exc:
        # Not 1: a soak that could not run has not found a broken invariant.
        log(f"the soak itself failed: {exc!r}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
