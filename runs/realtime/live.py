"""Live updates: the only module that knows group names and talks to the channel layer
(through the public API; the private parts live in runs/realtime/layers.py).

Contract:
- `team-<id>` carries the run rows of a team's shared list; `run-<id>` one run's detail and
  its output frames; `user-<id>` "your session ended / your role changed"; the watchers'
  group carries launches and wants.
- A status push is a snapshot of HTML fragments rendered from the database *after* the
  transaction committed (callers use `transaction.on_commit`), never a diff: a client that
  missed a push is made whole by the next one, and by the snapshot every consumer sends on
  (re)connect. Every fragment root carries `data-version`; the browser drops a push older
  than what it shows, so pushes that overtake each other cannot roll the screen back.
- Output is the exception: it reaches pages as appends with offsets, straight from the
  watcher, and is saved behind them (see "Output deltas" below).
- A push is rendered once for all viewers. Inside a server or watcher process, `push_run`
  (sync code, after commit) only hands the run id to the process's event loop and returns, so
  the caller (a stop about to call the provider) waits for neither rendering nor the channel
  layer. The loop renders the snapshot in a worker thread and sends it from async code
  (`group_send` from async code ~0.5 ms, through `async_to_sync` 6-10 ms). One run's pushes go
  out in order, one at a time; requests that arrive meanwhile coalesce into the next one.
- A process receives each group once (`Hub`) and hands the message to its sockets, which cut
  it once per kind of viewer (`viewer_key`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import DatabaseError, close_old_connections
from django.template.loader import render_to_string
from django.utils.timezone import get_current_timezone_name
from django.utils.translation import get_language

from runs import dbthreads
from runs.models import Membership, Role, Run
from runs.realtime import layers

logger = logging.getLogger(__name__)

MESSAGE_TYPE = "push.html"

# Every push must fit one websocket frame: daphne refuses to *send* a message over its 64 KiB
# limit (serve.py) and the consumer dies with it, so a run with a long output could never be
# watched. Pages and pushes show the end of the output (the whole text is a link away), and a
# detail push that is still too big carries only the run's status, which always fits.
MAX_PUSH_BYTES = 56 * 1024
OUTPUT_SHOWN_CHARS = 12_000


# Controls a viewer may not use are cut from each push per socket (the push is rendered once
# for everyone): stop controls carry the run owner's id, launch controls nothing.
STOP_CONTROL = re.compile(r"<!--rb:stop:(\d+)-->.*?<!--/rb:stop-->", re.S)
LAUNCH_CONTROL = re.compile(r"<!--rb:launch-->.*?<!--/rb:launch-->", re.S)
ADMIN_CONTROL = re.compile(r"<!--rb:admin-->.*?<!--/rb:admin-->", re.S)


def for_viewer(html: str, membership: Membership) -> str:
    """The push as this member may see it: without the stop and launch controls their role
    does not allow (the server refuses those actions anyway; this keeps them off the page)."""
    if membership.is_admin:
        return html
    html = ADMIN_CONTROL.sub("", html)
    if not membership.can_launch:
        html = LAUNCH_CONTROL.sub("", html)
    member = membership.role == Role.MEMBER
    if member and membership.team.members_can_stop_others:
        return html

    def keep(match: re.Match[str]) -> str:
        mine = member and int(match.group(1)) == membership.user_id
        return match.group(0) if mine else ""

    return STOP_CONTROL.sub(keep, html)


# Why a socket was closed, for the page (htmx's ws extension reconnects no 4xxx code itself).
CLOSE_SESSION_ENDED = 4401
CLOSE_ACCESS_ENDED = 4403
# The server is shutting down: the page reconnects (static/js/app.js), reaching the
# restarted server or another web process. Not 1012, which daphne may not send.
CLOSE_SERVER_RESTARTING = 4012


def user_group(user_id: int) -> str:
    """Every socket of one user: told when their session ends or their membership changes."""
    return f"user-{user_id}"


def end_sessions(user_id: int) -> None:
    """The user logged out: close their sockets, so no more runs reach a logged-out page."""
    _send_control(user_group(user_id), {"type": "session.ended"})


def membership_changed(user_id: int, team_id: int) -> None:
    """The user's role in a team changed or they left it: their sockets on that team check
    again (and close when they no longer belong)."""
    _send_control(user_group(user_id), {"type": "membership.changed", "team": team_id})


def _send_control(group: str, message: dict[str, Any]) -> None:
    """Tell a group something (not a push), from sync code: through the event loop that owns
    this thread when there is one (async_to_sync cannot run beside it), else directly."""
    loop = layers.owning_loop()
    if loop is not None:
        loop.call_soon_threadsafe(
            lambda: loop.create_task(_asend_control(group, message)),
            context=contextvars.Context(),
        )
        return
    try:
        async_to_sync(_asend_control)(group, message)
    except Exception:
        logger.exception("could not tell %s", group)


async def _asend_control(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group, message)
    except Exception:
        # Best effort: a socket that missed it still cannot act (every action checks anew).
        logger.exception("could not tell %s", group)


def team_group(team_id: int) -> str:
    return f"team-{team_id}"


def run_group(run_id: int) -> str:
    return f"run-{run_id}"


def load(run_id: int) -> Run:
    # Fragments never show the account's key: deferring it saves a decryption per push.
    return (
        Run.objects.select_related("provider_account", "created_by", "stop_requested_by", "team")
        .defer("provider_account__api_key")
        .get(pk=run_id)
    )


def render_row(run: Run, *, created: bool = False) -> str:
    # Stripped: htmx parses an answer as table rows only when it *starts* with `<tr`.
    html = render_to_string("runs/partials.html#run-row", {"run": run}).strip()
    return as_insertion(html) if created else html


def as_insertion(row_html: str) -> str:
    """A row to insert at the top of the live list; a row that is already there is replaced
    by the browser (see static/js/app.js), so a replayed push cannot duplicate it."""
    if row_html.startswith("<tbody"):
        return row_html
    return f'<tbody hx-swap-oob="afterbegin:#run-rows">{row_html}</tbody>'


def render_detail(run: Run, *, oob: bool = False) -> str:
    events = list(run.events.select_related("actor").order_by("at", "id"))
    html = render_to_string(
        "runs/partials.html#run-live", {"run": run, "events": events, "oob": oob}
    )
    if len(html.encode()) <= MAX_PUSH_BYTES:
        return html
    logger.warning("run %s: detail push of %d bytes cut to its status", run.pk, len(html))
    return render_to_string("runs/partials.html#run-status", {"run": run, "oob": oob})


# A run page's snapshot, kept by the run's state. A mass reconnect (a deploy, a restarted
# proxy) brings hundreds of pages of the same few runs back within seconds, and rendering the
# detail was most of a handshake's time (P3 in docs/PERFORMANCE.md). The detail is the same
# for every viewer (each socket cuts it to its role afterwards), and every change the state
# machine or the output writer makes bumps the run's version, which is in the key; what
# changes without one (an account renamed in the admin, the clock in a quota note) is at most
# SNAPSHOT_SECONDS old. Bounded: past SNAPSHOT_CACHE_SIZE entries the expired ones go, then all.
SNAPSHOT_SECONDS = 1.0
SNAPSHOT_CACHE_SIZE = 2000
_details: dict[tuple[Any, ...], tuple[float, str]] = {}
_details_lock = threading.Lock()


def _detail_key(run: Run) -> tuple[Any, ...]:
    return (
        run.pk,
        run.version,
        run.created_at,
        run.updated_at,
        get_current_timezone_name(),
        get_language(),
    )


def _keep_detail(run: Run, html: str) -> None:
    now = time.monotonic()
    with _details_lock:
        if len(_details) >= SNAPSHOT_CACHE_SIZE:
            for key, (at, _html) in list(_details.items()):
                if now - at >= SNAPSHOT_SECONDS:
                    del _details[key]
            if len(_details) >= SNAPSHOT_CACHE_SIZE:
                _details.clear()
        _details[_detail_key(run)] = (now, html)


def snapshot_detail(run: Run) -> str:
    """The run's detail for a page that (re)connects: `run` is its row as just read (the
    access check's), and the detail is rendered only when no page or push of this process
    rendered this version in the last SNAPSHOT_SECONDS (sync: database and templates)."""
    found = _details.get(_detail_key(run))
    if found is not None and time.monotonic() - found[0] < SNAPSHOT_SECONDS:
        return found[1]
    current = load(run.pk)
    html = render_detail(current)
    _keep_detail(current, html)
    return html


def render_run_response(run: Run, *, on_run_page: bool) -> str:
    """What an htmx action on a run answers: the fragments the page it came from shows (the
    run's own page has the detail; a list has the row)."""
    if on_run_page:
        return render_detail(run, oob=True)
    return render_to_string("runs/partials.html#run-row", {"run": run, "oob": True}).strip()


def _send(group: str, html: str, meta: dict[str, Any] | None = None) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": MESSAGE_TYPE, "html": html, "meta": meta})
    except Exception:
        # The channel layer is a fast hint, not the record: a failed push is logged and the
        # clients resync from the database on their next (re)connect.
        logger.exception("live push to %s failed", group)


async def _asend(group: str, html: str, meta: dict[str, Any] | None = None) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group, {"type": MESSAGE_TYPE, "html": html, "meta": meta})
    except Exception:
        logger.exception("live push to %s failed", group)


