"""Who may see what: every view, API call and socket finds "this user's team" and "this user's
run" here (in the manner of healthchecks' `_get_check_for_user`). Another team's run or team
looks exactly like one that does not exist: a 404 for pages, None for callers that answer in
their own way (the JSON API, websockets).

Sync lookups that start from the user, so that a view makes them in the same thread hop as the
rest of its database work; the `a`-prefixed twins are for async views."""

from __future__ import annotations

from typing import Any

from django.db.models import F
from django.http import Http404

from runs.models import Membership, Run, RunQuerySet

NOT_FOUND = "No such run in your teams."


def find_membership(user: Any, team_id: int) -> Membership | None:
    """The user's membership of a team (with the team), or None."""
    return Membership.objects.select_related("team").filter(team_id=team_id, user=user).first()


async def afind_membership(user: Any, team_id: int) -> Membership | None:
    return (
        await Membership.objects.select_related("team").filter(team_id=team_id, user=user).afirst()
    )


def membership_for(user: Any, team_id: int) -> Membership:
    """The user's membership of a team; any other team is a 404."""
    if (membership := find_membership(user, team_id)) is None:
        raise Http404("No such team among yours.")
    return membership


async def amembership_for(user: Any, team_id: int) -> Membership:
    if (membership := await afind_membership(user, team_id)) is None:
        raise Http404("No such team among yours.")
    return membership


def _visible_runs(user: Any, related: tuple[str, ...]) -> RunQuerySet:
    runs = Run.objects.for_user(user)
    # Never a bare select_related(): that follows every foreign key.
    return runs.select_related(*related) if related else runs


def run_for_user(user: Any, pk: int, *related: str) -> Run:
    """The user's run `pk` (with `related` loaded); a run of another team is a 404."""
    run = _visible_runs(user, related).filter(pk=pk).first()
    if run is None:
        raise Http404(NOT_FOUND)
    return run


def run_and_membership(user: Any, pk: int, *related: str) -> tuple[Run, Membership] | None:
    """The user's run `pk` and their membership of its team (what they may do to it), or None
    when it is in none of their teams. One query: the stop path and every run page's socket
    start here, and the membership row is the one `for_user` already joins."""
    run = (
        _visible_runs(user, ("team", *related))
        .filter(pk=pk)
        .annotate(
            viewer_membership_id=F("team__memberships__id"),
            viewer_role=F("team__memberships__role"),
        )
        .first()
    )
    if run is None:
        return None
    # Taken off the run: they describe the viewer, not the run.
    viewer = vars(run)
    membership = Membership.from_db(
        Membership.objects.db,
        ["id", "team_id", "user_id", "role"],
        [viewer.pop("viewer_membership_id"), run.team_id, user.pk, viewer.pop("viewer_role")],
    )
    membership.team = run.team
    return run, membership


def run_to_stop(user: Any, pk: int) -> tuple[Run, Membership] | None:
    """`run_and_membership` with the provider account loaded: the stop call needs it."""
    return run_and_membership(user, pk, "provider_account")
