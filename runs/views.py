from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.contrib.auth.views import LoginView, redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import aget_object_or_404, get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import trigger_client_event
from django_htmx.middleware import HtmxDetails

from . import live
from .access import run_to_stop
from .forms import LaunchForm, RunFilterForm
from .hostile import as_id, stop_reason
from .models import (
    FORCE_REASON_MAX,
    Channel,
    IdempotencyConflict,
    Membership,
    ProviderAccount,
    Run,
    RunAlreadyFinished,
    Status,
    Team,
    astop_each,
)
from .ratelimit import Limited, ahit, hit, peek


class HtmxRequest(HttpRequest):
    """A request django-htmx's middleware has seen; its user may be anonymous."""

    htmx: HtmxDetails


class HtmxHttpRequest(HtmxRequest):
    """What our views receive: login_required has run, and django-htmx's middleware."""

    user: User


def membership_for(request: HtmxHttpRequest, team_id: int) -> Membership:
    """The user's membership of a team; any other team is a 404."""
    return get_object_or_404(
        Membership.objects.select_related("team"), team_id=team_id, user=request.user
    )


def toast(response: HttpResponseBase, message: str, level: str = "info") -> HttpResponseBase:
    # Aimed at <body>: htmx fires it on the requesting element otherwise, and a Cancel form
    # that a push replaced meanwhile is detached, so the event would reach no listener.
    return trigger_client_event(
        response, "toast", {"level": level, "message": message, "target": "body"}
    )


@require_GET
@login_required
def home(request: HtmxHttpRequest) -> HttpResponse:
    membership = (
        Membership.objects.filter(user=request.user).select_related("team").order_by("team__name")
    ).first()
    if membership is None:
        return render(request, "runs/no_team.html")
    return redirect("runs:team", team_id=membership.team_id)


def list_page(team: Team, filters: RunFilterForm, before: str | None) -> dict[str, Any]:
    """One page of the team's runs, newest first, with a cursor to the next (older) page.

    A cursor instead of page numbers: a live list keeps gaining rows at the top, which would
    shift every numbered page under the reader's feet."""
    # The rows never show the account's key: deferring it saves a decryption per row.
    runs = (
        filters.apply(Run.objects.for_team(team))
        .select_related("provider_account", "created_by", "stop_requested_by")
        .defer("provider_account__api_key")
    )
    cursor = as_id(before)
    if cursor is not None:
        runs = runs.filter(pk__lt=cursor)
    size = settings.RUNBRAKE_RUNS_PER_PAGE
    rows = list(runs.order_by("-id")[: size + 1])
    return {
        "runs": rows[:size],
        "next_cursor": rows[size - 1].pk if len(rows) > size else None,
        # Only the newest page takes live insertions of new runs.
        "rows_id": "run-rows" if cursor is None else "run-rows-older",
        "cursor": cursor,
    }


# Counts on the list stop at this many per status ("1,000+"): counting a big team's runs
# exactly costs a scan of all of them on every page view (the dashboard has exact numbers).
COUNT_CAP = 1000


def status_counts(runs: Any) -> dict[str, int]:
    """Runs per status, each counted up to COUNT_CAP + 1 (an index range scan, not a count
    of the whole team)."""
    runs = runs.order_by()  # no ORDER BY: it would pick the list index over (team, status)
    return {value: runs.filter(status=value)[: COUNT_CAP + 1].count() for value in Status.values}


def _shown_count(n: int, *, capped: bool) -> str:
    return f"{n:,}+" if capped else f"{n:,}"