def facts(run: Run) -> dict[str, Any]:
    """What a filtered list needs to know to decide whether a pushed row belongs on it."""
    return {
        "id": run.pk,
        "status": run.status,
        "provider": run.provider,
        "created_by_id": run.created_by_id,
        "prompt": run.prompt,
        "stop_reason": run.stop_reason,
        "created": False,
    }


Rendered = tuple[int, str | None, dict[str, Any], str | None]


def _render(
    run_id: int, created: bool, *, row: bool = True, detail: bool = True
) -> Rendered | None:
    """A run's pushes, rendered once for every viewer: (team id, row, row facts, detail);
    a part nobody listens to is not rendered (None)."""
    try:
        run = load(run_id)
    except Run.DoesNotExist:
        return None
    detail_html = None
    if detail:
        detail_html = render_detail(run)
        # A page that connects next gets this very render as its snapshot.
        _keep_detail(run, detail_html)
    return (
        run.team_id,
        render_row(run, created=created) if row else None,
        {**facts(run), "created": created},
        detail_html,
    )


def push_run(run_id: int, *, created: bool = False) -> None:
    """Push a run's current state to its groups (called after commit, from sync code)."""
    loop = layers.owning_loop()
    if loop is None:
        # No event loop owns this thread (a management command, a sync test): send now.
        rendered = _render(run_id, created)
        if rendered is not None:
            team_id, row, meta, detail = rendered
            if row is not None:
                _send(team_group(team_id), row, meta=meta)
            if detail is not None:
                _send(run_group(run_id), detail)
        return
    # A fresh context: the caller's belongs to its sync_to_async call, and a task inheriting
    # it could not make thread-sensitive calls of its own.
    loop.call_soon_threadsafe(_request, run_id, created, context=contextvars.Context())


