"""Fault 7: a browser stops reading while its run streams. Every push fits one websocket frame,
the server's memory stays bounded, and a viewer that reads still sees the run end."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from runs.models import Run, Status
from tests.conftest import sim_account
from tests.livekit import (
    Uvicorn,
    eventually,
    open_socket,
    raw_socket_that_never_reads,
    rss_kib,
    serve,
)

pytestmark = pytest.mark.django_db(transaction=True)

FRAME_LIMIT = 64 * 1024  # daphne's, set in serve.py; uvicorn gets the same (--ws-max-size)
# What streaming ~140 KB of output may cost the server with a frozen tab attached. Measured
# with bounded pushes: daphne +30 MiB, uvicorn +8 MiB, the same with or without the frozen tab
# (the streaming itself). Pushing the whole output every time cost uvicorn +70 MiB and
# growing (quadratic in the output), and killed daphne's consumer (a frame over its limit).
RSS_GROWTH_LIMIT_KIB = 60 * 1024


@pytest.mark.parametrize("server_kind", ["daphne", "uvicorn"])
async def test_a_tab_that_stops_reading_costs_bounded_memory_and_others_see_the_end(
    server_kind: str, acme: Any, bob: Any, alice: Any
) -> None:
    start = serve if server_kind == "daphne" else Uvicorn
    server = await sync_to_async(start)()
    sockets = AsyncExitStack()  # closed in `finally`, before the server
    try:
        account = await sync_to_async(sim_account)(acme, server, "intelligencebox")
        run = await sync_to_async(Run.objects.launch)(
            account=account,
            user=bob,
            prompt=f"{uuid.uuid4().hex} long report sim:pending=0 sim:duration=4 sim:chunks=30000",
            options={},
            timeout_seconds=600,
        )
        path = f"/ws/runs/{run.pk}/"
        frozen = await raw_socket_that_never_reads(server, path, bob)
        sockets.callback(frozen.close)
        viewer = await sockets.enter_async_context(await open_socket(server, path, alice))
        frames: list[str] = []

        async def read() -> None:
            async for message in viewer:
                frames.append(message)

        reader = asyncio.create_task(read())
        await eventually(lambda: frames, "the viewer's snapshot")
        baseline = rss_kib(server.proc.pid)
        peak = baseline

        def ended() -> bool:
            nonlocal peak
            peak = max(peak, rss_kib(server.proc.pid))
            return any('data-status="completed"' in f for f in frames)

        await eventually(ended, "the viewer seeing the run complete", timeout=40)
        await run.arefresh_from_db()
        print(
            f"{server_kind}: output {len(run.output)} chars, {len(frames)} frames, "
            f"largest {max(len(f.encode()) for f in frames)} B, "
            f"RSS +{peak - baseline} KiB (baseline {baseline} KiB)"
        )
        assert run.status == Status.COMPLETED
        assert len(run.output) > 100_000  # enough to overflow a frame if pushed whole
        assert max(len(f.encode()) for f in frames) <= FRAME_LIMIT
        assert peak - baseline < RSS_GROWTH_LIMIT_KIB
        assert server.proc.poll() is None
        reader.cancel()
    finally:
        await sockets.aclose()
        output = await sync_to_async(server.output)()
        server.close()
    assert "Traceback" not in output, output[-3000:]
