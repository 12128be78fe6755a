"""Team management: who is in the team and with which role, the team's stop setting, and the
team's provider accounts (keys written once, shown masked, testable).

Every page is one GET and one POST URL; the POST says what it does in `action`, so the team
pages need no URL of their own per verb. As everywhere: another team is a 404, a role that
may not act gets a readable 403, htmx answers the refreshed fragment with a toast, and a plain
form post is redirected back with a message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError, transaction
from django.db.models import Case, IntegerField, Value, When
from django.http import Http404, HttpResponse, HttpResponseBase
from django.shortcuts import aget_object_or_404, get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from runs.access import amembership_for, membership_for
from runs.models import Membership, ProviderAccount, ProviderKind, Role, Team
from runs.providers import ProviderError
from runs.web.answers import HtmxHttpRequest, refused, toast
from runs.web.team_forms import AddMemberForm, ProviderAccountForm, RoleForm, TeamSettingsForm


def _unknown_action(request: HtmxHttpRequest) -> HttpResponseBase:
    response = refused(request, "This page cannot do that; reload it and try again.")
    response.status_code = 400
    return response


# --- Members -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one members action did, in words, plus what the page shows in place on failure."""

    message: str
    ok: bool = True
    add_form: AddMemberForm | None = None
    row_errors: dict[int, str] = field(default_factory=dict)


ROLE_ORDER = Case(
    When(role=Role.ADMIN, then=Value(0)),
    When(role=Role.MEMBER, then=Value(1)),
    default=Value(2),
    output_field=IntegerField(),
)


def _members_context(
    request: HtmxHttpRequest,
    membership: Membership,
    *,
    add_form: AddMemberForm | None = None,
    row_errors: dict[int, str] | None = None,
    notice: str = "",
) -> dict[str, Any]:
    team = membership.team
    people = list(team.memberships.select_related("user").order_by(ROLE_ORDER, "user__username"))
    return {
        "team": team,
        "membership": membership,
        "section": "members",
        "rows": [(m, (row_errors or {}).get(m.pk, "")) for m in people],
        "member_count": len(people),
        "admin_count": sum(1 for m in people if m.is_admin),
        "roles": Role.choices,
        "add_form": add_form or AddMemberForm(team=team),
        "settings_form": TeamSettingsForm(instance=team),
        "notice": notice,
    }


def _target(request: HtmxHttpRequest, team: Team) -> Membership | None:
    """The membership a row action is about, or None when it left the team meanwhile."""
    try:
        pk = int(request.POST.get("member", ""))
    except ValueError:
        return None
    return team.memberships.select_related("user").filter(pk=pk).first()


def _gone() -> Outcome:
    return Outcome("That person is no longer in the team; the list is refreshed.", ok=False)


def _locked_admins(team: Team) -> set[int]:
    """The team's admin memberships, locked until the transaction ends: two admins demoting
    each other at the same moment are serialised, so the last admin can never be lost."""
    return set(
        Membership.objects.select_for_update()
        .filter(team=team, role=Role.ADMIN)
        .values_list("pk", flat=True)
    )


def _last_admin(target: Membership) -> Outcome:
    name = target.user.get_username()
    return Outcome(
        f"{name} is the last admin of {target.team.name}: make someone else admin first, so "
        "the team always has someone who can manage it.",
        ok=False,
        row_errors={target.pk: "The team's last admin cannot be removed or demoted."},
    )


def _add_member(request: HtmxHttpRequest, actor: Membership) -> Outcome:
    team = actor.team
    form = AddMemberForm(request.POST, team=team)
    if not form.is_valid():
        return Outcome("Nobody was added: see the form.", ok=False, add_form=form)
    user, role = form.cleaned_data["username"], form.cleaned_data["role"]
    try:
        with transaction.atomic():
            Membership.objects.create(team=team, user=user, role=role)
    except IntegrityError:
        # Another admin added the same person between the check and the insert.
        form.add_error("username", f"{user.get_username()} is already a member of {team.name}.")
        return Outcome("Nobody was added: see the form.", ok=False, add_form=form)
    return Outcome(f"{user.get_username()} joined {team.name} as {Role(role).label.lower()}.")


