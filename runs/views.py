from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import aget_object_or_404, get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import trigger_client_event
from django_htmx.middleware import HtmxDetails

from . import live
from .forms import LaunchForm
from .models import Channel, Membership, Run, RunAlreadyFinished, Team


class HtmxHttpRequest(HttpRequest):
    """What our views receive: login_required has run, and django-htmx's middleware."""

    htmx: HtmxDetails
    user: User


def membership_for(request: HtmxHttpRequest, team_id: int) -> Membership:
    """The user's membership of a team; any other team is a 404."""
    return get_object_or_404(
        Membership.objects.select_related("team"), team_id=team_id, user=request.user
    )


def toast(response: HttpResponseBase, message: str, level: str = "info") -> HttpResponseBase:
    return trigger_client_event(response, "toast", {"level": level, "message": message})


@require_GET
@login_required
def home(request: HtmxHttpRequest) -> HttpResponse:
    membership = (
        Membership.objects.filter(user=request.user).select_related("team").order_by("team__name")
    ).first()
    if membership is None:
        return render(request, "runs/no_team.html")
    return redirect("runs:team", team_id=membership.team_id)


def _list_context(
    request: HtmxHttpRequest, membership: Membership, form: LaunchForm | None = None
) -> dict[str, Any]:
    team = membership.team
    runs = Run.objects.for_team(team).select_related(
        "provider_account", "created_by", "stop_requested_by"
    )
    page = Paginator(runs, settings.RUNBRAKE_RUNS_PER_PAGE).get_page(request.GET.get("page"))
    return {
        "team": team,
        "membership": membership,
        "teams": Team.objects.for_user(request.user),
        "page": page,
        "runs": page.object_list,
        "rows_id": "run-rows" if page.number == 1 else f"run-rows-p{page.number}",
        "section": "runs",
        "form": form or LaunchForm(team=team, username=request.user.get_username()),
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
    run = Run.objects.launch(
        account=form.cleaned_data["provider_account"],
        user=request.user,
        prompt=form.cleaned_data["prompt"],
        options=form.run_options(),
        timeout_seconds=form.cleaned_data["timeout_seconds"],
        channel=Channel.BUTTON,
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
        {"run": run, "events": events, "membership": membership, "team": run.team},
    )


def _stop_message(run: Run, requested: bool) -> tuple[str, str]:
    if run.status == "stopped":
        latency = f" in {run.stop_latency_ms} ms" if run.stop_latency_ms is not None else ""
        return f"Run #{run.pk} stopped{latency} — confirmed by {run.stop_confirmation}.", "success"
    if run.stop_error:
        return f"Run #{run.pk}: {run.stop_error}", "error"
    if not requested:
        return f"A stop for run #{run.pk} is already under way.", "info"
    return f"Stopping run #{run.pk}; waiting for the provider to confirm.", "info"


@require_POST
@login_required
async def stop_run(request: HtmxHttpRequest, pk: int) -> HttpResponseBase:
    user = await request.auser()
    assert user.is_authenticated  # login_required ran; this narrows the type
    run = await aget_object_or_404(Run.objects.for_user(user), pk=pk)
    membership = await Membership.objects.aget(team_id=run.team_id, user=user)
    if not membership.can_stop(run):
        return _refused(request, "Viewers can watch runs but not stop them.")
    reason = request.POST.get("reason", "").strip()[:500]
    try:
        outcome = await run.astop(actor=user, channel=Channel.BUTTON, reason=reason)
    except RunAlreadyFinished as exc:
        message, level, requested = str(exc), "error", False
    else:
        requested = outcome.requested
        message, level = _stop_message(run, requested)
    if not request.htmx:
        await sync_to_async(messages.add_message)(
            request, messages.ERROR if level == "error" else messages.INFO, message
        )
        return redirect("runs:detail", pk=run.pk)
    html = await sync_to_async(live.render_run_response)(run)
    return toast(HttpResponse(html), message, level)


def _refused(request: HtmxHttpRequest, message: str) -> HttpResponseBase:
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
