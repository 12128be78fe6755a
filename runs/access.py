"""Who may do what to a run. Sync lookups that start from the user, so that a view makes them
in the same thread hop as the rest of its database work."""

from __future__ import annotations

from typing import Any

from runs.models import Membership, Run


def run_to_stop(user: Any, pk: int) -> tuple[Run, Membership] | None:
    """The user's run `pk`, with its provider account (the stop call needs it), and the user's
    membership of its team (whether they may stop it); None when it is in none of their teams:
    another team's run looks exactly like one that does not exist."""
    run = Run.objects.for_user(user).select_related("provider_account").filter(pk=pk).first()
    if run is None:
        return None
    return run, Membership.objects.select_related("team").get(team_id=run.team_id, user=user)
