"""Real processes, really killed: watchers as `manage.py runwatcher`, web processes as
`manage.py serve`, all on the test's database, with SIGKILL in the middle of their work.

- reliability.md fault 3: the process that recorded a stop dies with its call out; the stop
  is still carried out.
- fault 10: a watcher dies mid-stream; another takes its runs within a lease, follows them
  from where the provider is, and they still stop on request.
- issue 6: two web processes and two watchers on PostgreSQL + Redis; a viewer on one web
  process sees a stop made through the other.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client

from runs.models import ApiToken, Channel, ProviderAccount, Run, Status
from tests.conftest import Server, WatcherProcess, database_url, sim_account

pytestmark = pytest.mark.django_db(transaction=True)

# Fast clocks so a lapsed lease or a stop lease is seconds, not minutes.
FAST = {
    "RUNBRAKE_WATCHER_TICK": "0.2",
    "RUNBRAKE_WATCHER_LEASE_SECONDS": "3",
    "RUNBRAKE_STOP_CALL_TIMEOUT": "3",
    "RUNBRAKE_STOP_RECHECK_SECONDS": "1",
}


@pytest.fixture
def env() -> dict[str, str]:
    from django.db import connection

    return {"DATABASE_URL": database_url(connection.vendor, connection.settings_dict), **FAST}


@pytest.fixture
def spawn(env: dict[str, str]) -> Iterator[Callable[..., Any]]:
    started: list[Server | WatcherProcess] = []

    def _spawn(kind: str, **extra: str) -> Any:
        full = {**env, **extra}
        process: Server | WatcherProcess = (
            WatcherProcess(full) if kind == "watcher" else Server(watcher=False, env=full)
        )
        started.append(process)
        return process

    yield _spawn
    for process in started:
        process.close()


def launch(account: ProviderAccount, user: Any, prompt: str) -> Run:
    return Run.objects.launch(
        account=account, user=user, prompt=prompt, options={}, timeout_seconds=600
    )


def wait_until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def holder_pid(run: Run) -> int | None:
    run.refresh_from_db(fields=["watched_by"])
    parts = run.watched_by.split(":")
    return int(parts[1]) if len(parts) == 3 else None


def api(server: Server, token: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        server.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def stop_calls(sim: Server, kind: str, run: Run) -> list[dict[str, Any]]:
    suffix = {"fay": f"/{run.external_id}/stop", "dify": f"/{run.external_id}/stop"}.get(
        kind, "/stop"
    )
    return [
        r
        for r in sim.requests(kind)
        if r["method"] == "POST"
        and r["path"].endswith(suffix)
        and (kind != "xpander" or run.external_id in r["path"])
    ]


def test_a_watcher_killed_mid_stream_hands_its_runs_to_another_that_still_stops_them(
    spawn, acme, bob, sim
):
    first, second = spawn("watcher"), spawn("watcher")
    accounts = [sim_account(acme, sim, "dify"), sim_account(acme, sim, "xpander")]
    runs = [
        launch(accounts[i % 2], bob, f"handover {i} {uuid.uuid4().hex[:8]} sim:duration=120")
        for i in range(6)
    ]

    def all_streaming() -> bool:
        for run in runs:
            run.refresh_from_db()
            if run.status != Status.RUNNING or not run.output or not run.watched_by:
                return False
        return True

    wait_until(all_streaming, "every run streaming under a watcher")
    by_pid: dict[int | None, list[Run]] = {}
    for run in runs:
        by_pid.setdefault(holder_pid(run), []).append(run)
    assert set(by_pid) <= {first.pid, second.pid}, "a run is held by no live watcher"
    victim, survivor = (first, second) if len(by_pid.get(first.pid, [])) else (second, first)
    orphaned = by_pid[victim.pid]

    victim.proc.kill()
    victim.proc.wait(timeout=10)
    seen = {run.pk: len(run.output) for run in orphaned}

    def taken_over_and_followed() -> bool:
        # Dify's history shows no answer until the reply ends, so a Dify run followed through
        # it shows Dify's "generating" (a run the survivor re-attached to, not the old stream).
        for run in orphaned:
            run.refresh_from_db()
            if holder_pid(run) != survivor.pid:
                return False
            if run.provider == "dify" and run.provider_status != "generating":
                return False
        return True

    try:
        wait_until(taken_over_and_followed, "the survivor to follow the dead watcher's runs")
    except AssertionError:
        states = [(r.pk, r.provider, r.status, r.watched_by, len(r.output)) for r in orphaned]
        raise AssertionError(f"{states} {seen}\n{survivor.output()[-3000:]}") from None

    for run in runs:
        outcome = _stop(run, bob)
        assert outcome.requested, outcome

    def all_stopped() -> bool:
        for run in runs:
            run.refresh_from_db()
            if run.status != Status.STOPPED:
                return False
        return True

    wait_until(all_stopped, "every run STOPPED")
    for run in runs:
        creates = [
            r
            for r in sim.requests(run.provider)
            if r["method"] == "POST" and r["body"] and run.prompt in json.dumps(r["body"])
        ]
        assert len(creates) == 1, f"run {run.pk} was started {len(creates)} times"
        assert run.stop_confirmation, run.pk


def _stop(run: Run, user: Any) -> Any:
    from asgiref.sync import async_to_sync

    return async_to_sync(run.astop)(actor=user, channel=Channel.API)


def test_a_stop_whose_process_died_with_the_call_out_is_sent_again(spawn, acme, bob, sim):
    """Fault 3: the web process records the stop and sends it; the provider swallows that
    call and the process is killed before any answer. The durable record is what counts:
    a watcher sends the stop again once the dead caller's lease on the call lapses."""
    web = spawn("web")
    spawn("watcher")
    account = sim_account(acme, sim, "fay")
    prompt = f"durable {uuid.uuid4().hex[:8]} sim:pending=0 sim:duration=120 sim:stop=lose_first"
    run = launch(account, bob, prompt)
    token = ApiToken.issue(bob)
    wait_until(
        lambda: Run.objects.filter(pk=run.pk, status=Status.RUNNING).exists(), "the run RUNNING"
    )
    run.refresh_from_db()

    answer: dict[str, Any] = {}

    def press_stop() -> None:
        try:
            answer["body"] = api(web, token, "POST", f"/api/runs/{run.pk}/stop", {})
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            answer["error"] = exc

    caller = threading.Thread(target=press_stop, daemon=True)
    caller.start()
    wait_until(lambda: stop_calls(sim, "fay", run), "the first stop call to reach Fay")
    web.proc.kill()
    web.proc.wait(timeout=10)
    caller.join(timeout=10)
    assert "error" in answer, "the web process answered although it was killed"

    run.refresh_from_db()
    assert run.status == Status.STOPPING, "the stop was not recorded before the call"

    wait_until(
        lambda: Run.objects.filter(pk=run.pk, status=Status.STOPPED).exists(),
        "the stop to be carried out by the watcher",
    )
    run.refresh_from_db()
    assert len(stop_calls(sim, "fay", run)) == 2
    assert run.stop_attempts == 2
    assert "stop answer" in run.stop_confirmation


