"""Fault 20: web and watcher writing at once on the embedded default (one `manage.py serve`
process with its watcher, a file SQLite database) while clients launch and stop runs through
the API concurrently. No "database is locked", no lost update: every run ends terminal with
exactly one terminal event, one stop request per stopped run, and output kept."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from runs.models import ApiToken, ProviderAccount, Run, RunEvent, Status
from tests.livekit import eventually, serve

pytestmark = pytest.mark.django_db(transaction=True)

KINDS = {"intelligencebox": "/sim/intelligencebox", "dify": "/sim/dify/v1"}
WORKERS = 6
ROUNDS = 6  # each worker launches this many runs and stops most of them
TERMINAL = {Status.STOPPED, Status.COMPLETED, Status.FAILED}


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the embedded default (SQLite) only")
async def test_launching_and_stopping_through_the_api_while_runs_stream(acme, bob, alice):
    server = await sync_to_async(serve)(
        env={"RUNBRAKE_RATE_LAUNCH": "1000/60", "RUNBRAKE_RATE_STOP": "1000/60"}
    )
    try:
        accounts = [
            await ProviderAccount.objects.acreate(
                team=acme, kind=kind, name=kind, base_url=server.url + base, api_key=f"sim-{kind}"
            )
            for kind, base in KINDS.items()
        ]
        tokens = [await sync_to_async(ApiToken.issue)(user) for user in (bob, alice)]
        launched: list[int] = []

        async def worker(n: int, http: httpx.AsyncClient) -> None:
            headers = {"Authorization": f"Bearer {tokens[n % 2]}"}
            for i in range(ROUNDS):
                # Short runs that stream output (watcher writes ~10 a second each); every
                # third one is left to complete, the others are stopped mid-stream.
                answer = await http.post(
                    "/api/runs",
                    headers=headers,
                    json={
                        "provider_account": accounts[(n + i) % 2].pk,
                        "prompt": f"soak {n}.{i} {uuid.uuid4().hex[:6]} "
                        "sim:pending=0 sim:duration=2 sim:chunks=60",
                    },
                )
                assert answer.status_code == 201, answer.text
                run_id = answer.json()["id"]
                launched.append(run_id)
                if i % 3 == 2:
                    continue
                # Stop once the watcher has it (or before: a stop before the id is saved too).
                for _ in range(200):
                    seen = await http.get(f"/api/runs/{run_id}", headers=headers)
                    assert seen.status_code == 200, seen.text
                    if seen.json()["output"] or i % 3 == 1:
                        break
                    await asyncio.sleep(0.02)
                stopped = await http.post(
                    f"/api/runs/{run_id}/stop", headers=headers, json={"reason": "soak"}
                )
                # 409: it completed before the stop landed, which is fine.
                assert stopped.status_code in (200, 409), stopped.text

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await asyncio.gather(*(worker(n, http) for n in range(WORKERS)))

        async def all_terminal() -> bool:
            done = await Run.objects.filter(pk__in=launched, status__in=TERMINAL).acount()
            return done == len(launched)

        await eventually(all_terminal, "every run terminal", timeout=45)
        assert len(launched) == WORKERS * ROUNDS
        async for run in Run.objects.filter(pk__in=launched):
            kinds = [
                k async for k in run.events.order_by("at", "id").values_list("kind", flat=True)
            ]
            terminal = [k for k in kinds if k in TERMINAL]
            assert terminal == [run.status], (run.pk, run.status, kinds)
            assert kinds[0] == RunEvent.Kind.CREATED, (run.pk, kinds)
            assert kinds.count(RunEvent.Kind.STOP_REQUESTED) == (1 if run.stop_requested_at else 0)
            if run.status == Status.STOPPED:
                assert run.stop_confirmed_at is not None, run.pk
            if run.status == Status.COMPLETED:
                assert run.output, run.pk
        statuses = {
            s async for s in Run.objects.filter(pk__in=launched).values_list("status", flat=True)
        }
        assert Status.STOPPED in statuses, statuses
        assert Status.COMPLETED in statuses, statuses
    finally:
        output = await sync_to_async(server.output)()
        server.close()
    assert "database is locked" not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
