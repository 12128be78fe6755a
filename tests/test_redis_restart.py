"""Fault 6: Redis restarted during a run (scaled out: PostgreSQL + Redis). The server keeps
serving, a stop made while Redis is down still works, and every viewer ends with the final
state: a private redis-server (the machine's own is shared) is killed mid-run and restarted
on the same port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async

from runs.models import ApiToken, Run, Status
from tests.conftest import free_port, sim_account
from tests.livekit import eventually, open_socket, serve
from tests.test_push_burst import ListView

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="scaled out only (REDIS_URL)"),
]


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )

    def up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(7) == b"+PONG\r\n"
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.kill()


async def test_a_redis_restart_mid_run_ends_with_every_viewer_seeing_the_stop(
    redis: PrivateRedis, acme: Any, alice: Any, bob: Any
) -> None:
    await eventually(redis.up, "the private redis-server")
    server = await sync_to_async(serve)(env={"REDIS_URL": redis.url})
    sockets = AsyncExitStack()  # closed in `finally`, before the server
    try:
        account = await sync_to_async(sim_account)(acme, server, "intelligencebox")
        run = await sync_to_async(Run.objects.launch)(
            account=account,
            user=bob,
            prompt=f"{uuid.uuid4().hex[:6]} sim:pending=0 sim:duration=60",
            options={},
            timeout_seconds=600,
        )
        detail = await sockets.enter_async_context(
            await open_socket(server, f"/ws/runs/{run.pk}/", alice)
        )
        details: list[str] = []

        async def read_detail() -> None:
            async for message in detail:
                details.append(message)

        detail_task = asyncio.create_task(read_detail())
        listing = ListView(
            await sockets.enter_async_context(
                await open_socket(server, f"/ws/teams/{acme.pk}/", alice)
            )
        )

        async def streaming() -> bool:
            await run.arefresh_from_db()
            return run.status == Status.RUNNING and bool(run.output)

        await eventually(streaming, "the run streaming", timeout=30)
        await eventually(lambda: listing.statuses([run.pk]) == {"running"}, "a live list")

        redis.kill()
        token = await sync_to_async(ApiToken.issue)(bob)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            # Stopped while Redis is down: the stop itself must not depend on Redis.
            answer = await http.post(
                f"/api/runs/{run.pk}/stop",
                headers={"Authorization": f"Bearer {token}"},
                json={"reason": "redis is down"},
            )
            assert answer.status_code == 200, answer.text

            async def stopped() -> bool:
                await run.arefresh_from_db()
                return run.status == Status.STOPPED

            await eventually(stopped, "the provider confirming the stop", timeout=30)
            redis.start()
            await eventually(redis.up, "redis back on the same port")
            # Both viewers end with the final state, though its pushes went nowhere.
            await eventually(
                lambda: listing.statuses([run.pk]) == {"stopped"}, "the list showing Stopped"
            )
            await eventually(
                lambda: any('data-status="stopped"' in m for m in details),
                "the run page showing Stopped",
            )
            # And the process answers pushes after the restart: a new run reaches the list.
            launched = await http.post(
                "/api/runs",
                headers={"Authorization": f"Bearer {token}"},
                json={"provider_account": account.pk, "prompt": "after sim:duration=0.5"},
            )
            assert launched.status_code == 201, launched.text
            new_id = launched.json()["id"]
            await eventually(
                lambda: listing.statuses([new_id]) == {"completed"},
                "a run launched after the restart completing live on the list",
                timeout=30,
            )
        assert server.proc.poll() is None
        detail_task.cancel()
        listing.task.cancel()
    finally:
        await sockets.aclose()
        output = await sync_to_async(server.output)()
        server.close()
    # Pushes that failed while Redis was down are logged; nothing else went wrong.
    assert "Redis is back; live viewers resync" in output