@pytest.mark.skipif(
    not os.environ.get("REDIS_URL"), reason="needs Redis (the scaled topology); CI runs it"
)
def test_two_web_processes_and_two_watchers_a_stop_through_one_reaches_a_viewer_on_the_other(
    spawn, acme, alice, bob, sim
):
    from websockets.sync.client import connect

    a, b = spawn("web"), spawn("web")
    spawn("watcher")
    spawn("watcher")
    account = sim_account(acme, sim, "dify")
    token = ApiToken.issue(bob)
    created = api(
        b,
        token,
        "POST",
        "/api/runs",
        {"provider_account": account.pk, "prompt": f"scaled {uuid.uuid4()} sim:duration=120"},
    )
    run = Run.objects.get(pk=created["id"])
    wait_until(
        lambda: Run.objects.filter(pk=run.pk, status=Status.RUNNING).exclude(output="").exists(),
        "the run streaming",
    )

    viewer = Client()
    viewer.force_login(alice)
    cookie = f"sessionid={viewer.cookies['sessionid'].value}"
    ws_url = a.url.replace("http://", "ws://") + f"/ws/runs/{run.pk}/"
    with connect(ws_url, additional_headers={"Cookie": cookie, "Origin": a.url}) as socket:
        snapshot = socket.recv(timeout=10)
        assert 'data-status="running"' in snapshot

        stopped = api(b, token, "POST", f"/api/runs/{run.pk}/stop", {})
        assert stopped["status"] in {"stopping", "stopped"}

        deadline = time.monotonic() + 20
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the viewer on process A never saw STOPPED"
            message = socket.recv(timeout=remaining)
            if 'data-status="stopped"' in message:
                break


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_a_web_process_stopped_with_sigterm_hands_its_embedded_watchers_runs_back(
    server, env, acme, bob, sim
):
    """Graceful shutdown: the embedded watcher releases its runs on SIGTERM (daphne through a
    reactor shutdown trigger, uvicorn through the ASGI lifespan), so the next process takes
    them at once instead of after the lease; the runs keep going at the provider."""
    web = Server(watcher=True, env=env, server=server)
    try:
        account = sim_account(acme, sim, "dify")
        run = launch(account, bob, f"handback {uuid.uuid4().hex[:8]} sim:duration=120")
        wait_until(
            lambda: (
                holder_pid(run) == web.pid
                and Run.objects.filter(pk=run.pk, status=Status.RUNNING).exclude(output="").exists()
            ),
            "the web process's watcher to stream the run",
        )
        web.proc.send_signal(signal.SIGTERM)
        assert web.proc.wait(timeout=20) is not None
    finally:
        web.close()
    run.refresh_from_db()
    assert run.status == Status.RUNNING
    assert run.watched_by == "", "the run was not handed back"
    assert run.watch_lease_until is None


def test_a_watcher_stopped_while_its_start_call_is_out_waits_for_the_id_then_hands_over(
    spawn, acme, bob, sim
):
    """SIGTERM while a start call is waiting for the provider's answer: the watcher keeps its
    lease, records the id when the answer comes, and only then hands the run over, so the
    run is neither lost (marked failed) nor started twice."""
    first, second = spawn("watcher"), spawn("watcher")
    account = sim_account(acme, sim, "dify")
    # Dify names the run in its first stream event, which comes after sim:delay.
    run = launch(account, bob, f"slowstart {uuid.uuid4().hex[:8]} sim:delay=4 sim:duration=60")
    wait_until(
        lambda: Run.objects.filter(pk=run.pk, start_attempted_at__isnull=False).exists(),
        "the start call to go out",
    )
    holder = first if holder_pid(run) == first.pid else second
    other = second if holder is first else first
    holder.proc.send_signal(signal.SIGTERM)
    assert holder.proc.wait(timeout=30) == 0
    run.refresh_from_db()
    assert run.external_id, "the shutting-down watcher did not wait for the provider's id"
    assert run.status in (Status.PENDING, Status.RUNNING), run.status
    # Dify's history shows no answer until the reply ends: the follower says "generating".
    wait_until(
        lambda: (
            holder_pid(run) == other.pid
            and Run.objects.filter(pk=run.pk, provider_status="generating").exists()
        ),
        "the other watcher to follow the run",
    )
    creates = [r for r in sim.requests("dify") if r["body"] and run.prompt in json.dumps(r["body"])]
    assert len(creates) == 1