def _list_context(
    request: HtmxHttpRequest, membership: Membership, form: LaunchForm | None = None
) -> dict[str, Any]:
    team = membership.team
    filters = RunFilterForm(request.GET, team=team, user=request.user)
    counts = status_counts(filters.apply(Run.objects.for_team(team), with_status=False))
    query = filters.querystring()
    before = as_id(request.GET.get("before"))
    return {
        "team": team,
        "membership": membership,
        "section": "runs",
        "filters": filters,
        "filter_query": query,
        "status_counts": [
            (
                value,
                label,
                _shown_count(min(counts[value], COUNT_CAP), capped=counts[value] > COUNT_CAP),
            )
            for value, label in Status.choices
        ],
        "total": _shown_count(
            sum(min(n, COUNT_CAP) for n in counts.values()),
            capped=any(n > COUNT_CAP for n in counts.values()),
        ),
        "ws_query": "&".join(p for p in (query, f"before={before}" if before else "") if p),
        "form": form or LaunchForm(team=team, username=request.user.get_username()),
        **list_page(team, filters, request.GET.get("before")),
    }


@require_GET
@login_required
def team_runs(request: HtmxHttpRequest, team_id: int) -> HttpResponse:
    membership = membership_for(request, team_id)
    return render(request, "runs/team_runs.html", _list_context(request, membership))


@require_POST
@login_required
def launch_run(request: HtmxHttpRequest, team_id: int) -> HttpResponseBase:
    membership = membership_for(request, team_id)
    team = membership.team
    if not membership.can_launch:
        return _refused(request, "Viewers can watch runs but not launch them.")
    if limited := hit("launch", str(request.user.pk)):
        return _too_many(request, limited)
    form = LaunchForm(request.POST, team=team, username=request.user.get_username())
    if not form.is_valid():
        if request.htmx:
            response = render(
                request, "runs/partials.html#launch-form", {"form": form, "team": team}
            )
            return toast(
                response, "The run was not launched: fix the fields marked below.", "error"
            )
        context = _list_context(request, membership, form)
        return render(request, "runs/team_runs.html", context, status=400)
    try:
        run = Run.objects.launch(
            account=form.cleaned_data["provider_account"],
            user=request.user,
            prompt=form.cleaned_data["prompt"],
            options=form.run_options(),
            timeout_seconds=form.cleaned_data["timeout_seconds"],
            no_progress_seconds=form.cleaned_data["no_progress_seconds"],
            channel=Channel.BUTTON,
            idempotency_key=form.cleaned_data.get("idempotency_key") or "",
        )
    except IdempotencyConflict as exc:
        # The same form (its hidden key) sent again with other text: not a second run.
        form.add_error(
            None,
            f"This form already launched run #{exc.run.pk} with other settings. Reload the "
            "page to launch a new run; nothing was launched now.",
        )
        if request.htmx:
            response = render(
                request, "runs/partials.html#launch-form", {"form": form, "team": team}
            )
            return toast(response, "The run was not launched.", "error")
        return render(
            request, "runs/team_runs.html", _list_context(request, membership, form), status=409
        )
    if not request.htmx:
        return redirect(run)
    fresh = LaunchForm(
        team=team,
        username=request.user.get_username(),
        initial={"provider_account": run.provider_account_id},
    )
    form_html = render_to_string(
        "runs/partials.html#launch-form", {"form": fresh, "team": team}, request=request
    )
    # The new row rides along out-of-band, so the launcher sees it even before the push.
    # htmx parses this answer in one <template> whose first tag is the <form>: in that
    # "in body" mode the HTML parser drops bare <tbody>/<tr>/<td> tags, so the row is wrapped
    # in a <template> of its own (htmx 2 swaps the out-of-band content of templates).
    row = live.render_row(run, created=True)
    response = HttpResponse(f"{form_html}<template>{row}</template>")
    return toast(response, f"Run #{run.pk} launched on {run.provider_account.name}.", "success")


