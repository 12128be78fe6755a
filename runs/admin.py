"""The operator's console: every run of every team, stoppable from here.

Runs are never edited by hand: their status only moves through the state machine, so the run
pages are read-only and the two verbs an operator needs are admin actions (on the list and on
a run's own page): *Stop*, through the same verified stop path as the Cancel button, and
*Force mark stopped*, the last resort for a stop the provider never confirmed.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, cast

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.contrib.admin import ActionLocation, helpers
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from runs.models import (
    ACTIVE,
    FINISHED,
    FORCE_REASON_MAX,
    STOP_IN_PROGRESS,
    ApiToken,
    BulkStopResult,
    Channel,
    Membership,
    Proof,
    ProviderAccount,
    Run,
    RunEvent,
    Status,
    Team,
    astop_runs,
)
from runs.security.hostile import as_id
from runs.web.login import throttled_login

admin.site.site_header = "Runbrake operations"
# The admin's login form is limited like Runbrake's own (failed attempts per address and name).
_admin_login = admin.site.login


def _throttled_admin_login(
    request: HttpRequest, extra_context: dict[str, Any] | None = None
) -> HttpResponse:
    answer = throttled_login(request, lambda r: _admin_login(r, extra_context))
    return cast(HttpResponse, answer)


admin.site.login = _throttled_admin_login  # type: ignore[method-assign]
admin.site.site_title = "Runbrake admin"
admin.site.index_title = "Teams, provider accounts and runs"

BOTH_PLACES = [ActionLocation.CHANGE_LIST, ActionLocation.CHANGE_FORM]


def _moment(value: dt.datetime | None, *, seconds: bool = False) -> str:
    if value is None:
        return "—"
    local = timezone.localtime(value)
    if seconds:
        return local.strftime("%Y-%m-%d %H:%M:%S.") + f"{local.microsecond // 1000:03d}"
    return local.strftime("%Y-%m-%d %H:%M")


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


# --- Teams ------------------------------------------------------------------------------------


class MembershipInline(admin.TabularInline[Membership, Team]):
    model = Membership
    autocomplete_fields = ["user"]

    def get_extra(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> int:
        # A new team needs its first member; an existing one has an "Add another" link.
        return 1 if obj is None else 0


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin[Team]):
    list_display = ["name", "member_count", "run_count", "members_can_stop_others", "created_at"]
    search_fields = ["name"]
    readonly_fields = ["created_at"]
    inlines = [MembershipInline]

    class Media:
        css = {"all": ["css/admin.css"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Team]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                member_total=Count("memberships", distinct=True),
                run_total=Count("runs", distinct=True),
            )
        )

    @admin.display(description="Members", ordering="member_total")
    def member_count(self, obj: Any) -> int:
        total: int = obj.member_total  # annotated by get_queryset
        return total

    @admin.display(description="Runs", ordering="run_total")
    def run_count(self, obj: Any) -> int:
        total: int = obj.run_total  # annotated by get_queryset
        return total


# --- Provider accounts --------------------------------------------------------------------------


class ProviderAccountForm(forms.ModelForm[ProviderAccount]):
    # The key is write-only: blank keeps the stored one, and the stored one is never sent back.
    api_key = forms.CharField(
        label="New API key",
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Stored encrypted. Leave blank to keep the current key.",
    )

    class Meta:
        model = ProviderAccount
        fields = ["team", "kind", "name", "base_url", "api_key", "options"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Keep the decrypted key out of the form altogether: not rendered, and a blank field
        # is then "unchanged" rather than logged in the history as "Changed API key".
        self.initial["api_key"] = ""

    def clean_api_key(self) -> str:
        key = self.cleaned_data.get("api_key") or ""
        if not key and not self.instance.pk:
            raise forms.ValidationError("An API key is required for a new account.")
        return key or self.instance.api_key


@admin.register(ProviderAccount)
class ProviderAccountAdmin(admin.ModelAdmin[ProviderAccount]):
    form = ProviderAccountForm
    list_display = ["name", "team", "kind", "base_url", "masked_key", "created_at"]
    list_filter = ["kind", "team"]
    list_select_related = ["team"]
    search_fields = ["name", "base_url", "team__name"]
    readonly_fields = ["masked_key", "created_at"]
    fieldsets = [
        (None, {"fields": ["team", "kind", "name", "base_url", "options"]}),
        ("API key", {"fields": ["masked_key", "api_key"]}),
        ("Record", {"fields": ["created_at"]}),
    ]

    @admin.display(description="Current key")
    def masked_key(self, obj: ProviderAccount) -> str:
        return obj.masked_key if obj.pk else "—"


# --- Runs -------------------------------------------------------------------------------------


class RunEventInline(admin.TabularInline[RunEvent, Run]):
    model = RunEvent
    extra = 0
    can_delete = False
    show_change_link = False
    fields = readonly_fields = (
        "when",
        "kind",
        "from_status",
        "to_status",
        "actor",
        "channel",
        "message",
        "data",
    )

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="At")
    def when(self, obj: RunEvent) -> str:
        # To the millisecond: the gap between "stop requested" and "stopped" is the point.
        return _moment(obj.at, seconds=True)


class StoppedByFilter(admin.RelatedOnlyFieldListFilter):
    """Who pressed stop: only people who ever stopped a run are offered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = "stopped by"