# Per run: a push waiting to be rendered and sent ("is it a new run?"), and the task
# sending that run's pushes. Only the loop's thread touches these.
_waiting: dict[int, bool] = {}
_sending: dict[int, asyncio.Task[None]] = {}


def _request(run_id: int, created: bool) -> None:
    # Requests that arrive while one is waiting coalesce: the snapshot is read when it is
    # rendered, so it carries every change so far (and a new run stays an insertion).
    _waiting[run_id] = _waiting.get(run_id, False) or created
    loop = asyncio.get_running_loop()
    task = _sending.get(run_id)
    if task is None or task.done() or task.get_loop() is not loop:
        _sending[run_id] = loop.create_task(_send_waiting(run_id))


def _render_or_reset(run_id: int, created: bool, *, row: bool, detail: bool) -> Rendered | None:
    try:
        return _render(run_id, created, row=row, detail=detail)
    except DatabaseError:
        # This thread keeps its connection between pushes; a broken one is dropped here.
        close_old_connections()
        raise


# Run id -> team id, learnt from the first push (a run never changes team); bounded.
_team_of: dict[int, int] = {}


async def _send_waiting(run_id: int) -> None:
    try:
        while run_id in _waiting:
            created = _waiting.pop(run_id)
            team_id = _team_of.get(run_id)
            # Rendering is most of a push's cost: a part no viewer listens to is skipped (a
            # viewer who arrives later gets the current state as its snapshot).
            detail = await layers.has_members(run_group(run_id))
            row = team_id is None or await layers.has_members(team_group(team_id))
            if not (row or detail):
                continue
            try:
                # In the run's lane: after the transition that asked for it, beside other runs'.
                rendered = await dbthreads.call(
                    run_id, _render_or_reset, run_id, created, row=row, detail=detail
                )
            except Exception:
                logger.exception("rendering the push of run %s failed", run_id)
                continue
            if rendered is None:
                continue
            team_id, row_html, meta, detail_html = rendered
            if len(_team_of) > 10_000:
                _team_of.clear()
            _team_of[run_id] = team_id
            if row_html is not None:
                await _asend(team_group(team_id), row_html, meta=meta)
            if detail_html is not None:
                await _asend(run_group(run_id), detail_html)
    finally:
        if _sending.get(run_id) is asyncio.current_task():
            del _sending[run_id]


