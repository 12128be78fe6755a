"""The cast (alice owns Acme, bob is her teammate, carol watches, mallory is in Globex) and
real servers: provider simulators in a subprocess, reached over real sockets."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A Runbrake process (`manage.py serve`) on its own port, stopped for sure at the end."""

    def __init__(
        self,
        *,
        watcher: bool,
        env: dict[str, str] | None = None,
        server: str = "daphne",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each server's simulated providers keep their state (Fay's registered webhooks) to
        # themselves, as separate services would.
        self.state_dir = tempfile.mkdtemp(prefix="runbrake-sim-")
        # The simulators' request log is the tests' view of what reached a provider.
        self.inspect_token = secrets.token_urlsafe(16)
        full_env = {
            **os.environ,
            "RUNBRAKE_EMBEDDED_WATCHER": "true" if watcher else "false",
            "RUNBRAKE_SIM_STATE_DIR": self.state_dir,
            "RUNBRAKE_SIM_INSPECT_TOKEN": self.inspect_token,
        }
        full_env.update(env or {})
        self.log = open(ROOT / f".server-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--server", server, "--port", str(self.port)]
            + ([] if watcher else ["--no-watcher"]),
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/sim/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def requests(self, provider: str = "fay") -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.url}/sim/requests?provider={provider}",
            headers={"X-Sim-Inspect-Token": self.inspect_token},
        )
        with urllib.request.urlopen(request) as r:
            return json.load(r)["requests"]

    def stop_calls(self, external_id: str, provider: str = "fay") -> list[dict[str, Any]]:
        return [
            r
            for r in self.requests(provider)
            if r["method"] == "POST" and r["path"].endswith(f"/{external_id}/stop")
        ]

    def close(self) -> None:
        # daphne sometimes ignores SIGTERM after load: escalate to SIGKILL.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def database_url(vendor: str, settings_dict: dict[str, Any]) -> str:
    """A DATABASE_URL for the test database, as the server subprocess must open it."""
    s = settings_dict
    if vendor == "sqlite":
        name = str(s["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise RuntimeError("Browser tests need a file-backed SQLite test database.")
        return f"sqlite:///{Path(name).resolve()}"
    if vendor == "postgresql":
        user = quote(str(s.get("USER") or ""), safe="")
        password = quote(str(s.get("PASSWORD") or ""), safe="")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = quote(str(s.get("HOST") or ""), safe="")
        port = f":{s['PORT']}" if s.get("PORT") else ""
        url = f"postgres://{auth}{host}{port}/{quote(str(s['NAME']), safe='')}"
        options = {k: v for k, v in (s.get("OPTIONS") or {}).items() if isinstance(v, str)}
        return f"{url}?{urlencode(options)}" if options else url
    raise RuntimeError(f"No DATABASE_URL recipe for the {vendor} backend.")


class WatcherProcess:
    """A `manage.py runwatcher` process, stopped for sure at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = open(ROOT / f".watcher-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "runwatcher"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while " running" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"watcher did not start:\n{self.output()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


SIM_BASE = {
    "fay": "/sim/fay/api/v1",
    "dify": "/sim/dify/v1",
    "intelligencebox": "/sim/intelligencebox",
    "xpander": "/sim/xpander",
}


def sim_account(team: Any, sim: Server, kind: str) -> Any:
    """A provider account of `kind` for `team`, pointing at the simulator."""
    from runs.models import ProviderAccount

    return ProviderAccount.objects.create(
        team=team,
        kind=kind,
        name=kind,
        base_url=sim.url + SIM_BASE[kind],
        api_key=f"sim-acme-{kind}",
        options={"agent_id": "agent-demo"} if kind == "xpander" else {},
    )


@pytest.fixture(scope="session")
def sim() -> Iterator[Server]:
    server = Server(watcher=False)
    yield server
    server.close()


@pytest.fixture
def fay_url(sim: Server) -> str:
    return f"{sim.url}/sim/fay/api/v1"


# --- The cast ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_rate_limits() -> None:
    """Each test starts with no launches, stops or logins counted: users of different tests
    share ids, and the limits' windows outlive a test (in memory, or in Redis scaled out)."""
    from django.conf import settings as django_settings
    from django.core.cache import cache

    if django_settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(django_settings.REDIS_URL)
        # Only this run's keys: parallel workers share the Redis, each with its own prefix.
        mine = f"{django_settings.RUNBRAKE_REDIS_PREFIX}:*:rl:*"
        keys = list(client.scan_iter(match=mine, count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    else:
        cache.clear()


@pytest.fixture(autouse=True)
def _fast_passwords(settings: Any) -> None:
    # Real hashing costs ~0.3 s a user on a busy 2-core machine; tests need no strength.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def password() -> str:
    return "correct-horse-battery"


@pytest.fixture
def acme(db: Any) -> Any:
    from runs.models import Team

    return Team.objects.create(name="Acme Research")


@pytest.fixture
def globex(db: Any) -> Any:
    from runs.models import Team

    return Team.objects.create(name="Globex")


def _member(team: Any, username: str, role: str, password: str) -> Any:
    from django.contrib.auth import get_user_model

    from runs.models import Membership

    user = get_user_model().objects.create_user(username, password=password)
    Membership.objects.create(team=team, user=user, role=role)
    return user


@pytest.fixture
def alice(acme: Any, password: str) -> Any:
    return _member(acme, "alice", "admin", password)


@pytest.fixture
def bob(acme: Any, password: str) -> Any:
    return _member(acme, "bob", "member", password)


@pytest.fixture
def carol(acme: Any, password: str) -> Any:
    return _member(acme, "carol", "viewer", password)


@pytest.fixture
def mallory(globex: Any, password: str) -> Any:
    return _member(globex, "mallory", "admin", password)


@pytest.fixture
def fay_account(acme: Any, fay_url: str) -> Any:
    from runs.models import ProviderAccount

    return ProviderAccount.objects.create(
        team=acme,
        kind="fay",
        name="Fay",
        base_url=fay_url,
        api_key="sim-acme-fay-key",
        options={"poll_interval": 0.1},
    )


@pytest.fixture
def globex_account(globex: Any, fay_url: str) -> Any:
    from runs.models import ProviderAccount

    return ProviderAccount.objects.create(
        team=globex,
        kind="fay",
        name="Fay",
        base_url=fay_url,
        api_key="sim-globex-fay-key",
        options={"poll_interval": 0.1},
    )


@pytest.fixture
def launch(bob: Any, fay_account: Any) -> Any:
    """Launch a run as bob on Acme's Fay account (nothing is sent until a watcher runs)."""
    from runs.models import Run

    def _launch(
        prompt: str = "Best AI book editors? sim:pending=0 sim:duration=30",
        user: Any = None,
        account: Any = None,
        **options: Any,
    ) -> Run:
        return Run.objects.launch(
            account=account or fay_account,
            user=user or bob,
            prompt=prompt,
            options=options,
            timeout_seconds=600,
        )

    return _launch


def start_at_provider(run: Any) -> Any:
    """Send the run's create call (as the watcher would) and record the provider's id."""
    from asgiref.sync import async_to_sync

    async def create() -> str:
        provider = run.provider_account.provider()
        events = provider.run(run.prompt, run.options)
        try:
            started = await anext(events)
        finally:
            await events.aclose()
        return started.external_id

    run.record_external_id(async_to_sync(create)())
    run.mark_running("PROCESSING")
    return run


@pytest.fixture
def replay() -> Iterator[Any]:
    """A loopback server replaying wire sequences from the providers' sources (tests/wire.py)."""
    from tests.wire import replay as serve

    yield from serve()