class RunActionForm(helpers.ActionForm):
    # Beside the action menu, so a stop from the admin can say why, like the Cancel dialog.
    reason = forms.CharField(
        label="Reason:",
        required=False,
        max_length=500,
        widget=forms.TextInput(attrs={"placeholder": "optional", "size": 24}),
    )


class ForceMarkForm(forms.Form):
    reason = forms.CharField(
        label="Reason",
        max_length=FORCE_REASON_MAX,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text=(
            "Required, and recorded on each run's timeline: why you are sure the provider "
            "is no longer working on it."
        ),
    )


# Outcome → (message level, how the group of runs is introduced), in the order shown.
# Outcomes that are not the last word: the admin's message follows them live.
FOLLOWED_OUTCOMES = {"stopping", "unconfirmed", "failed"}
OUTCOMES = {
    "stopped": (messages.SUCCESS, "Stopped {n}, confirmed by the provider"),
    "stopping": (messages.INFO, "Stopping {n}, awaiting provider confirmation"),
    "unconfirmed": (messages.WARNING, "Stop unconfirmed for {n} (Runbrake keeps checking)"),
    "already_finished": (messages.INFO, "Already finished, nothing to stop for {n}"),
    "failed": (messages.ERROR, "The stop call failed for {n} (Runbrake retries it)"),
}


MAX_FOLLOWED = 200


def _where_it_stands(run: Run) -> str:
    if run.status == Status.STOPPED and run.proof:
        return f"#{run.pk} stopped, confirmed by {Proof(run.proof).label}"
    if run.status == Status.COMPLETED and run.stop_requested_at:
        return f"#{run.pk} completed despite the stop"
    if run.status == Status.STOPPING and run.stop_error:
        return f"#{run.pk} still stopping (last stop call: {run.stop_error.rstrip('.')})"
    return f"#{run.pk} {Status(run.status).label.lower().rstrip('…')}"


