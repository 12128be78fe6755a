from __future__ import annotations

import json
import threading
from typing import Any

from django import template
from django.utils.safestring import SafeString, mark_safe
from django.utils.timezone import get_current_timezone_name
from django.utils.translation import get_language
from markdown_it import MarkdownIt

from runs.realtime.live import OUTPUT_SHOWN_CHARS

register = template.Library()

# Raw HTML is off, so provider output can never inject markup; markdown-it also refuses
# javascript:, vbscript: and data: links.
_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


# What the bulk stop's report calls each outcome (BulkStopResult.outcome).
OUTCOME_LABELS = {
    "stopped": "Stopped",
    "stopping": "Stopping (awaiting confirmation)",
    "queued": "Stop queued (provider quota)",
    "unconfirmed": "Unconfirmed",
    "already_finished": "Already finished",
    "not_allowed": "Not allowed",
    "not_found": "Not found",
    "failed": "Failed",
}


@register.filter
def outcome_label(outcome: str) -> str:
    return OUTCOME_LABELS.get(outcome, outcome)


@register.filter
def markdown(text: str) -> SafeString:
    html: str = _markdown.render(text or "")
    return mark_safe(html)  # noqa: S308 - html disabled above


@register.filter
def shown_output(text: str) -> str:
    """The end of a long output, from a line start: what the page and every push show. A push
    must fit one websocket frame (64 KiB under daphne), so the whole text is a link away."""
    text = text or ""
    if len(text) <= OUTPUT_SHOWN_CHARS:
        return text
    tail = text[-OUTPUT_SHOWN_CHARS:]
    newline = tail.find("\n")
    return tail[newline + 1 :] if 0 <= newline < OUTPUT_SHOWN_CHARS // 4 else tail


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


@register.filter
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@register.filter
def may_stop(membership: Any, run: Any) -> bool:
    """On a page, whether its viewer may stop this run (controls they cannot use are not
    rendered). A push has no viewer: it carries the controls between markers and each socket
    removes those its user may not use (runs/realtime/live.py `for_viewer`)."""
    if membership is None or membership == "":
        return True
    return bool(membership.can_stop(run))


@register.filter
def may_launch(membership: Any) -> bool:
    if membership is None or membership == "":
        return True
    return bool(membership.can_launch)


@register.filter
def may_admin(membership: Any) -> bool:
    if membership is None or membership == "":
        return True
    return bool(membership.is_admin)


# Events that repeat while a stop goes unconfirmed or a provider keeps refusing: the timeline
# shows each run of them once, with a count, so the story stays readable.
REPEATING = {"stop_failed", "backoff", "quota_wait", "stop_answer", "provider_error"}


@register.filter
def collapse_repeats(events: list[Any]) -> list[tuple[Any, int]]:
    """Consecutive events of one repeating kind as (the last of them, how many)."""
    collapsed: list[tuple[Any, int]] = []
    for event in events:
        if collapsed and event.kind in REPEATING and collapsed[-1][0].kind == event.kind:
            collapsed[-1] = (event, collapsed[-1][1] + 1)
        else:
            collapsed.append((event, 1))
    return collapsed


# Status words Runbrake writes for a provider (an event's name, the source of its news) in the
# words a person reads; a provider's own status word (Fay's PROCESSING) is shown as it is.
PROVIDER_WORDS = {
    "message_end": "reply ended",
    "streaming": "streaming",
    "generating": "generating",
    "history:answer": "answer saved in its history",
    "history:no_answer": "ended with no answer in its history",
    "history:error": "error in its history",
    "abort": "aborted",
    "active": "working",
    "stop accepted": "stop accepted",
}


@register.filter
def provider_words(status: str) -> str:
    """`workflow_finished:stopped` → "workflow stopped", `error:completion_request_error` →
    "error (completion request error)", `finish:stop` → "finished"."""
    if not status:
        return ""
    if status in PROVIDER_WORDS:
        return PROVIDER_WORDS[status]
    head, _, tail = status.partition(":")
    tail = tail.replace("_", " ")
    if head == "workflow_finished":
        return f"workflow {tail}"
    if head == "finish":
        return "finished" if tail in ("", "stop") else f"finished ({tail})"
    if head == "error":
        return f"error ({tail})" if tail else "error"
    return status.replace("_", " ")


# A finished run's row, by everything it shows: most of a list page is finished runs, and
# rendering 25 rows through the template engine was two thirds of the page's time (P5 in
# docs/PERFORMANCE.md). The key is every value the row reads, not only (id, version): an
# account renamed or a username changed bumps no run's version, and neither does an update
# outside the state machine (the admin, a test's fixture). Bounded: a process keeps at most
# ROW_CACHE_SIZE rows (a few MiB), dropping the older half when full.
ROW_CACHE_SIZE = 5000
_rows: dict[tuple[Any, ...], SafeString] = {}
_rows_lock = threading.Lock()


def _row_key(run: Any) -> tuple[Any, ...]:
    return (
        run.pk,
        run.version,
        run.status,
        run.created_at,
        run.started_at,
        run.finished_at,
        run.stop_requested_at,
        run.prompt,
        run.error,
        run.stop_error,
        run.output_incomplete,
        len(run.output or ""),
        run.created_by.get_username() if run.created_by_id else None,
        run.provider_account.name,
        get_current_timezone_name(),
        get_language(),
    )


@register.simple_tag(takes_context=True)
def run_row(context: template.Context, run: Any) -> SafeString:
    """`{% partial run-row %}` for `run`, from the cache when the row cannot change by itself:
    a finished run's row has no controls (nothing depends on the viewer or the CSRF token),
    a fixed elapsed time and no quota note (which reads the clock). An active run's row is
    rendered every time."""
    engine = context.template.engine  # type: ignore[union-attr]
    partial = engine.get_template("runs/partials.html#run-row")
    key = None
    if (
        run.is_terminal
        and run.finished_at is not None
        and not run.quota_endpoint
        and not context.get("oob")
    ):
        key = _row_key(run)
        if (html := _rows.get(key)) is not None:
            return html
    with context.push(run=run):
        html = mark_safe(partial.render(context))  # noqa: S308 - the template escaped it
    if key is not None:
        with _rows_lock:
            if len(_rows) >= ROW_CACHE_SIZE:
                for old in list(_rows)[: ROW_CACHE_SIZE // 2]:
                    del _rows[old]
            _rows[key] = html
    return html
