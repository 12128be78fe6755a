"""Websocket consumers with a real ASGI stack (auth, origin check, channel layer)."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from runs.models import Channel, Run
from runs.realtime import live
from tests.sockets import websocket
from webapp.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


async def test_anonymous_sockets_are_refused(acme):
    async with websocket(f"/ws/teams/{acme.pk}/") as (_, connected):
        assert not connected


async def test_a_foreign_origin_is_refused(bob, acme):
    async with websocket(f"/ws/teams/{acme.pk}/", bob, origin="https://evil.example") as (
        _,
        connected,
    ):
        assert not connected


async def test_another_teams_list_and_run_are_refused(mallory, launch, acme):
    run = await sync_to_async(launch)()
    for path in (f"/ws/teams/{acme.pk}/", f"/ws/runs/{run.pk}/"):
        async with websocket(path, mallory) as (_, connected):
            assert not connected, path


async def test_the_team_socket_sends_a_snapshot_then_every_change(bob, acme, launch):
    run = await sync_to_async(launch)("snapshot me")
    async with websocket(f"/ws/teams/{acme.pk}/", bob) as (communicator, connected):
        assert connected
        snapshot = await communicator.receive_from(timeout=5)
        assert snapshot.startswith('\n<tbody id="run-rows">') or '<tbody id="run-rows">' in snapshot
        assert f'id="run-row-{run.pk}"' in snapshot

        created = await sync_to_async(launch)("a second run")
        insert = await communicator.receive_from(timeout=5)
        assert insert.startswith('<tbody hx-swap-oob="afterbegin:#run-rows">')
        assert f'id="run-row-{created.pk}"' in insert

        await sync_to_async(run.mark_running)("PROCESSING")
        row = await communicator.receive_from(timeout=5)
        assert f'id="run-row-{run.pk}"' in row
        assert 'data-status="running"' in row


async def test_the_run_socket_pushes_transitions_in_order_with_rising_versions(bob, launch):
    run = await sync_to_async(launch)()
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (communicator, connected):
        assert connected
        snapshot = await communicator.receive_from(timeout=5)
        assert f'id="run-status-{run.pk}"' in snapshot
        assert 'data-status="pending"' in snapshot

        await sync_to_async(run.mark_running)("PROCESSING")
        await sync_to_async(run.request_stop)(actor=bob, channel=Channel.BUTTON, reason="why not")
        await sync_to_async(run.mark_stopped)(confirmation="a test", proof="status_read")
        # Pushes are snapshots, coalesced per run: a viewer may skip a state in between, but
        # never sees one out of order, and always ends on the last.
        order = ["running", "stopping", "stopped"]
        statuses: list[str] = []
        versions: list[int] = []
        while not statuses or statuses[-1] != "stopped":
            message = await communicator.receive_from(timeout=5)
            assert f'id="run-events-{run.pk}"' in message
            statuses.append(message.split('data-status="')[1].split('"')[0])
            versions.append(int(message.split('data-version="')[1].split('"')[0]))
        assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)
        assert versions == sorted(set(versions))


async def test_a_client_that_sends_anything_is_disconnected(bob, acme):
    async with websocket(f"/ws/teams/{acme.pk}/", bob) as (communicator, connected):
        assert connected
        await communicator.receive_from(timeout=5)
        await communicator.send_to(text_data="hello")
        closed = await communicator.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 4400}


async def test_pushes_requested_together_coalesce_and_a_new_run_is_still_inserted(
    bob, acme, launch
):
    from runs.realtime import live

    async with websocket(f"/ws/teams/{acme.pk}/", bob) as (communicator, connected):
        assert connected
        await communicator.receive_from(timeout=5)  # the (empty) snapshot

        run = await sync_to_async(launch)("coalesce me")
        await live.drain()
        first = await communicator.receive_from(timeout=5)
        assert first.startswith('<tbody hx-swap-oob="afterbegin:#run-rows">')
        # Two pushes requested before the loop sends anything: one snapshot goes out, read
        # after both, and still as an insertion because one of them was for a new run.
        await sync_to_async(run.mark_running)("PROCESSING")
        await live.drain()
        await communicator.receive_from(timeout=5)  # the push of mark_running itself
        live._request(run.pk, True)
        live._request(run.pk, False)
        await live.drain()
        only = await communicator.receive_from(timeout=5)
        assert only.startswith('<tbody hx-swap-oob="afterbegin:#run-rows">')
        assert 'data-status="running"' in only
        assert await communicator.receive_nothing(timeout=0.2)


async def test_pushes_from_sync_code_reach_the_socket_in_order(bob, launch):
    run = await sync_to_async(launch)()
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (communicator, connected):
        assert connected
        await communicator.receive_from(timeout=5)

        def several_changes() -> None:
            run.mark_running("PROCESSING")
            run.request_stop(actor=None, channel=Channel.API, reason="enough")

        await sync_to_async(several_changes)()
        versions: list[int] = []
        last = ""
        while 'data-status="stopping"' not in last:
            last = await communicator.receive_from(timeout=5)
            versions.append(int(last.split('data-version="', 1)[1].split('"', 1)[0]))
        assert versions == sorted(versions)


async def test_a_push_is_rendered_only_for_groups_someone_listens_to(bob, launch, monkeypatch):
    from runs.realtime import live

    rendered: list[int] = []
    real = live.render_detail

    def counting(run, **kw):
        rendered.append(run.pk)
        return real(run, **kw)

    monkeypatch.setattr(live, "render_detail", counting)
    run = await sync_to_async(launch)()
    await live.drain()
    await sync_to_async(run.mark_running)("PROCESSING")
    await live.drain()
    assert rendered == []  # nobody watches the run's page

    async with websocket(f"/ws/runs/{run.pk}/", bob) as (communicator, connected):
        assert connected
        await communicator.receive_from(timeout=5)
        rendered.clear()
        await sync_to_async(run.request_stop)(actor=None, channel=Channel.API, reason="enough")
        await live.drain()
        pushed = await communicator.receive_from(timeout=5)
        assert 'data-status="stopping"' in pushed
        assert rendered == [run.pk]


async def test_saving_output_pushes_nothing_and_frames_reach_only_the_run_page(bob, acme, launch):
    """Output reaches pages as frames from the watcher (live.py, "Output deltas"); the
    database save behind them pushes nothing, and the list (whose rows show no output) is
    sent no frame."""
    run = await sync_to_async(launch)()
    await sync_to_async(run.mark_running)("PROCESSING")
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
        assert connected
        await page.receive_from(timeout=5)
        async with websocket(f"/ws/teams/{acme.pk}/", bob) as (team, connected):
            assert connected
            await team.receive_from(timeout=5)

            await sync_to_async(Run.objects.record_outputs)({run.pk: ("Hello **world**", 0)})
            assert await page.receive_nothing(timeout=0.3)

            class Source:
                run_id = run.pk

                def take_frame(self) -> str:
                    return live.output_frame(live.APPEND, run.pk, 0, 15, "Hello **world**")

                def skip_frame(self) -> None:
                    raise AssertionError("the run page is watched")

            await live.send_frames([Source()])
            frame = json.loads(await page.receive_from(timeout=5))
            assert frame == {
                "type": "output.append",
                "run": run.pk,
                "at": 0,
                "end": 15,
                "text": "Hello **world**",
            }

            # The next transition is a full push: the list hears of it, and heard nothing before.
            await sync_to_async(run.mark_stopped)(confirmation="a test", proof="status_read")
            row = await team.receive_from(timeout=5)
            assert f'id="run-row-{run.pk}"' in row
            assert 'data-status="stopped"' in row


# --- Controls a viewer cannot use never reach their page ----------------------------------------


async def test_a_viewers_sockets_carry_no_stop_or_run_again_controls(carol, bob, acme, launch):
    run = await sync_to_async(launch)("watched by carol")
    async with (
        websocket(f"/ws/teams/{acme.pk}/", carol) as (team, _),
        websocket(f"/ws/runs/{run.pk}/", carol) as (detail, _),
    ):
        for frame in (await team.receive_from(timeout=5), await detail.receive_from(timeout=5)):
            assert f'id="run-row-{run.pk}"' in frame or f'id="run-status-{run.pk}"' in frame
            assert "stop-form" not in frame
            assert 'name="ids"' not in frame
            assert "stop-reasons" not in frame
        await sync_to_async(run.mark_running)("PROCESSING")
        pushed = await detail.receive_from(timeout=5)
        assert 'data-status="running"' in pushed
        assert "stop-form" not in pushed
        assert "<kbd>Esc</kbd>" not in pushed
        await sync_to_async(run.mark_completed)(proof="status_read", output="done")
        finished = await detail.receive_from(timeout=5)
        assert 'data-status="completed"' in finished
        assert "Run again" not in finished


async def test_a_member_sees_cancel_only_on_their_own_runs_when_the_team_says_so(
    alice, bob, acme, launch, fay_account
):
    acme.members_can_stop_others = False
    await acme.asave()
    own = await sync_to_async(launch)("bob's own", user=bob)
    alices = await sync_to_async(launch)("alice's", user=alice)
    async with websocket(f"/ws/teams/{acme.pk}/", bob) as (team, _):
        snapshot = await team.receive_from(timeout=5)
        rows = {pk: _row(snapshot, pk) for pk in (own.pk, alices.pk)}
        assert "stop-form" in rows[own.pk]
        assert "stop-form" not in rows[alices.pk]
        assert 'name="ids"' not in rows[alices.pk]


def _row(html: str, pk: int) -> str:
    start = html.index(f'id="run-row-{pk}"')
    return html[start : html.index("</tr>", start)]


# --- A socket's user and their access, for the socket's whole life ------------------------------


async def _closed_with(communicator) -> int | None:
    """The close code the server sent (it closes on its own; nothing else is awaited)."""
    while True:
        output = await communicator.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            return output.get("code")


async def test_logging_out_closes_every_socket_of_that_user_for_good(bob, acme, launch):
    run = await sync_to_async(launch)("watched")
    client = Client()
    await sync_to_async(client.force_login)(bob)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    headers = [
        (b"origin", b"http://localhost"),
        (b"host", b"localhost"),
        (b"cookie", f"sessionid={cookie}".encode()),
    ]
    sockets = [
        WebsocketCommunicator(application, path, headers=headers)
        for path in (f"/ws/teams/{acme.pk}/", f"/ws/runs/{run.pk}/")
    ]
    try:
        for socket in sockets:
            assert (await socket.connect())[0]
            await socket.receive_from(timeout=5)  # the snapshot
        await sync_to_async(client.post)("/accounts/logout/")
        for socket in sockets:
            assert await _closed_with(socket) == 4401
    finally:
        for socket in sockets:
            await socket.disconnect()


async def test_leaving_the_team_closes_its_sockets_and_a_new_role_changes_the_controls(
    bob, acme, launch
):
    from runs.models import Membership

    run = await sync_to_async(launch)("watched")
    async with (
        websocket(f"/ws/runs/{run.pk}/", bob) as (detail, _),
        websocket(f"/ws/teams/{acme.pk}/", bob) as (team, _),
    ):
        assert "stop-form" in await detail.receive_from(timeout=5)
        await team.receive_from(timeout=5)
        membership = await Membership.objects.aget(user=bob, team=acme)
        membership.role = "viewer"
        await membership.asave()
        demoted = await detail.receive_from(timeout=5)
        assert f'id="run-status-{run.pk}"' in demoted
        assert "stop-form" not in demoted
        await team.receive_from(timeout=5)
        await membership.adelete()
        assert await _closed_with(detail) == 4403
        assert await _closed_with(team) == 4403
        await sync_to_async(run.mark_running)("PROCESSING")  # nothing more reaches bob


@pytest.mark.parametrize(
    "origin",
    ["http://localhost:8219", "https://localhost", "http://localhost.evil.example", "null", ""],
)
async def test_another_port_or_scheme_of_the_same_host_is_refused(bob, acme, origin):
    """Cross-site websocket hijacking: the host name alone (Channels' own check) let a page
    on another port read a logged-in user's runs."""
    async with websocket(f"/ws/teams/{acme.pk}/", bob, origin=origin) as (_, connected):
        assert not connected


async def test_the_sites_own_origin_and_a_trusted_one_are_admitted(bob, acme, settings):
    async with websocket(f"/ws/teams/{acme.pk}/", bob, origin="http://localhost") as (
        _,
        connected,
    ):
        assert connected
    # Behind a TLS proxy the page is https while the socket reaches the server as plain ws.
    settings.CSRF_TRUSTED_ORIGINS = ["https://localhost"]
    async with websocket(f"/ws/teams/{acme.pk}/", bob, origin="https://localhost") as (
        _,
        connected,
    ):
        assert connected


async def test_a_resync_the_database_cannot_answer_closes_the_socket_so_the_page_reconnects(
    bob, acme, launch, monkeypatch
):
    # Found by the chaos soak: Redis came back while PostgreSQL restarted, the resync's
    # snapshot query failed, and the page stayed open showing a run as running forever.
    from channels.layers import get_channel_layer
    from django.db import OperationalError

    from runs.realtime import consumers

    async with websocket(f"/ws/teams/{acme.pk}/", bob) as (communicator, connected):
        assert connected
        await communicator.receive_from(timeout=5)  # the snapshot

        def database_restarting(*args, **kwargs):
            raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(consumers, "_team_snapshot", database_restarting)
        layer = get_channel_layer()
        assert layer is not None
        await layer.group_send(live.team_group(acme.pk), {"type": "push.resync"})
        assert await _closed_with(communicator) == live.CLOSE_SERVER_RESTARTING


# --- Snapshots of a run page, rendered once per version ------------------------------------------


async def test_pages_reconnecting_to_one_run_share_its_render_cut_to_each_viewer(
    alice, bob, carol, launch, monkeypatch
):
    """A mass reconnect (a deploy, a restarted proxy) brings many pages of the same few runs
    back at once: the detail is rendered once per version, and still cut to each viewer's
    role, and a change is in the very next snapshot."""
    run = await sync_to_async(launch)("reconnected to")
    renders: list[int] = []
    render_detail = live.render_detail

    def counted(run: Run, **kwargs: object) -> str:
        renders.append(run.pk)
        return render_detail(run, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(live, "render_detail", counted)

    async def snapshot(user: object) -> str:
        async with websocket(f"/ws/runs/{run.pk}/", user) as (socket, connected):
            assert connected
            return await socket.receive_from(timeout=5)

    admin, member, viewer = await snapshot(alice), await snapshot(bob), await snapshot(carol)
    assert renders == [run.pk]
    assert "stop-form" in admin
    assert "stop-form" in member
    assert "stop-form" not in viewer
    assert 'data-status="pending"' in viewer

    await sync_to_async(run.mark_running)("PROCESSING")
    await live.drain()
    again = await snapshot(carol)
    assert 'data-status="running"' in again
    assert "stop-form" not in again
    assert 'data-status="running"' in await snapshot(alice)
    # The new version rendered once more (by the snapshot or a push), not once per page.
    assert len(renders) == 2


async def test_a_kept_snapshot_is_read_again_once_it_is_a_second_old(bob, launch, monkeypatch):
    """What changes without a new version (an account renamed in the admin) reaches a
    reconnecting page within SNAPSHOT_SECONDS."""
    run = await sync_to_async(launch)("renamed under it")

    async def snapshot() -> str:
        async with websocket(f"/ws/runs/{run.pk}/", bob) as (socket, connected):
            assert connected
            return await socket.receive_from(timeout=5)

    monkeypatch.setattr(live, "SNAPSHOT_SECONDS", 60.0)
    assert "Fay renamed" not in await snapshot()
    account = run.provider_account
    account.name = "Fay renamed"
    await account.asave(update_fields=["name"])
    assert "Fay renamed" not in await snapshot()  # the same version, kept
    monkeypatch.setattr(live, "SNAPSHOT_SECONDS", 0.0)  # ... until it is that old
    assert "Fay renamed" in await snapshot()
