from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_POST

from runs.access import amembership_for, membership_for, run_for_user, run_to_stop
from runs.models import (
    Channel,
    IdempotencyConflict,
    Membership,
    ProviderAccount,
    Run,
    RunAlreadyFinished,
    Status,
    astop_each,
)
from runs.realtime import live
from runs.security.hostile import as_id, stop_reason
from runs.security.ratelimit import ahit, hit
from runs.web.answers import HtmxHttpRequest, HtmxRequest, refused, toast, too_many
from runs.web.forms import LaunchForm, RunFilterForm


@require_GET
@login_required
def home(request: HtmxHttpRequest) -> HttpResponse:
    membership = (
        Membership.objects.filter(user=request.user).select_related("team").order_by("team__name")
    ).first()
    if membership is None:
        return render(request, "runs/no_team.html")
    return redirect("runs:team", team_id=membership.team_id)


# Counts on the list stop at this many per status ("1,000+"): counting a big team's runs
# exactly costs a scan of all of them on every page view (the dashboard has exact numbers).
COUNT_CAP = 1000


def _shown_count(n: int, *, capped: bool) -> str:
    return f"{n:,}+" if capped else f"{n:,}"


def _list_context(
    request: HtmxHttpRequest, membership: Membership, form: LaunchForm | None = None
) -> dict[str, Any]:
    team = membership.team
    filters = RunFilterForm(request.GET, team=team, user=request.user)
    counts = filters.apply(Run.objects.for_team(team), with_status=False).status_counts(COUNT_CAP)
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
        **filters.list_page(request.GET.get("before")),
    }


@require_GET
@login_required
def team_runs(request: HtmxHttpRequest, team_id: int) -> HttpResponse:
    membership = membership_for(request.user, team_id)
    return render(request, "runs/team_runs.html", _list_context(request, membership))


@require_POST
@login_required
def launch_run(request: HtmxHttpRequest, team_id: int) -> HttpResponseBase:
    membership = membership_for(request.user, team_id)
    team = membership.team
    if not membership.can_launch:
        return refused(request, "Viewers can watch runs but not launch them.")
    if limited := hit("launch", str(request.user.pk)):
        return too_many(request, limited)
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
        run = form.launch(
            request.user,
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
    run = run_for_user(
        request.user, pk, "team", "provider_account", "created_by", "stop_requested_by"
    )
    membership = membership_for(request.user, run.team_id)
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
    run = run_for_user(request.user, pk)
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
    if run.is_stopped:
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
        return refused(request, membership.stop_refusal)
    if limited := hit("stop", str(request.user.pk)):
        return too_many(request, limited)
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
    membership = await amembership_for(user, team_id)
    team = membership.team
    if not membership.can_launch:
        return await sync_to_async(refused)(request, "Viewers can watch runs but not stop them.")
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
            return await sync_to_async(too_many)(request, limited)
        results = await astop_each(
            ids, user=user, channel=Channel.BUTTON, reason=request.POST.get("reason", "")
        )
        html = render_to_string("runs/partials.html#bulk-report", {"results": results})
        stopped = sum(r.is_stopped for r in results)
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
        return await sync_to_async(refused)(request, membership.stop_refusal)
    if limited := await ahit("stop", str(user.pk)):
        return await sync_to_async(too_many)(request, limited)
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
    run = run_for_user(request.user, pk)
    if not membership_for(request.user, run.team_id).is_admin:
        return refused(request, "Only team admins can mark a run stopped by hand.")
    reason = (request.POST.get("reason") or "").strip()
    if not reason:
        return refused(request, "Say why you are sure the provider stopped (its dashboard, say).")
    if run.force_mark_stopped(actor=request.user, reason=reason):
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
    run = run_for_user(request.user, pk, "provider_account")
    if not membership_for(request.user, run.team_id).can_launch:
        return refused(request, "Viewers can watch runs but not launch them.")
    # A launch like any other: counted by the same limit.
    if limited := hit("launch", str(request.user.pk)):
        return too_many(request, limited)
    again = run.launch_again(user=request.user)
    if request.htmx:
        response = HttpResponse(status=204)
        response["HX-Redirect"] = again.get_absolute_url()
        return response
    return redirect(again)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponseBase:
    return refused(
        request,
        "Your session expired or this page is out of date, so the action was not carried "
        "out. Reload the page and try again.",
    )