@admin.register(Run)
class RunAdmin(admin.ModelAdmin[Run]):
    list_display = [
        "id",
        "status_badge",
        "team_and_provider",
        "short_prompt",
        "launched",
        "stop_summary",
    ]
    list_filter = [
        "status",
        "provider",
        "team",
        ("stop_requested_by", StoppedByFilter),
        "stop_channel",
        "created_at",
    ]
    search_fields = ["prompt", "external_id", "created_by__username", "created_by__email"]
    search_help_text = "Prompt, the provider's run id, or the owner's username or email."
    date_hierarchy = "created_at"
    list_select_related = ["team", "created_by", "stop_requested_by"]
    list_display_links = ["id", "status_badge"]
    list_per_page = 50
    inlines = [RunEventInline]
    action_form = RunActionForm
    actions = ["stop_selected", "force_mark_stopped"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    ("status_badge", "team", "created_by"),
                    ("provider_account", "provider"),
                    ("timeout_seconds", "no_progress_seconds"),
                    "prompt",
                    "options",
                ]
            },
        ),
        (
            "At the provider",
            {
                "fields": [
                    ("external_id", "provider_status"),
                    "provider_refs",
                    "output",
                    "structured_output",
                    "error",
                ]
            },
        ),
        (
            "Timestamps",
            {
                "fields": [
                    ("created_at", "start_attempted_at", "started_at"),
                    ("deadline", "stall_deadline", "finished_at", "updated_at", "version"),
                ]
            },
        ),
        (
            "Watcher",
            {
                "description": "The watcher process following this run, and until when its "
                "lease holds without renewal.",
                "fields": [("watched_by", "watch_lease_until")],
            },
        ),
        (
            "Stop",
            {
                "fields": [
                    ("stop_requested_at", "stop_requested_by", "stop_channel"),
                    "stop_reason",
                    ("stop_deadline", "stop_attempts", "stop_sent_at", "stop_next_attempt_at"),
                    "stop_answer",
                    "stop_error",
                    ("stop_confirmed_at", "stop_confirmation", "stop_latency"),
                ]
            },
        ),
    ]
    # Status only changes through the state machine, never by editing a form.
    readonly_fields = [
        *(f.name for f in Run._meta.concrete_fields),
        "status_badge",
        "stop_latency",
    ]

    class Media:
        css = {"all": ["css/admin.css"]}
        js = ["js/admin.js"]

    def get_urls(self) -> list[URLPattern]:
        follow = path(
            "outcomes/",
            self.admin_site.admin_view(self.outcomes_view),
            name="runs_run_outcomes",
        )
        return [follow, *super().get_urls()]

    def outcomes_view(self, request: HttpRequest) -> JsonResponse:
        """Where runs an operator just stopped stand now, for the message that follows them."""
        if not self.has_view_permission(request):
            return JsonResponse(
                {"error": {"code": "FORBIDDEN", "message": "You may not view runs."}}, status=403
            )
        raw = request.GET.get("ids", "").split(",")
        given = [as_id(value) for value in raw[:MAX_FOLLOWED]]
        ids = [pk for pk in given if pk is not None]
        if not ids or len(ids) < len(given):
            return JsonResponse(
                {"error": {"code": "VALIDATION_ERROR", "message": "ids must be run ids."}},
                status=400,
            )
        found = self.get_queryset(request).filter(pk__in=ids).order_by("pk")
        return JsonResponse(
            {
                "runs": [
                    {
                        "id": run.pk,
                        "status": run.status,
                        "settled": run.is_terminal,
                        "text": _where_it_stands(run),
                        # The list's own cells for this run, so its row agrees with the message.
                        "cells": {
                            "status_badge": self.status_badge(run),
                            "stop_summary": self.stop_summary(run),
                        },
                    }
                    for run in found.select_related("stop_requested_by")
                ]
            }
        )

    # --- Permissions: read-only runs; stopping is its own permission ----------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Read-only: the change page renders as a view page, with no Save buttons.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Deleting a run erases its audit trail (the events go with it): superusers only, and
        # never a run still active (the provider would go on working, and billing, with
        # nothing left to stop it: stop it first).
        if obj is not None and obj.is_active:
            return False
        return request.user.is_superuser

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        active = queryset.filter(status__in=ACTIVE)
        if active.exists():
            self.message_user(
                request,
                f"Not deleted: {_ids(active)} still active. Stop them first; the provider "
                "would go on working on them.",
                messages.ERROR,
            )
        super().delete_queryset(request, queryset.exclude(status__in=ACTIVE))

    def has_stop_permission(self, request: HttpRequest) -> bool:
        # The model's "change" permission, which no form uses here, means "may act on runs".
        return request.user.has_perm("runs.change_run")

    # --- Columns ------------------------------------------------------------------------

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj: Run) -> str:
        return format_html(
            '<span class="rb-badge rb-badge-{}">{}</span>', obj.status, obj.get_status_display()
        )

    # Two facts per cell (two lines), so the list fits beside the filters on a laptop.
    @admin.display(description="Team / provider", ordering="team__name")
    def team_and_provider(self, obj: Run) -> str:
        return format_html(
            '{}<br><span class="rb-muted">{}</span>',
            obj.team,
            obj.get_provider_display().split(" (")[0],  # "Fay", not "Fay (deep research)"
        )

    @admin.display(description="Prompt")
    def short_prompt(self, obj: Run) -> str:
        return obj.prompt if len(obj.prompt) <= 60 else obj.prompt[:59] + "…"

    @admin.display(description="Launched", ordering="created_at")
    def launched(self, obj: Run) -> str:
        return format_html(
            '{}<br><span class="rb-muted rb-nowrap">{}</span>',
            obj.created_by or "—",
            _moment(obj.created_at),
        )

    @admin.display(description="Stop", ordering="stop_requested_at")
    def stop_summary(self, obj: Run) -> str:
        if not obj.stop_channel:
            return "—"
        return format_html(
            '{}<br><span class="rb-muted">{} · {}</span>',
            obj.stop_requested_by or "—",
            obj.get_stop_channel_display().lower(),
            _stop_state(obj),
        )

    @admin.display(description="Stop latency")
    def stop_latency(self, obj: Run) -> str:
        return f"{obj.stop_latency_ms} ms" if obj.stop_latency_ms is not None else "—"

    # --- Actions ------------------------------------------------------------------------

    @admin.action(description="Stop this run", permissions=["stop"], location=BOTH_PLACES)
    def stop_selected(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        runs = list(queryset.select_related("provider_account"))
        # The same verified path and outcome reading as the team pages' bulk stop; no role
        # check, since an operator is usually a member of none of the teams.
        results = async_to_sync(astop_runs)(
            runs, actor=request.user, channel=Channel.ADMIN, reason=_posted_reason(request)
        )
        grouped: dict[str, list[BulkStopResult]] = defaultdict(list)
        for result in sorted(results, key=lambda r: r.id):
            grouped[result.outcome].append(result)
        for outcome, (level, intro) in OUTCOMES.items():
            if group := grouped.get(outcome):
                # Messages are sentences; inside the list they lose their last stop.
                listed = "; ".join(f"#{r.id} ({r.message.rstrip('.')})" for r in group)
                text = f"{intro.format(n=_runs(len(group)))}: {listed}."
                if outcome in FOLLOWED_OUTCOMES:
                    # static/js/admin.js follows these runs to their outcome, no reload.
                    self.message_user(
                        request,
                        format_html(
                            '<span data-follow-runs="{}" data-follow-url="{}">{}</span>',
                            ",".join(str(r.id) for r in group),
                            reverse("admin:runs_run_outcomes"),
                            text,
                        ),
                        level,
                    )
                else:
                    self.message_user(request, text, level)

    stop_selected.plural_description = "Stop selected runs"  # type: ignore[attr-defined]

    @admin.action(description="Force mark stopped", permissions=["stop"], location=BOTH_PLACES)
    def force_mark_stopped(
        self, request: HttpRequest, queryset: QuerySet[Run]
    ) -> TemplateResponse | None:
        runs = list(queryset.select_related("team", "stop_requested_by"))
        stuck = [run for run in runs if run.status in STOP_IN_PROGRESS]
        others = [run for run in runs if run.status not in STOP_IN_PROGRESS]
        if not stuck:
            self.message_user(
                request,
                "Nothing to force-mark: none of the selected runs is stuck in Stopping… or "
                "Stop unconfirmed. Use Stop for a run that is still going.",
                messages.WARNING,
            )
            return None
        # Posted back under the same names as the action form that opened the page.
        prefix = _action_prefix(request)
        form_prefix = prefix.removesuffix("-") or None
        if "apply" in request.POST:
            form = ForceMarkForm(request.POST, prefix=form_prefix)
            if form.is_valid():
                self._apply_force_mark(request, stuck, others, form.cleaned_data["reason"])
                return None
        else:
            # The reason typed beside the action menu, if any, starts the confirmation.
            form = ForceMarkForm(
                initial={"reason": _posted_reason(request)[:FORCE_REASON_MAX]},
                prefix=form_prefix,
            )
        return TemplateResponse(
            request,
            "admin/runs/run/force_mark_stopped.html",
            {
                **self.admin_site.each_context(request),
                "title": "Force mark stopped without the provider's confirmation",
                "opts": self.opts,
                "stuck": stuck,
                "others": others,
                "form": form,
                "prefix": prefix,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "selected": [run.pk for run in runs],
                "media": self.media,
            },
        )

    force_mark_stopped.plural_description = (  # type: ignore[attr-defined]
        "Force mark selected runs stopped"
    )

    def _apply_force_mark(
        self, request: HttpRequest, stuck: list[Run], others: list[Run], reason: str
    ) -> None:
        marked, raced = [], []
        for run in stuck:
            if run.force_mark_stopped(actor=request.user, reason=reason):
                marked.append(run)
            else:
                # The provider's confirmation (or its completion) landed since the page loaded.
                raced.append(run)
        if marked:
            self.message_user(
                request,
                f"Force-marked {_runs(len(marked))} stopped without provider confirmation: "
                f"{_ids(marked)}.",
                messages.SUCCESS,
            )
        skipped = [f"#{run.pk} ({run.get_status_display().lower()})" for run in [*raced, *others]]
        if skipped:
            self.message_user(
                request,
                f"Skipped {_runs(len(skipped))} not stuck in a stop: {', '.join(skipped)}.",
                messages.WARNING,
            )


def _stop_state(run: Run) -> str:
    if run.status in STOP_IN_PROGRESS:
        return "awaiting the provider"
    if run.status in FINISHED:
        return f"{run.get_status_display().lower()} first"
    if run.proof == Proof.ADMIN_FORCE:
        return "force-marked"
    return f"confirmed in {run.stop_latency_ms} ms"


def _ids(runs: Iterable[Run]) -> str:
    return ", ".join(f"#{run.pk}" for run in runs)


def _action_prefix(request: HttpRequest) -> str:
    """Field-name prefix of the action form that was posted: a run's own page prefixes its
    action form's fields so they cannot clash with the model form's."""
    form_prefix = f"{ActionLocation.CHANGE_FORM.value}-"
    return form_prefix if f"{form_prefix}action" in request.POST else ""


def _posted_reason(request: HttpRequest) -> str:
    return request.POST.get(f"{_action_prefix(request)}reason", "").strip()


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin[ApiToken]):
    list_display = ["prefix", "user", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "digest", "created_at", "last_used_at"]
    search_fields = ["user__username", "prefix"]
