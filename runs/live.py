"""Live updates: the only module that knows group names and talks to the channel layer.

Contract:
- `team-<id>` carries the run rows of a team's shared list; `run-<id>` one run's detail.
- A push is a snapshot of HTML fragments rendered from the database *after* the transaction
  committed (callers use `transaction.on_commit`), never a diff: a client that missed a push
  is made whole by the next one, and by the snapshot every consumer sends on (re)connect.
- Every fragment root carries `data-version`; the browser drops a push older than what it
  shows, so pushes that overtake each other cannot roll the screen back.
- A push is rendered once for all viewers. Inside a server or watcher process, `push_run`
  (sync code, after commit) only hands the run id to the process's event loop and returns, so
  the caller (a stop about to call the provider) waits for neither rendering nor the channel
  layer. The loop renders the snapshot in a worker thread and sends it from async code
  (`group_send` from async code ~0.5 ms, through `async_to_sync` 6-10 ms). One run's pushes go
  out in order, one at a time; requests that arrive meanwhile coalesce into the next one.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import re
from typing import TYPE_CHECKING, Any

from asgiref.sync import SyncToAsync, async_to_sync, sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import DatabaseError, close_old_connections
from django.template.loader import render_to_string

if TYPE_CHECKING:
    from .models import Membership, Run

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
    member = membership.role == "member"  # Role.MEMBER (models imports this module)
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
    loop = _owning_loop()
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
    from .models import Run

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
    from .models import Run

    try:
        run = load(run_id)
    except Run.DoesNotExist:
        return None
    return (
        run.team_id,
        render_row(run, created=created) if row else None,
        {**facts(run), "created": created},
        render_detail(run) if detail else None,
    )


def push_output(run_id: int) -> None:
    """Push only a run's output section to its page: the watcher saves output many times a
    second, and the row, the status card and the events do not change with it."""
    push_run(run_id, output_only=True)


def push_run(run_id: int, *, created: bool = False, output_only: bool = False) -> None:
    """Push a run's current state to its groups (called after commit, from sync code)."""
    loop = _owning_loop()
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
    loop.call_soon_threadsafe(
        _request, run_id, created, not output_only, context=contextvars.Context()
    )


def _owning_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop this sync code runs for: the one that called sync_to_async."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    pid = getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None)
    if loop is None or pid != os.getpid() or loop.is_closed() or not loop.is_running():
        return None
    return loop


# Per run: a push waiting to be rendered and sent ("is it a new run?", "more than its
# output?"), and the task sending that run's pushes. Only the loop's thread touches these.
_waiting: dict[int, tuple[bool, bool]] = {}
_sending: dict[int, asyncio.Task[None]] = {}


def _request(run_id: int, created: bool, full: bool = True) -> None:
    # Requests that arrive while one is waiting coalesce: the snapshot is read when it is
    # rendered, so it carries every change so far (and a new run stays an insertion).
    was_created, was_full = _waiting.get(run_id, (False, False))
    _waiting[run_id] = (was_created or created, was_full or full)
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
            created, full = _waiting.pop(run_id)
            if not full:
                await _send_output(run_id)
                continue
            team_id = _team_of.get(run_id)
            # Rendering is most of a push's cost: a part no viewer listens to is skipped (a
            # viewer who arrives later gets the current state as its snapshot).
            detail = await listened(run_group(run_id))
            row = team_id is None or await listened(team_group(team_id))
            if not (row or detail):
                continue
            try:
                rendered = await sync_to_async(_render_or_reset)(
                    run_id, created, row=row, detail=detail
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
    from .models import Run

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
    # Over a websocket message's limit (a huge structured answer): the next full push, cut
    # to the status card, says what happened; the page shows the rest on reload.
    return html if len(html.encode()) <= MAX_PUSH_BYTES else None


async def _send_output(run_id: int) -> None:
    group = run_group(run_id)
    if not await listened(group):
        return
    try:
        html = await sync_to_async(render_output)(run_id)
    except Exception:
        logger.exception("rendering the output push of run %s failed", run_id)
        return
    if html is not None:
        await _asend(group, html)


async def listened(group: str) -> bool:
    """Whether a consumer in any process is in the group. In-memory: the layer's own table;
    Redis pub/sub: PUBSUB NUMSUB of the group's channel (each process with members of the
    group subscribes to it once). Unsure means yes."""
    layer: Any = get_channel_layer()
    if layer is None:
        return False
    if isinstance(layer, InMemoryChannelLayer):
        return bool(layer.groups.get(group))
    try:
        loop_layer = layer._get_layer()
        channel = loop_layer._get_group_channel_name(group)
        shard = loop_layer._get_shard(channel)
        shard._ensure_redis()
        counts = await shard._redis.pubsub_numsub(channel)
        return bool(counts and counts[0][1] > 0)
    except Exception:
        return True


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