def _change_role(request: HtmxHttpRequest, actor: Membership) -> Outcome:
    target = _target(request, actor.team)
    if target is None:
        return _gone()
    form = RoleForm(request.POST)
    if not form.is_valid():
        return Outcome(
            "Choose admin, member or viewer.",
            ok=False,
            row_errors={target.pk: "Choose admin, member or viewer."},
        )
    role = form.cleaned_data["role"]
    name = target.user.get_username()
    with transaction.atomic():
        admins = _locked_admins(actor.team)
        if actor.pk not in admins:
            return Outcome("You are no longer an admin of this team.", ok=False)
        if target.pk in admins and role != Role.ADMIN and len(admins) == 1:
            return _last_admin(target)
        if not Membership.objects.filter(pk=target.pk).update(role=role):
            return _gone()
    return Outcome(f"{name} is now {Role(role).label.lower()}.")


def _remove_member(request: HtmxHttpRequest, actor: Membership) -> Outcome:
    target = _target(request, actor.team)
    if target is None:
        return _gone()
    with transaction.atomic():
        admins = _locked_admins(actor.team)
        if actor.pk not in admins:
            return Outcome("You are no longer an admin of this team.", ok=False)
        if target.pk in admins and len(admins) == 1:
            return _last_admin(target)
        Membership.objects.filter(pk=target.pk).delete()
    if target.pk == actor.pk:
        return Outcome(f"You left {actor.team.name}.")
    return Outcome(f"{target.user.get_username()} was removed from {actor.team.name}.")


def _save_settings(request: HtmxHttpRequest, actor: Membership) -> Outcome:
    form = TeamSettingsForm(request.POST, instance=actor.team)
    form.is_valid()  # one checkbox: absent means off, so it is always valid
    team = form.save()
    if team.members_can_stop_others:
        return Outcome("Members can now stop their teammates' runs as well as their own.")
    return Outcome("Members can now stop only the runs they launched.")


MEMBER_ACTIONS: dict[str, Callable[[HtmxHttpRequest, Membership], Outcome]] = {
    "add": _add_member,
    "role": _change_role,
    "remove": _remove_member,
    "settings": _save_settings,
}


@require_http_methods(["GET", "POST"])
@login_required
def members(request: HtmxHttpRequest, team_id: int) -> HttpResponseBase:
    membership = membership_for(request.user, team_id)
    if request.method == "GET":
        return render(request, "runs/members.html", _members_context(request, membership))
    if not membership.is_admin:
        return refused(request, "Only team admins can add or remove members and change roles.")
    action = MEMBER_ACTIONS.get(request.POST.get("action", ""))
    if action is None:
        return _unknown_action(request)
    outcome = action(request, membership)

    # The acting admin may have demoted or removed themselves: answer what they now may see.
    now = Membership.objects.select_related("team").filter(pk=membership.pk).first()
    if now is None:
        messages.success(request, outcome.message)
        if request.htmx:
            response = HttpResponse()
            response["HX-Redirect"] = reverse("runs:home")
            return response
        return redirect("runs:home")

    if outcome.ok and not request.htmx:
        messages.success(request, outcome.message)
        return redirect("runs:members", team_id=team_id)
    # A failure is shown where it happened (the form, the row), or above the list otherwise.
    in_place = outcome.ok or outcome.add_form is not None or outcome.row_errors
    context = _members_context(
        request,
        now,
        add_form=outcome.add_form,
        row_errors=outcome.row_errors,
        notice="" if in_place else outcome.message,
    )
    if not request.htmx:
        return render(request, "runs/members.html", context, status=400)
    response = render(request, "runs/members.html#members-panel", context)
    return toast(response, outcome.message, "success" if outcome.ok else "error")


# --- Provider accounts -------------------------------------------------------------------------

ADMINS_ONLY = "Only team admins can see and manage the team's provider accounts."


