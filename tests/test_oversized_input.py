"""Fault 19: an oversized websocket frame or JSON body, against the real server. That
connection or request is refused with an error; other viewers and requests are unaffected."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from websockets.exceptions import ConnectionClosed

from runs.models import ApiToken, Run
from tests.livekit import open_socket, serve

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def server(transactional_db: Any) -> Any:
    live = serve(watcher=False)
    yield live
    output = live.output()
    live.close()
    assert "Traceback" not in output, output[-3000:]


async def test_an_oversized_frame_closes_only_that_socket(server, acme, bob, alice, fay_account):
    path = f"/ws/teams/{acme.pk}/"
    async with AsyncExitStack() as sockets:
        watcher = await sockets.enter_async_context(await open_socket(server, path, alice))
        await watcher.recv()  # the snapshot
        offender = await sockets.enter_async_context(await open_socket(server, path, bob))
        await offender.recv()

        await offender.send("x" * (65 * 1024))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(offender.recv(), 10)
        # Refused by the server's frame check (daphne drops the connection; a close frame would
        # say 1009): the frame never reached the application, which closes with 4400 a client
        # that sends anything at all.
        received = closed.value.rcvd
        assert received is None or received.code == 1009, received

        # The other viewer still gets pushes: a run launched through the API appears on its list.
        token = await sync_to_async(ApiToken.issue)(bob)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            answer = await http.post(
                "/api/runs",
                headers={"Authorization": f"Bearer {token}"},
                json={"provider_account": fay_account.pk, "prompt": "still here?"},
            )
        assert answer.status_code == 201, answer.text
        run_id = answer.json()["id"]
        pushed = await asyncio.wait_for(watcher.recv(), 10)
        assert f'id="run-row-{run_id}"' in pushed
        # And a new socket is served as before.
        again = await sockets.enter_async_context(await open_socket(server, path, bob))
        assert f'id="run-row-{run_id}"' in await again.recv()


async def test_oversized_and_malformed_json_bodies_are_refused_in_json(server, bob, fay_account):
    token = await sync_to_async(ApiToken.issue)(bob)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    huge = json.dumps({"provider_account": fay_account.pk, "prompt": "x" * (2 * 1024 * 1024)})
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as http:
        for path in ("/api/runs", "/api/runs/stop"):
            answer = await http.post(path, content=huge)
            assert answer.status_code == 413, (path, answer.status_code, answer.text[:300])
            assert answer.json()["error"]["code"] == "BODY_TOO_LARGE"
            assert answer.json()["error"]["message"]
        for body in ("{not json", "[1, 2]", "\xff\xfe"):
            answer = await http.post("/api/runs", content=body.encode("latin-1"))
            assert answer.status_code == 400, (body, answer.status_code, answer.text[:300])
            assert answer.json()["error"]["code"] == "INVALID_JSON"
        # The server kept serving and nothing was started.
        listed = await http.get("/api/runs")
        assert listed.status_code == 200
        assert listed.json()["results"] == []
    assert not await Run.objects.aexists()
