"""Websocket consumers: authenticate, authorise against the user's teams, join the group,
send a snapshot, then forward pushes. Nothing else happens here.

A socket has no channel of its own: the process's hub (`live.hub()`) receives each group once
and hands every message to its local sockets (`deliver`), which cut it to their viewer and
write it. Each socket writes in order; one that cannot keep up (its client stopped reading)
keeps a bounded backlog that overflows into a fresh snapshot, never into a stalled hub.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import weakref
from typing import Any
from urllib.parse import parse_qs, urlencode

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import DatabaseError
from django.http import QueryDict

from runs.access import find_membership, run_and_membership
from runs.models import Membership
from runs.realtime import live
from runs.realtime.layers import RESYNC
from runs.web.forms import RunFilterForm

logger = logging.getLogger(__name__)


@database_sync_to_async
def _team_snapshot(
    user: Any, team_id: int, query: dict[str, list[str]]
) -> tuple[Membership, RunFilterForm | None, set[int], bool, str] | None:
    found = find_membership(user, team_id)
    if found is None:
        return None
    filters = RunFilterForm(QueryDict(urlencode(query, doseq=True)), team=found.team, user=user)
    page = filters.list_page((query.get("before") or [""])[0])
    shown = {run.pk for run in page["runs"]}
    html = live.render_rows(page["runs"], page["rows_id"])
    # Most viewers filter nothing: they keep no form (a form per idle socket is kilobytes).
    kept = filters if filters.active or filters.errors else None
    return found, kept, shown, page["rows_id"] == "run-rows", html


@database_sync_to_async
def _run_snapshot(user: Any, run_id: int) -> tuple[Membership, str] | None:
    found = run_and_membership(user, run_id)
    if found is None:
        return None
    run, membership = found
    return membership, live.snapshot_detail(run)


# This process's open sockets, closed with "server restarting" when it shuts down.
_open: weakref.WeakSet[PushConsumer] = weakref.WeakSet()


async def close_all_for_restart() -> int:
    """Shutting down: tell every page on this process to reconnect (to a restarted server,
    or to another web process) instead of sitting on a socket nothing pushes to any more."""
    sockets = list(_open)
    for consumer in sockets:
        await consumer.close(code=live.CLOSE_SERVER_RESTARTING)
    return len(sockets)


# Frames a socket may have waiting while its client is slow; past that it gets a snapshot.
BACKLOG = 64


class PushConsumer(AsyncWebsocketConsumer):
    # No channel-layer channel per socket: the hub receives for all of them. (An alias that
    # names no layer makes Channels skip creating one.)
    channel_layer_alias = "runbrake: sockets are fed by live.hub()"

    group: str | None = None
    user_group: str | None = None
    # The viewer's role in the run's team: every push is cut to the controls it allows.
    membership: Membership | None = None
    _writer: asyncio.Task[None] | None = None
    _backlog: collections.deque[str] | None = None
    _resync_due = False
    _closed = False
    # What arrives while the socket is authorised and its snapshot read: kept, then handled
    # once the snapshot is out (older pushes among them lose to it by data-version).
    _early: list[dict[str, Any]] | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()
            return
        self._tasks: set[asyncio.Task[None]] = set()
        # Subscribed *before* the snapshot is read: a change committed in between reaches the
        # page after it, instead of falling in the gap and never showing.
        self._early = []
        self.group = self.group_name()
        self.user_group = live.user_group(user.pk)
        hub = live.hub()
        await hub.join(self.group, self)
        await hub.join(self.user_group, self)
        _group, snapshot = await self.authorise(user)
        if snapshot is None:
            # Another team's id looks exactly like one that does not exist.
            await self.close()
            return
        await self.accept()
        _open.add(self)
        await self.send_html(snapshot)
        early, self._early = self._early, None
        for message in early:
            self.deliver(message, {})

    def group_name(self) -> str:
        raise NotImplementedError

    def cut(self, html: str, cuts: dict[Any, str], *extra: Any) -> str:
        """The push as this viewer may see it, cut once per kind of viewer per message."""
        assert self.membership is not None  # authorise() set it before any push
        key = (live.viewer_key(self.membership), *extra)
        found = cuts.get(key)
        if found is None:
            found = cuts[key] = live.for_viewer(html, self.membership)
        return found

    async def send_html(self, html: str) -> None:
        assert self.membership is not None  # authorise() set it before any send
        await self.send(text_data=live.for_viewer(html, self.membership))

    # --- Fed by the hub -------------------------------------------------------------------------

    def deliver(self, message: dict[str, Any], cuts: dict[Any, str]) -> None:
        if self._early is not None:
            if len(self._early) < BACKLOG:
                self._early.append(message)
            else:
                self._early[-1] = dict(RESYNC)  # too many: a snapshot after all
            return
        kind = message["type"]
        if kind == live.MESSAGE_TYPE:
            self.on_push(message, cuts)
        elif kind == live.FRAME_TYPE:
            self.write(message["frame"])
        elif kind in ("session.ended", "membership.changed", "push.resync"):
            # Rare, and they read the database: each in a task of its own.
            handler = getattr(self, kind.replace(".", "_"))
            task = asyncio.get_running_loop().create_task(handler(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def on_push(self, message: dict[str, Any], cuts: dict[Any, str]) -> None:
        self.write(self.cut(message["html"], cuts))

    def write(self, text: str) -> None:
        """Send in order without making the hub wait: the send usually completes at once
        (an eager task); while one waits on a slow client, later frames queue up to BACKLOG,
        then collapse into one snapshot."""
        if self._closed:
            return
        if self._writer is None or self._writer.done():
            loop = asyncio.get_running_loop()
            self._writer = asyncio.eager_task_factory(loop, self._write(text))
            return
        if self._resync_due:
            return  # the snapshot on its way will carry this too
        if self._backlog is None:
            self._backlog = collections.deque()
        if len(self._backlog) >= BACKLOG:
            self._backlog.clear()
            self._resync_due = True
            return
        self._backlog.append(text)

    async def _write(self, text: str | None = None) -> None:
        try:
            if text is not None:
                await self.send(text_data=text)
            while self._backlog:
                await self.send(text_data=self._backlog.popleft())
            if self._resync_due:
                self._resync_due = False
                await self.push_resync({})
        except Exception:
            # The socket is gone (its disconnect follows); nothing more goes to it.
            self._closed = True

    async def authorise(self, user: Any) -> tuple[str, str | None]:
        raise NotImplementedError

    async def disconnect(self, code: int) -> None:
        _open.discard(self)
        self._closed = True
        hub = live.hub()
        if self.group is not None:
            hub.leave(self.group, self)
        if self.user_group is not None:
            hub.leave(self.user_group, self)

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

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # The page sends nothing but "I missed output" on a run page; a client that sends
        # anything else is not ours.
        if not self.wants(text_data):
            await self.close(code=4400)

    def wants(self, text_data: str | None) -> bool:
        return False

    async def push_resync(self, event: dict[str, Any]) -> None:
        # Pushes were dropped (a full backlog, a lost Redis connection: runs/realtime/layers.py):
        # the snapshot from the database makes the page whole, as on a reconnect.
        try:
            _group, snapshot = await self.authorise(self.scope["user"])
        except DatabaseError:
            # Redis came back while the database restarts: this page cannot be made whole
            # now, and left open it would show what it missed for good. Closed as for a
            # restart, the page reconnects and its connect reads the snapshot again.
            logger.warning("live: a resync's snapshot failed; the socket reconnects")
            await self.close(code=live.CLOSE_SERVER_RESTARTING)
            return
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

    def group_name(self) -> str:
        return live.team_group(int(self.scope["url_route"]["kwargs"]["team_id"]))

    async def authorise(self, user: Any) -> tuple[str, str | None]:
        team_id = int(self.scope["url_route"]["kwargs"]["team_id"])
        query = parse_qs(self.scope.get("query_string", b"").decode())
        found = await _team_snapshot(user, team_id, query)
        if found is None:
            return live.team_group(team_id), None
        self.membership, self.filters, self.shown, self.takes_new_rows, snapshot = found
        return live.team_group(team_id), snapshot

    def on_push(self, message: dict[str, Any], cuts: dict[Any, str]) -> None:
        meta = message["meta"]
        run_id = meta["id"]
        wanted = self.filters is None or self.filters.matches(meta)
        if run_id in self.shown:
            if wanted:
                self.write(self.cut(message["html"], cuts))
            else:
                self.shown.discard(run_id)
                self.write(live.render_removal(run_id))
        elif wanted and self.takes_new_rows:
            self.shown.add(run_id)
            self.write(self.cut(live.as_insertion(message["html"]), cuts, "insert"))


# A page asks for the output again at most this often (a client looping on gaps is not ours
# to serve faster).
WANT_INTERVAL = 1.0


@database_sync_to_async
def _saved_output(run_id: int) -> str | None:
    return live.render_output(run_id)


class RunConsumer(PushConsumer):
    wanted_at = 0.0

    def group_name(self) -> str:
        return live.run_group(int(self.scope["url_route"]["kwargs"]["run_id"]))

    async def authorise(self, user: Any) -> tuple[str, str | None]:
        run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        found = await _run_snapshot(user, run_id)
        if found is None:
            return live.run_group(run_id), None
        self.membership, snapshot = found
        return live.run_group(run_id), snapshot

    def wants(self, text_data: str | None) -> bool:
        """{"type": "output.want"}: the page's text has a gap. It gets the saved section now
        and the watcher's text in memory next (live.py, "Output deltas")."""
        if text_data is None or len(text_data) > 200:
            return False
        try:
            message = json.loads(text_data)
        except ValueError:
            return False
        if not isinstance(message, dict) or message.get("type") != live.WANT:
            return False
        now = time.monotonic()
        if now - self.wanted_at >= WANT_INTERVAL and self.membership is not None:
            self.wanted_at = now
            task = asyncio.get_running_loop().create_task(self._send_output())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _send_output(self) -> None:
        run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        await live.want_output(run_id)
        html = await _saved_output(run_id)
        if html is not None:
            self.write(html)