def _account(team: Team, raw: str | None) -> ProviderAccount:
    try:
        pk = int(raw or "")
    except ValueError:
        raise Http404("No such provider account.") from None
    return get_object_or_404(ProviderAccount.objects.filter(team=team), pk=pk)


def _accounts_context(
    request: HtmxHttpRequest, membership: Membership, form: ProviderAccountForm
) -> dict[str, Any]:
    team = membership.team
    return {
        "team": team,
        "membership": membership,
        "section": "accounts",
        "rows": [
            (
                account,
                json.dumps(account.options, ensure_ascii=False),
                # What to paste into Fay's dashboard: this account's own address.
                request.build_absolute_uri(
                    reverse("runs:fay-webhook", args=[account.webhook_token])
                )
                if account.kind == ProviderKind.FAY
                else "",
            )
            for account in ProviderAccount.objects.filter(team=team).order_by("name")
        ],
        "form": form,
    }


@require_http_methods(["GET", "POST"])
@login_required
def accounts(request: HtmxHttpRequest, team_id: int) -> HttpResponseBase:
    membership = membership_for(request.user, team_id)
    if not membership.is_admin:
        return refused(request, ADMINS_ONLY)
    team = membership.team

    if request.method == "GET":
        editing = _account(team, request.GET["edit"]) if "edit" in request.GET else None
        context = _accounts_context(
            request, membership, ProviderAccountForm(instance=editing, team=team)
        )
        if request.htmx:
            return render(request, "runs/accounts.html#account-form", context)
        return render(request, "runs/accounts.html", context)

    action = request.POST.get("action", "")
    if action not in ("create", "edit"):
        return _unknown_action(request)
    instance = _account(team, request.POST.get("account")) if action == "edit" else None
    form = ProviderAccountForm(request.POST, instance=instance, team=team)
    if not form.is_valid():
        context = _accounts_context(request, membership, form)
        if not request.htmx:
            return render(request, "runs/accounts.html", context, status=400)
        response = render(request, "runs/accounts.html#account-form", context)
        return toast(response, "The account was not saved: fix the fields marked.", "error")
    account = form.save()
    message = (
        f"Saved {account.name}."
        if instance
        else f"Added {account.name}. Test the connection to check the URL and key."
    )
    if not request.htmx:
        messages.success(request, message)
        return redirect("runs:accounts", team_id=team_id)
    context = _accounts_context(request, membership, ProviderAccountForm(team=team))
    context["highlight"] = account.pk
    response = render(request, "runs/accounts.html#accounts-panel", context)
    # The form asked for itself to be swapped; a saved account refreshes the list too, and
    # the address no longer names an edit.
    response["HX-Retarget"] = "#accounts-panel"
    response["HX-Replace-Url"] = request.path
    return toast(response, message, "success")


@require_POST
@login_required
async def test_account(request: HtmxHttpRequest, team_id: int, pk: int) -> HttpResponseBase:
    """Test connection: ask the provider to prove the URL and key, without starting a run.
    Async, so a slow provider holds no thread while the admin waits for its answer."""
    user = await request.auser()
    assert user.is_authenticated  # login_required ran; this narrows the type
    membership = await amembership_for(user, team_id)
    if not membership.is_admin:
        # The readable 403 page renders the top bar, which reads the database.
        return await sync_to_async(refused)(request, "Only team admins can test connections.")
    account = await aget_object_or_404(ProviderAccount.objects.filter(team_id=team_id), pk=pk)
    try:
        provider = account.provider()
        try:
            result, ok = await provider.check(), True
        finally:
            await provider.aclose()
    except ProviderError as exc:
        result, ok = exc.message, False
    message = f"{account.name}: {result}"
    if not request.htmx:
        level = messages.SUCCESS if ok else messages.ERROR
        await sync_to_async(messages.add_message)(request, level, message)
        return redirect("runs:accounts", team_id=team_id)
    html = render_to_string(
        "runs/accounts.html#test-result",
        {"account": account, "result": result, "ok": ok, "checked_at": timezone.now()},
    )
    return toast(HttpResponse(html), message, "success" if ok else "error")