def render_output(run_id: int) -> str | None:
    run = (
        Run.objects.only(
            "id", "version", "status", "provider", "output", "structured_output", "team_id"
        )
        .filter(pk=run_id)
        .first()
    )
    if run is None:
        return None
    html = render_to_string("runs/partials.html#run-output", {"run": run})
    # Over a websocket message's limit (a huge structured answer): the full pushes, cut to
    # the status card, say what happened; the page shows the rest on reload.
    return html if len(html.encode()) <= MAX_PUSH_BYTES else None


async def drain() -> None:
    """Wait until every push handed to this loop has been sent (tests, shutdown)."""
    while pending := [task for task in _sending.values() if not task.done()]:
        await asyncio.gather(*pending, return_exceptions=True)


def render_removal(run_id: int) -> str:
    """A row that no longer matches a viewer's filter leaves that viewer's list."""
    return f'<tr id="run-row-{run_id}" hx-swap-oob="delete"></tr>'


def render_rows(runs: list[Run], rows_id: str) -> str:
    """The whole table body of a list page: what a (re)connecting list resyncs from."""
    return render_to_string("runs/partials.html#run-rows", {"runs": runs, "rows_id": rows_id})


def viewer_key(membership: Membership) -> tuple[Any, ...]:
    """What `for_viewer` depends on: viewers with the same key see the same push, so a
    process cuts each push once per key, not once per socket."""
    if membership.is_admin:
        return ("admin",)
    member = membership.role == "member"
    stops: Any = "all" if member and membership.team.members_can_stop_others else None
    if stops is None:
        stops = ("own", membership.user_id) if member else "none"
    return (membership.can_launch, stops)


# --- Output deltas ----------------------------------------------------------------------------
#
# A run's output reaches its page as appends, not as re-rendered sections. The watcher that
# follows the run sends each run's new text (batched every RUNBRAKE_OUTPUT_PUSH_SECONDS) to the
# run's group as a JSON frame; the database keeps the text at a slower cadence
# (RUNBRAKE_OUTPUT_FLUSH_SECONDS) and always on a terminal state. Offsets are in characters
# (code points) and only the server counts them; the page compares them:
#
#   {"type": "output.append", "run": id, "at": a, "end": e, "text": t}  text[a:e] == t
#   {"type": "output.text", "run": id, "at": a, "end": e, "text": t}    the whole tail from a
#
# A page whose shown text does not end at `at` missed something (it connected between saves,
# a frame was dropped): it sends {"type": "output.want"} and its socket answers with the saved
# section while the run's watcher answers with an `output.text` of what it holds in memory.

FRAME_TYPE = "push.frame"
APPEND = "output.append"
TEXT = "output.text"
WANT = "output.want"


