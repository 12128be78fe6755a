"""Live updates: the only module that knows group names and talks to the channel layer.

Contract:
- `team-<id>` carries the run rows of a team's shared list; `run-<id>` one run's detail.
- A push is a snapshot of HTML fragments rendered from the database *after* the transaction
  committed (callers use `transaction.on_commit`), never a diff: a client that missed a push
  is made whole by the next one, and by the snapshot every consumer sends on (re)connect.
- Every fragment root carries `data-version`; the browser drops a push older than what it
  shows, so pushes that overtake each other cannot roll the screen back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.template.loader import render_to_string

if TYPE_CHECKING:
    from .models import Run

logger = logging.getLogger(__name__)

MESSAGE_TYPE = "push.html"

# Every push must fit one websocket frame: daphne refuses to *send* a message over its 64 KiB
# limit (serve.py) and the consumer dies with it, so a run with a long output could never be
# watched. Pages and pushes show the end of the output (the whole text is a link away), and a
# detail push that is still too big carries only the run's status, which always fits.
MAX_PUSH_BYTES = 56 * 1024
OUTPUT_SHOWN_CHARS = 12_000


def team_group(team_id: int) -> str:
    return f"team-{team_id}"


def run_group(run_id: int) -> str:
    return f"run-{run_id}"


def load(run_id: int) -> Run:
    from .models import Run

    return Run.objects.select_related(
        "provider_account", "created_by", "stop_requested_by", "team"
    ).get(pk=run_id)


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


def push_run(run_id: int, *, created: bool = False) -> None:
    from .models import Run

    try:
        run = load(run_id)
    except Run.DoesNotExist:
        return
    _send(
        team_group(run.team_id),
        render_row(run, created=created),
        meta={**facts(run), "created": created},
    )
    _send(run_group(run.pk), render_detail(run))


def render_removal(run_id: int) -> str:
    """A row that no longer matches a viewer's filter leaves that viewer's list."""
    return f'<tr id="run-row-{run_id}" hx-swap-oob="delete"></tr>'


def render_rows(runs: list[Run], rows_id: str) -> str:
    """The whole table body of a list page: what a (re)connecting list resyncs from."""
    return render_to_string("runs/partials.html#run-rows", {"runs": runs, "rows_id": rows_id})
