"""Websocket consumers: authenticate, authorise against the user's teams, join the group,
send a snapshot, then forward pushes. Nothing else happens here."""

from __future__ import annotations

import weakref
from typing import Any
from urllib.parse import parse_qs, urlencode

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import QueryDict

from . import live
from .forms import RunFilterForm
from .models import Membership, Run
from .views import list_page


@database_sync_to_async
def _team_snapshot(
    user: Any, team_id: int, query: dict[str, list[str]]
) -> tuple[Membership, RunFilterForm | None, set[int], bool, str] | None:
    membership = Membership.objects.select_related("team").filter(user=user, team_id=team_id)
    found = membership.first()
    if found is None:
        return None
    filters = RunFilterForm(QueryDict(urlencode(query, doseq=True)), team=found.team, user=user)
    page = list_page(found.team, filters, (query.get("before") or [""])[0])
    shown = {run.pk for run in page["runs"]}
    html = live.render_rows(page["runs"], page["rows_id"])
    # Most viewers filter nothing: they keep no form (a form per idle socket is kilobytes).
    kept = filters if filters.active or filters.errors else None
    return found, kept, shown, page["rows_id"] == "run-rows", html


@database_sync_to_async
def _run_snapshot(user: Any, run_id: int) -> tuple[Membership, str] | None:
    run = Run.objects.for_user(user).filter(pk=run_id).first()
    if run is None:
        return None
    membership = Membership.objects.select_related("team").get(user=user, team_id=run.team_id)
    return membership, live.render_detail(live.load(run.pk))


# This process's open sockets, closed with "server restarting" when it shuts down.
_open: weakref.WeakSet[PushConsumer] = weakref.WeakSet()


async def close_all_for_restart() -> int:
    """Shutting down: tell every page on this process to reconnect (to a restarted server,
    or to another web process) instead of sitting on a socket nothing pushes to any more."""
    sockets = list(_open)
    for consumer in sockets:
        await consumer.close(code=live.CLOSE_SERVER_RESTARTING)
    return len(sockets)


class PushConsumer(AsyncWebsocketConsumer):
    group: str | None = None
    user_group: str | None = None
    # The viewer's role in the run's team: every push is cut to the controls it allows.
    membership: Membership | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()
            return
        group, snapshot = await self.authorise(user)
        if snapshot is None:
            # Another team's id looks exactly like one that does not exist.
            await self.close()
            return
        self.group = group
        self.user_group = live.user_group(user.pk)
        await self.channel_layer.group_add(group, self.channel_name)
        await self.channel_layer.group_add(self.user_group, self.channel_name)
        await self.accept()
        _open.add(self)
        await self.send_html(snapshot)

    async def send_html(self, html: str) -> None:
        assert self.membership is not None  # authorise() set it before any send
        await self.send(text_data=live.for_viewer(html, self.membership))

    async def authorise(self, user: Any) -> tuple[str, str | None]:
        raise NotImplementedError

    async def disconnect(self, code: int) -> None:
        _open.discard(self)
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        if self.user_group is not None:
            await self.channel_layer.group_discard(self.user_group, self.channel_name)

    async def session_ended(self, event: dict[str, Any]) -> None:
        # Logged out (in any tab): no more runs reach this page.
        await self.close(code=live.CLOSE_SESSION_ENDED)

    async def membership_changed(self, event: dict[str, Any]) -> None:
        """Their role changed or they left the team: check again from the database; a socket
        its user may no longer have is closed, one whose role changed gets a fresh snapshot
        cut to the new role."""
        if self.membership is None or event.get("team") != self.membership.team_id:
            return
        _group, snapshot = await self.authorise(self.scope["user"])
        if snapshot is None:
            await self.close(code=live.CLOSE_ACCESS_ENDED)
            return
        await self.send_html(snapshot)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels hops to a thread to close stale database connections before *every*
        # message; a push touches no database, and skipping the hop made fan-out 2-3.5x
        # faster (stack notes). Everything else takes the normal path.
        if message["type"] == live.MESSAGE_TYPE:
            await self.push_html(message)
            return
        await super().dispatch(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # The page never sends anything; a client that does is not ours.
        await self.close(code=4400)

    async def push_html(self, event: dict[str, Any]) -> None:
        await self.send_html(event["html"])

    async def push_resync(self, event: dict[str, Any]) -> None:
        # Pushes were dropped (a full backlog, a lost Redis connection: runs/layers.py):
        # the snapshot from the database makes the page whole, as on a reconnect.
        _group, snapshot = await self.authorise(self.scope["user"])
        if snapshot is None:
            await self.close()
            return
        await self.send_html(snapshot)


class TeamRunsConsumer(PushConsumer):
    """A team's list. It knows which rows its viewer has, so a run that enters the viewer's
    filter is inserted, one that leaves it is removed, and others are not sent at all."""

    filters: RunFilterForm | None = None
    shown: set[int]
    takes_new_rows = False

    async def authorise(self, user: Any) -> tuple[str, str | None]:
        team_id = int(self.scope["url_route"]["kwargs"]["team_id"])
        query = parse_qs(self.scope.get("query_string", b"").decode())
        found = await _team_snapshot(user, team_id, query)
        if found is None:
            return live.team_group(team_id), None
        self.membership, self.filters, self.shown, self.takes_new_rows, snapshot = found
        return live.team_group(team_id), snapshot

    async def push_html(self, event: dict[str, Any]) -> None:
        meta = event["meta"]
        run_id = meta["id"]
        wanted = self.filters is None or self.filters.matches(meta)
        if run_id in self.shown:
            if wanted:
                await self.send_html(event["html"])
            else:
                self.shown.discard(run_id)
                await self.send(text_data=live.render_removal(run_id))
        elif wanted and self.takes_new_rows:
            self.shown.add(run_id)
            await self.send_html(live.as_insertion(event["html"]))


class RunConsumer(PushConsumer):
    async def authorise(self, user: Any) -> tuple[str, str | None]:
        run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        found = await _run_snapshot(user, run_id)
        if found is None:
            return live.run_group(run_id), None
        self.membership, snapshot = found
        return live.run_group(run_id), snapshot