@require_GET
@login_required
def run_detail(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(
        Run.objects.for_user(request.user).select_related(
            "team", "provider_account", "created_by", "stop_requested_by"
        ),
        pk=pk,
    )
    membership = membership_for(request, run.team_id)
    events = list(run.events.select_related("actor").order_by("at", "id"))
    return render(
        request,
        "runs/run_detail.html",
        {
            "run": run,
            "events": events,
            "membership": membership,
            "team": run.team,
            "section": "runs",
        },
    )


@require_GET
@login_required
def run_output(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """A run's whole output as text: pages and pushes show only its end (see live.py)."""
    run = get_object_or_404(Run.objects.for_user(request.user), pk=pk)
    text = run.output
    kind, suffix = "text/plain", "txt"
    if not text and run.structured_output is not None:
        text = json.dumps(run.structured_output, indent=2, ensure_ascii=False)
        kind, suffix = "application/json", "json"
    response = HttpResponse(text, content_type=f"{kind}; charset=utf-8")
    if "download" in request.GET:
        response["Content-Disposition"] = f'attachment; filename="run-{run.pk}-output.{suffix}"'
    return response


def _stop_message(run: Run, requested: bool) -> tuple[str, str]:
    if run.status == "stopped":
        latency = f" in {run.stop_latency_ms} ms" if run.stop_latency_ms is not None else ""
        return f"Run #{run.pk} stopped{latency} — confirmed by {run.stop_confirmation}.", "success"
    if run.stop_error:
        return f"Run #{run.pk}: {run.stop_error}", "error"
    if not requested:
        return f"A stop for run #{run.pk} is already under way.", "info"
    return f"Stopping run #{run.pk}; waiting for the provider to confirm.", "info"


@sync_to_async
def _request_stop(
    request: HtmxRequest, pk: int
) -> HttpResponseBase | tuple[Run, ProviderAccount, bool | RunAlreadyFinished]:
    """Everything before the provider call, in one thread hop: the session and its user,
    the run and the membership, the rate limit, and the stop intent, committed."""
    # login_required's check, here rather than as the decorator: awaiting request.auser()
    # would cost two hops of its own (the session, then the user) before this one.
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    found = run_to_stop(request.user, pk)
    if found is None:
        raise Http404("No Run matches the given query.")
    run, membership = found
    if not membership.can_stop(run):
        return _refused(request, membership.stop_refusal)
    if limited := hit("stop", str(request.user.pk)):
        return _too_many(request, limited)
    # A one-click reason button and the free-text box share the name: the first said wins.
    reason = stop_reason(request.POST.getlist("reason"))
    account = run.provider_account  # loaded with the run; request_stop's refresh forgets it
    requested: bool | RunAlreadyFinished
    try:
        requested = run.request_stop(actor=request.user, channel=Channel.BUTTON, reason=reason)
    except RunAlreadyFinished as exc:
        requested = exc
    return run, account, requested


@require_POST
async def stop_run(request: HtmxRequest, pk: int) -> HttpResponseBase:
    before = await _request_stop(request, pk)
    if isinstance(before, HttpResponseBase):
        return before
    run, account, requested = before
    if isinstance(requested, RunAlreadyFinished):
        message, level, requested = str(requested), "error", False
    else:
        await run.asend_requested_stop(requested, account)
        message, level = _stop_message(run, requested)
    if not request.htmx:
        await sync_to_async(messages.add_message)(
            request, messages.ERROR if level == "error" else messages.INFO, message
        )
        return redirect("runs:detail", pk=run.pk)
    page = urlsplit(request.htmx.current_url or "").path
    html = await sync_to_async(live.render_run_response)(
        run, on_run_page=page == run.get_absolute_url()
    )
    return toast(HttpResponse(html), message, level)


@require_POST
@login_required
async def bulk_stop(request: HtmxHttpRequest, team_id: int) -> HttpResponseBase:
    """Stop many runs: a preview of what will be stopped, then a per-run outcome report."""
    user = await request.auser()
    assert user.is_authenticated  # login_required ran; this narrows the type
    membership = await aget_object_or_404(
        Membership.objects.select_related("team"), team_id=team_id, user=user
    )
    team = membership.team
    if not membership.can_launch:
        return await sync_to_async(_refused)(request, "Viewers can watch runs but not stop them.")
    if request.POST.get("scope") == "all":
        # Admins stop the whole team's running work; members only their own.
        scope = Run.objects.for_team(team).filter(status__in=(Status.PENDING, Status.RUNNING))
        if not membership.is_admin:
            scope = scope.filter(created_by=user)
        ids = [pk async for pk in scope.values_list("pk", flat=True)]
    else:
        ids = [pk for x in request.POST.getlist("ids") if (pk := as_id(x)) is not None]
    if not ids:
        message = (
            "Nothing is running to stop."
            if request.POST.get("scope") == "all"
            else "Select at least one running run first (the boxes at the left of the list)."
        )
        if request.htmx:
            response = HttpResponse(status=204)
            return toast(response, message, "error")
        await sync_to_async(messages.error)(request, message)
        return redirect("runs:team", team_id=team.pk)
    if request.POST.get("action") == "confirm":
        if limited := await ahit("stop", str(user.pk)):
            return await sync_to_async(_too_many)(request, limited)
        results = await astop_each(
            ids, user=user, channel=Channel.BUTTON, reason=request.POST.get("reason", "")[:500]
        )
        html = render_to_string("runs/partials.html#bulk-report", {"results": results})
        stopped = sum(r.outcome == "stopped" for r in results)
        return toast(HttpResponse(html), f"{stopped} of {len(results)} stopped.", "info")
    runs = [
        run
        async for run in Run.objects.for_team(team)
        .filter(pk__in=ids)
        .select_related("provider_account", "created_by")
        .order_by("-id")
    ]
    stoppable = [r for r in runs if r.can_be_stopped and membership.can_stop(r)]
    skipped = [
        (r, "not allowed" if r.can_be_stopped else r.get_status_display().lower())
        for r in runs
        if r not in stoppable
    ]
    context = {"team": team, "stoppable": stoppable, "skipped": skipped}
    html = await sync_to_async(render_to_string)(
        "runs/partials.html#bulk-preview", context, request=request
    )
    return HttpResponse(html)


@require_POST
@login_required
async def retry_stop(request: HtmxHttpRequest, pk: int) -> HttpResponseBase:
    """Send a stop the provider has not confirmed again, now, instead of at the next retry."""
    user = await request.auser()
    assert user.is_authenticated  # login_required ran; this narrows the type
    found = await sync_to_async(run_to_stop)(user, pk)
    if found is None:
        raise Http404("No Run matches the given query.")
    run, membership = found
    if not membership.can_stop(run):
        return await sync_to_async(_refused)(request, membership.stop_refusal)
    if limited := await ahit("stop", str(user.pk)):
        return await sync_to_async(_too_many)(request, limited)
    if not await sync_to_async(run.retry_stop_now)(actor=user):
        message, level = _retry_refusal(run), "error"
    else:
        await run.asend_stop()
        await run.arefresh_from_db()
        message, level = _stop_message(run, requested=True)
    return await sync_to_async(_answer_on_run)(request, run, message, level)


@require_POST
@login_required
def force_stop(request: HtmxHttpRequest, pk: int) -> HttpResponseBase:
    """A team admin's last resort for a stop the provider never confirmed: marked stopped by
    hand, with a reason, and the page says so (not the provider)."""
    run = get_object_or_404(Run.objects.for_user(request.user), pk=pk)
    if not membership_for(request, run.team_id).is_admin:
        return _refused(request, "Only team admins can mark a run stopped by hand.")
    reason = (request.POST.get("reason") or "").strip()
    if not reason:
        return _refused(request, "Say why you are sure the provider stopped (its dashboard, say).")
    if run.force_mark_stopped(actor=request.user, reason=reason[:FORCE_REASON_MAX]):
        message, level = f"Run #{run.pk} marked stopped by hand: {reason[:80]}", "success"
    else:
        message, level = (
            f"Run #{run.pk} is {run.get_status_display().lower()}: nothing to mark.",
            "info",
        )
    return _answer_on_run(request, run, message, level)


def _retry_refusal(run: Run) -> str:
    if run.is_terminal:
        return f"Run #{run.pk} is already {run.get_status_display().lower()}."
    if run.quota_endpoint == "stop":
        return f"{run.quota_note} Sending it earlier would only be refused."
    if not run.external_id:
        return "The provider has not named this run yet; the stop goes out when it does."
    return "A stop call for this run is under way; its answer is on the timeline."


def _answer_on_run(
    request: HtmxHttpRequest, run: Run, message: str, level: str
) -> HttpResponseBase:
    if not request.htmx:
        messages.add_message(
            request, messages.ERROR if level == "error" else messages.INFO, message
        )
        return redirect("runs:detail", pk=run.pk)
    run = live.load(run.pk)
    return toast(HttpResponse(live.render_run_response(run, on_run_page=True)), message, level)


@require_POST
@login_required
def run_again(request: HtmxHttpRequest, pk: int) -> HttpResponseBase:
    run = get_object_or_404(
        Run.objects.for_user(request.user).select_related("provider_account"), pk=pk
    )
    if not membership_for(request, run.team_id).can_launch:
        return _refused(request, "Viewers can watch runs but not launch them.")
    # A launch like any other: counted by the same limit.
    if limited := hit("launch", str(request.user.pk)):
        return _too_many(request, limited)
    again = run.launch_again(user=request.user)
    if request.htmx:
        response = HttpResponse(status=204)
        response["HX-Redirect"] = again.get_absolute_url()
        return response
    return redirect(again)


def _too_many(request: HtmxRequest, limited: Limited) -> HttpResponseBase:
    response = _refused(request, limited.message)
    response.status_code = 429
    response["Retry-After"] = str(limited.retry_after)
    return response


def login(request: HttpRequest) -> HttpResponseBase:
    """Django's login, with failed attempts limited (see `throttled_login`)."""
    return throttled_login(request, LoginView.as_view())


def login_name(raw: str) -> str:
    """The username as Django authenticates it (stripped, NFKC-normalised), case-folded: a
    respelling ("  carol ", fullwidth letters, "Carol") is the same guesser."""
    return unicodedata.normalize("NFKC", (raw or "").strip()).casefold()[:150]


def throttled_login(
    request: HttpRequest, view: Callable[[HttpRequest], HttpResponseBase]
) -> HttpResponseBase:
    """A login form, Runbrake's or the admin's, with failed attempts limited per client address
    and username, and per username from anywhere (higher). Successful logins count for
    nothing, so an attacker slows down without the owner being locked out for long."""
    if request.method != "POST":
        return view(request)
    name = login_name(request.POST.get("username", ""))
    buckets = [("login", f"{request.META.get('REMOTE_ADDR', '?')}:{name}"), ("login_name", name)]
    for scope, who in buckets:
        if limited := peek(scope, who):
            refused = render(request, "runs/refused.html", {"message": limited.message}, status=429)
            refused["Retry-After"] = str(limited.retry_after)
            return refused
    answer = view(request)
    if not request.user.is_authenticated:
        for scope, who in buckets:
            hit(scope, who)
    return answer


def _refused(request: HtmxRequest, message: str) -> HttpResponseBase:
    if request.htmx:
        response = HttpResponse(message, status=403)
        response["HX-Reswap"] = "none"
        return toast(response, message, "error")
    return render(request, "runs/refused.html", {"message": message}, status=403)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    message = (
        "Your session expired or this page is out of date, so the action was not carried "
        "out. Reload the page and try again."
    )
    if request.headers.get("HX-Request"):
        response = HttpResponse(message, status=403)
        response["HX-Reswap"] = "none"
        toast(response, message, "error")
        return response
    return render(request, "runs/refused.html", {"message": message}, status=403)