def output_frame(kind: str, run_id: int, at: int, end: int, text: str) -> str:
    # JSON is the escaping: the page inserts `text` as a text node, never as HTML.
    return json.dumps(
        {"type": kind, "run": run_id, "at": at, "end": end, "text": text},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def tail_frame(run_id: int, text: str) -> str:
    """The whole text as the page shows it (its end), for a page that asked."""
    shown = text[-OUTPUT_SHOWN_CHARS:]
    return output_frame(TEXT, run_id, len(text) - len(shown), len(text), shown)


# Redis: whether a run page is open anywhere costs a round trip, so the answer is kept for a
# second (a page that opens meanwhile sees a gap at the next frame and asks for the text).
_MEMBERS_TTL = 1.0
_members_seen: dict[str, tuple[float, bool]] = {}


async def _watched(group: str) -> bool:
    layer = get_channel_layer()
    if layer is None:
        return False
    if layers.is_local(layer):
        return await layers.has_members(group)
    now = time.monotonic()
    seen = _members_seen.get(group)
    if seen is not None and seen[0] > now:
        return seen[1]
    if len(_members_seen) > 10_000:
        _members_seen.clear()
    answer = await layers.has_members(group)
    _members_seen[group] = (now + _MEMBERS_TTL, answer)
    return answer


class FrameSource(Protocol):
    """A run's output as it arrives (the watcher's session)."""

    @property
    def run_id(self) -> int: ...

    def take_frame(self) -> str | None:
        """The text the pages have not been sent yet, as a frame (None: nothing new)."""

    def skip_frame(self) -> None:
        """Nobody watches the run: forget what was not sent."""


async def send_frames(sources: Iterable[FrameSource]) -> None:
    """Send each run's new output to the pages that have the run open; a run nobody watches
    costs no frame. Best effort: a lost frame is a gap the page repairs."""
    layer = get_channel_layer()
    if layer is None:
        return
    for source in sources:
        group = run_group(source.run_id)
        if not await _watched(group):
            source.skip_frame()
            continue
        frame = source.take_frame()
        if frame is None:
            continue
        try:
            await layer.group_send(group, {"type": FRAME_TYPE, "frame": frame})
        except Exception:
            logger.warning("output frame for run %s not sent", source.run_id, exc_info=True)


# --- Watchers: "a run was launched", "a page wants a run's text" --------------------------------

# The group every watcher process listens on (scaled out; one process calls its own directly).
WATCHERS_GROUP = "runbrake-watchers"
NUDGE = "watcher.nudge"

# The watcher of this process, if it has one: it takes its messages directly.
_local_watcher: Callable[[dict[str, Any]], None] | None = None


def serve_watcher(handler: Callable[[dict[str, Any]], None]) -> None:
    """Register this process's watcher: it takes nudges and wants from this process without
    the channel layer."""
    global _local_watcher
    _local_watcher = handler


def unserve_watcher(handler: Callable[[dict[str, Any]], None]) -> None:
    global _local_watcher
    if _local_watcher == handler:
        _local_watcher = None


def nudge_watchers() -> None:
    """A run was launched, or one the provider has not named was stopped (sync code, after
    commit): the watchers act on it now rather than at their next tick. Lost on the way, it
    costs one tick."""
    _to_watchers({"type": NUDGE}, from_sync=True)


async def want_output(run_id: int) -> None:
    """A page missed part of a run's output: the watcher following the run sends its text."""
    _to_watchers({"type": WANT, "run": run_id}, from_sync=False)


def _to_watchers(message: dict[str, Any], *, from_sync: bool) -> None:
    if _local_watcher is not None:
        _local_watcher(message)
        if message["type"] == NUDGE:
            return  # the local watcher takes launches; other processes poll for theirs
    layer = get_channel_layer()
    if layer is None or layers.is_local(layer):
        return
    if from_sync and layers.owning_loop() is None:
        try:
            async_to_sync(layer.group_send)(WATCHERS_GROUP, message)
        except Exception:
            logger.warning("could not reach the watchers; they pick the run up next tick")
        return
    _send_control(WATCHERS_GROUP, message)


async def listen_as_watcher(handler: Callable[[dict[str, Any]], None], pause: float) -> None:
    """Scaled out, feed the watcher's handler with what other processes send the watchers,
    until cancelled. Errors (Redis down) are logged and retried: a lost nudge costs a tick,
    a lost want a page's retry."""
    layer = get_channel_layer()
    if layer is None or layers.is_local(layer):
        return
    while True:
        try:
            channel = await layer.new_channel()
            await layer.group_add(WATCHERS_GROUP, channel)
            while True:
                handler(await layer.receive(channel))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("watcher messages unavailable; polling every tick", exc_info=True)
            await asyncio.sleep(pause)


# --- Fan-out: one subscription per group per process ----------------------------------------------


class Listener(Protocol):
    """A socket of this process (runs/realtime/consumers.py)."""

    def deliver(self, message: dict[str, Any], cuts: dict[Any, str]) -> None:
        """Take one group message, without waiting; `cuts` is shared by every listener of
        this message, for versions of it that several viewers see the same way."""


# Sockets handed one message between two turns of the event loop (see Hub._read).
FANOUT_BATCH = 32


class Hub:
    """A process's subscriptions to the channel layer: each group with sockets here is
    received once and handed to every local socket in a plain loop, instead of one
    channel-layer receive, dispatch and task per socket (the cost that made a stop seen by
    1,000 viewers take half a second)."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.members: dict[str, set[Listener]] = {}
        self.readers: dict[str, asyncio.Task[None]] = {}
        self.subscribed: dict[str, asyncio.Future[None]] = {}

    async def join(self, group: str, member: Listener) -> None:
        """Return once the group's messages reach this member."""
        self.members.setdefault(group, set()).add(member)
        ready = self.subscribed.get(group)
        if ready is None:
            ready = self.subscribed[group] = asyncio.get_running_loop().create_future()
            self.readers[group] = asyncio.create_task(self._read(group, ready))
        try:
            await asyncio.shield(ready)
        except BaseException:
            self.leave(group, member)
            raise

    def leave(self, group: str, member: Listener) -> None:
        members = self.members.get(group)
        if members is None:
            return
        members.discard(member)
        if members:
            return
        del self.members[group]
        self.subscribed.pop(group, None)
        reader = self.readers.pop(group, None)
        if reader is not None:
            reader.cancel()

    async def _read(self, group: str, ready: asyncio.Future[None]) -> None:
        layer = self.layer
        try:
            channel = await layer.new_channel()
            await layer.group_add(group, channel)
        except BaseException as exc:
            if self.readers.get(group) is asyncio.current_task():
                del self.readers[group]
                self.subscribed.pop(group, None)
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else ConnectionError())
            raise
        ready.set_result(None)
        try:
            while True:
                try:
                    message = await layer.receive(channel)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.warning("live group %s: receive failed; retrying", group, exc_info=True)
                    await asyncio.sleep(0.5)
                    continue
                cuts: dict[Any, str] = {}
                for count, member in enumerate(list(self.members.get(group, ())), 1):
                    try:
                        member.deliver(message, cuts)
                    except Exception:
                        logger.exception("live group %s: a socket failed a push", group)
                    if count % FANOUT_BATCH == 0:
                        # A socket's send mostly completes inside deliver (an eager task):
                        # without a pause, a push to 1,000 sockets holds the loop for the
                        # whole fan-out (half a second under daphne), and every request,
                        # handshake and stream of the process waits. Order is kept: this
                        # group's next message is not received before this one is handed out.
                        await asyncio.sleep(0)
        finally:
            try:
                await layer.group_discard(group, channel)
            except Exception:
                logger.debug("live group %s: discard failed", group, exc_info=True)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


def hub() -> Hub:
    """This event loop's hub (one per process in production; tests run several loops)."""
    loop = asyncio.get_running_loop()
    layer = get_channel_layer()
    found = _hubs.get(loop)
    if found is None or found.layer is not layer:
        found = _hubs[loop] = Hub(layer)
    return found
