"""What open pages and watchers hear, besides a socket's own messages: a run changed (the
state machine announces it after commit; pages get the push, watchers a nudge for a launch),
and who may watch changes outside a socket's life: logging out, leaving a team, a new role, or
a team's stop rule. Each tells the user's open sockets (runs/realtime/live.py), which close or
check again, so a page never keeps receiving runs its user may no longer see."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from runs.models import Membership, Run, Team, run_changed
from runs.realtime import live


@receiver(run_changed, sender=Run)
def _run_changed(
    sender: Any, run_id: int, created: bool, wake_watchers: bool = False, **kwargs: Any
) -> None:
    live.push_run(run_id, created=created)
    if wake_watchers:
        live.nudge_watchers()


@receiver(user_logged_out)
def _logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is not None:
        transaction.on_commit(lambda: live.end_sessions(user.pk))


@receiver(post_save, sender=Membership)
@receiver(post_delete, sender=Membership)
def _membership_changed(sender: Any, instance: Membership, **kwargs: Any) -> None:
    user_id, team_id = instance.user_id, instance.team_id
    transaction.on_commit(lambda: live.membership_changed(user_id, team_id))


@receiver(post_save, sender=Team)
def _team_changed(sender: Any, instance: Team, created: bool, **kwargs: Any) -> None:
    # The team's rule on stopping teammates' runs decides which Cancel buttons a member sees.
    if created:
        return
    members = list(instance.memberships.values_list("user_id", flat=True))
    team_id = instance.pk

    def tell() -> None:
        for user_id in members:
            live.membership_changed(user_id, team_id)

    transaction.on_commit(tell)
