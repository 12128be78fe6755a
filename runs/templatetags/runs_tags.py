from __future__ import annotations

import json
from typing import Any

from django import template
from django.utils.safestring import SafeString, mark_safe
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
