"""The domain: teams, provider accounts, runs and the one run state machine.

State machine (see docs and shared/design/architecture.md):

    PENDING ──► RUNNING ──► COMPLETED
       │           │  └───► FAILED
       └─────┬─────┘
             ▼ request_stop (button, API, admin, timeout)
          STOPPING ──► STOPPED            (provider confirmed)
             │   └───► COMPLETED / FAILED (the run finished before the stop landed)
             └───────► STOP_UNCONFIRMED   (no confirmation by the deadline; still checked)

Rules:
- Every transition is one conditional UPDATE filtered on the allowed source states, so of two
  writers (view, watcher, a second tab, another process) exactly one wins; the loser re-reads.
- Every transition writes a RunEvent and pushes the run to its live groups after commit.
- Terminal states (STOPPED, COMPLETED, FAILED) never change; late provider news is an event.
- Only the winner of `request_stop` makes the provider stop call; retries go through
  `claim_stop_attempt`, a lease on the next attempt, so no two processes send at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connections, models, transaction
from django.db.models import F
from django.dispatch import Signal
from django.urls import reverse
from django.utils import timezone

from runs import dbthreads
from runs.providers import PROVIDERS, ProviderConfig, ProviderError, get_provider
from runs.providers.base import Finished, Provider, Refusal, StopResult
from runs.providers.destinations import check_url
from runs.providers.errors import QuotaExhausted
from runs.providers.http import shared_client
from runs.security.crypto import EncryptedTextField
from runs.security.hostile import STOP_REASON_MAX, stop_reason
from runs.security.logscrub import mask

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User

    AnyUser = User | AnonymousUser


logger = logging.getLogger(__name__)

# What changed, said once the transaction has committed. The model says it; whoever shows runs
# listens (runs/realtime/signals.py pushes to open pages and wakes the watchers), so the state
# machine depends on nobody that displays it.
run_changed = Signal()  # run_id: int, created: bool, wake_watchers: bool


def announce_after_commit(
    run_id: int, *, created: bool = False, wake_watchers: bool = False
) -> None:
    """After commit, tell who shows the run; `wake_watchers` when only a watcher can act on
    the change now (a launch, a stop of a run the provider has not named)."""
    transaction.on_commit(
        lambda: run_changed.send(
            sender=Run, run_id=run_id, created=created, wake_watchers=created or wake_watchers
        )
    )


class TeamQuerySet(models.QuerySet["Team"]):
    def for_user(self, user: AnyUser) -> TeamQuerySet:
        if not user.is_authenticated:
            return self.none()
        return self.filter(memberships__user=user)


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)
    members_can_stop_others = models.BooleanField(
        default=True,
        help_text="Members may stop their teammates' runs, not only their own.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = TeamQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


class Membership(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=10, choices=Role, default=Role.MEMBER)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="one_role_per_team")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"

    @property
    def can_launch(self) -> bool:
        return self.role in (Role.ADMIN, Role.MEMBER)

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    @property
    def stop_refusal(self) -> str:
        """Why this member may not stop a run they cannot stop, in words that fit the role."""
        if self.role == Role.VIEWER:
            return "Viewers can watch runs but not stop them."
        return (
            f"{self.team.name} lets members stop only the runs they launched. Ask the run's "
            "owner or a team admin to stop it."
        )

    def can_stop(self, run: Run) -> bool:
        """Admins stop anything in their team; members their own runs, and teammates' unless
        the team turned that off; viewers nothing."""
        if self.team_id != run.team_id:
            return False
        if self.role == Role.ADMIN:
            return True
        if self.role == Role.MEMBER:
            return run.created_by_id == self.user_id or self.team.members_can_stop_others
        return False


class ProviderKind(models.TextChoices):
    FAY = "fay", "Fay (deep research)"
    DIFY = "dify", "Dify (chat app)"
    INTELLIGENCEBOX = "intelligencebox", "IntelligenceBox"
    XPANDER = "xpander", "xpander.ai (agent gateway)"


class QuotaTier(models.TextChoices):
    UNLIMITED = "unlimited", "No known quota"
    FREE = "free", "Free tier"
    PRO = "pro", "Pro tier"
    CUSTOM = "custom", "Custom numbers"


# The calls a provider counts, in words ("20 stop calls an hour").
QUOTA_ENDPOINTS = {
    "create": "launches",
    "status": "status reads",
    "output": "output reads",
    "stop": "stop calls",
}


def new_webhook_token() -> str:
    return secrets.token_urlsafe(24)


class ProviderAccountQuerySet(models.QuerySet["ProviderAccount"]):
    def for_user(self, user: AnyUser) -> ProviderAccountQuerySet:
        if not user.is_authenticated:
            return self.none()
        return self.filter(team__memberships__user=user)


class ProviderAccount(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="provider_accounts")
    kind = models.CharField(max_length=20, choices=ProviderKind)
    name = models.CharField(max_length=100)
    base_url = models.URLField(max_length=500)
    api_key = EncryptedTextField(help_text="Stored encrypted; never shown again after saving.")
    options = models.JSONField(default=dict, blank=True)
    # The provider's quotas for this key: a documented tier, or the account's own numbers
    # (`quota_limits`: endpoint → calls an hour, "month" → calls a calendar month).
    quota_tier = models.CharField(max_length=10, choices=QuotaTier, default=QuotaTier.UNLIMITED)
    quota_limits = models.JSONField(default=dict, blank=True)
    # Where the provider pushes this account's run news (Fay webhooks): the token makes the
    # URL unguessable, the secret (from the provider's dashboard) signs every delivery.
    webhook_token = models.CharField(max_length=48, unique=True, default=new_webhook_token)
    webhook_secret = EncryptedTextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = ProviderAccountQuerySet.as_manager()

    class Meta:
        ordering = ["team", "name"]
        constraints = [
            models.UniqueConstraint(fields=["team", "name"], name="account_name_unique_in_team")
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_kind_display()})"

    @property
    def masked_key(self) -> str:
        return mask(self.api_key)

    def clean(self) -> None:
        if self.base_url and not settings.RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS:
            try:
                check_url(self.base_url)
            except ProviderError as exc:
                raise ValidationError({"base_url": exc.message}) from None

    @property
    def limits(self) -> dict[str, int]:
        """This key's quotas: endpoint → calls an hour, "month" → calls a calendar month."""
        if self.quota_tier == QuotaTier.CUSTOM:
            raw = self.quota_limits if isinstance(self.quota_limits, dict) else {}
            return {k: int(v) for k, v in raw.items() if isinstance(v, int) and v > 0}
        tiers = PROVIDERS[self.kind].tiers if self.kind in PROVIDERS else {}
        return dict(tiers.get(self.quota_tier, {}))

    @property
    def receives_webhooks(self) -> bool:
        return self.kind == ProviderKind.FAY and bool(self.webhook_secret)

    def provider(self) -> Provider:
        options = dict(self.options or {})
        if self.receives_webhooks:
            options["webhooks"] = True
        config = ProviderConfig(
            base_url=self.base_url,
            api_key=self.api_key,
            options=options,
            timeout=settings.RUNBRAKE_PROVIDER_TIMEOUT,
            allow_private=settings.RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS,
        )
        return get_provider(self.kind, config, client=shared_client(), budget=AccountBudget(self))

    @property
    def quota_summary(self) -> str:
        """ "10 launches, 100 status reads, 50 output reads and 20 stop calls an hour; 100
        calls a month" — or that no quota is known."""
        limits = self.limits
        hourly = [f"{limits[e]:,} {words}" for e, words in QUOTA_ENDPOINTS.items() if limits.get(e)]
        parts = []
        if hourly:
            joined = ", ".join(hourly[:-1]) + (" and " if len(hourly) > 1 else "") + hourly[-1]
            parts.append(f"{joined} an hour")
        if limits.get("month"):
            parts.append(f"{limits['month']:,} calls a month")
        return "; ".join(parts) or "no known quota: calls are not paced"

    # --- The account's quota budget (shared by every run and every process) ------------------

    def quota_words(self, endpoint: str) -> str:
        """ "20 stop calls an hour (Fay free tier)" """
        limits = self.limits
        tier = self.get_quota_tier_display().lower()
        label = PROVIDERS[self.kind].label if self.kind in PROVIDERS else self.kind
        if endpoint == "month":
            return f"{limits.get('month')} calls a month ({label} {tier})"
        words = QUOTA_ENDPOINTS.get(endpoint, f"{endpoint} calls")
        return f"{limits.get(endpoint)} {words} an hour ({label} {tier})"

    def take_quota(self, endpoint: str, now: dt.datetime | None = None) -> Refusal | None:
        """Count one call of this kind, or refuse it with how long to wait and why.

        One transaction per call with the account's row locked, so two processes never both
        take the last call; stops keep a reserve of the monthly quota (a run must always be
        stoppable, a status read can wait)."""
        now = now or timezone.now()
        limits = self.limits
        if not limits:
            # Nothing to count, so nothing to lock: only the provider's own refusal (a block)
            # holds the call back. On SQLite the lock is the database's write lock, which a
            # stop call would otherwise queue for behind the watcher's writes.
            return self._blocked(endpoint, now)
        with transaction.atomic():
            list(ProviderAccount.objects.select_for_update().filter(pk=self.pk).values("pk"))
            refusal = self._blocked(endpoint, now) or self._over_hourly(endpoint, limits, now)
            refusal = refusal or self._over_monthly(endpoint, limits, now)
            if refusal is not None:
                return refusal
            QuotaSpend.objects.create(account_id=self.pk, endpoint=endpoint, at=now)
            # A month and a day is all any window looks back.
            QuotaSpend.objects.filter(
                account_id=self.pk, at__lt=now - dt.timedelta(days=32)
            ).delete()
        return None

    def _blocked(self, endpoint: str, now: dt.datetime) -> Refusal | None:
        block = QuotaBlock.objects.filter(account_id=self.pk, endpoint=endpoint, until__gt=now)
        until = block.values_list("until", flat=True).first()
        if until is None:
            return None
        label = PROVIDERS[self.kind].label if self.kind in PROVIDERS else self.kind
        words = QUOTA_ENDPOINTS.get(endpoint, f"{endpoint} calls")
        return Refusal(
            (until - now).total_seconds(),
            f"{label} refused this account's {words} as over its quota.",
        )

    def _over_hourly(
        self, endpoint: str, limits: dict[str, int], now: dt.datetime
    ) -> Refusal | None:
        limit = limits.get(endpoint)
        if not limit:
            return None
        window = QuotaSpend.objects.filter(
            account_id=self.pk, endpoint=endpoint, at__gt=now - HOUR
        ).order_by("at")
        used = window.count()
        if used < limit:
            return None
        # The call that must age out of the window before one more fits.
        frees = window.values_list("at", flat=True)[used - limit]
        return Refusal(
            max(1.0, (frees + HOUR - now).total_seconds()),
            f"This account's quota of {self.quota_words(endpoint)} is used up.",
        )

    def _over_monthly(
        self, endpoint: str, limits: dict[str, int], now: dt.datetime
    ) -> Refusal | None:
        limit = limits.get("month")
        if not limit:
            return None
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        used = QuotaSpend.objects.filter(account_id=self.pk, at__gte=month_start).count()
        reserve = 0 if endpoint == "stop" else self._stop_reserve(limits)
        if endpoint == "create":
            reserve += 1  # the stop of the run this launch creates
        if used + reserve < limit:
            return None
        next_month = (month_start + dt.timedelta(days=32)).replace(day=1)
        kept = f", keeping {reserve} for stops" if reserve else ""
        return Refusal(
            (next_month - now).total_seconds(),
            f"This account's quota of {self.quota_words('month')} is used up{kept}.",
        )

    def _stop_reserve(self, limits: dict[str, int]) -> int:
        """Monthly calls held back so each running run can still be stopped once."""
        stoppable = (
            Run.objects.filter(provider_account_id=self.pk, status__in=ACTIVE)
            .exclude(external_id="")
            .filter(stop_sent_at__isnull=True)
            .count()
        )
        return min(stoppable, limits.get("stop") or stoppable)

    def quota_refused(
        self, endpoint: str, retry_after: float | None, now: dt.datetime | None = None
    ) -> Refusal:
        """The provider answered a call of this kind as over quota: every process waits. Fay
        sends no Retry-After, so without one the wait starts at a minute and doubles while
        refusals repeat within the hour (to an hour). A Retry-After of 0 or a date already
        past still waits a second: the provider just said no."""
        now = now or timezone.now()
        with transaction.atomic():
            block = (
                QuotaBlock.objects.select_for_update()
                .filter(account_id=self.pk, endpoint=endpoint)
                .first()
            )
            recent = block is not None and block.until > now - HOUR
            strikes = (block.strikes + 1) if (block is not None and recent) else 1
            seconds = retry_after if retry_after is not None else 60.0 * 2 ** (strikes - 1)
            seconds = min(3600.0, max(1.0, seconds))
            QuotaBlock.objects.update_or_create(
                account_id=self.pk,
                endpoint=endpoint,
                defaults={"until": now + dt.timedelta(seconds=seconds), "strikes": strikes},
            )
        label = PROVIDERS[self.kind].label if self.kind in PROVIDERS else self.kind
        words = QUOTA_ENDPOINTS.get(endpoint, f"{endpoint} calls")
        return Refusal(seconds, f"{label} refused this account's {words} as over its quota.")

    def poll_interval(self, endpoint: str, base: float) -> float:
        """Seconds between polls of this kind per run, so all the account's running runs fit
        90 % of its hourly quota. The monthly quota is a hard limit (with stops in reserve),
        not a pace: spreading it evenly over the month would make a run's end known hours
        late; runs are paced to their own length instead (FayProvider._poll_delay)."""
        limit = self.limits.get(endpoint)
        if not limit:
            return base
        sharing = max(
            1,
            Run.objects.filter(provider_account_id=self.pk, status__in=ACTIVE)
            .exclude(external_id="")
            .count(),
        )
        return max(base, 3600.0 * sharing / (0.9 * limit))


HOUR = dt.timedelta(hours=1)


def _seconds_words(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


def _provider_words(status: Any) -> str:
    """A provider's status as the run keeps it: its words, cut to the column (hostile input
    has no length limit)."""
    return str(status or "")[: Run._meta.get_field("provider_status").max_length]


class AccountBudget:
    """The provider-facing Budget (runs/providers/base.py) of one account, over the
    database so that every web and watcher process shares it."""

    def __init__(self, account: ProviderAccount) -> None:
        self.account = account
        self.limited = bool(account.limits)

    async def take(self, endpoint: str) -> Refusal | None:
        return await dbthreads.call(None, self.account.take_quota, endpoint)

    async def refused(self, endpoint: str, retry_after: float | None) -> Refusal:
        return await dbthreads.call(None, self.account.quota_refused, endpoint, retry_after)

    async def interval(self, endpoint: str, base: float) -> float:
        if not self.limited:
            return base
        return await dbthreads.call(None, self.account.poll_interval, endpoint, base)


class Status(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    STOPPING = "stopping", "Stopping…"
    STOP_UNCONFIRMED = "stop_unconfirmed", "Stop unconfirmed"
    STOPPED = "stopped", "Stopped"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"


class Channel(models.TextChoices):
    BUTTON = "button", "Button"
    API = "api", "API"
    ADMIN = "admin", "Admin"
    TIMEOUT = "timeout", "Timeout"
    STALL = "stall", "No progress"
    SYSTEM = "system", "System"
    PROVIDER = "provider", "Provider"


class Proof(models.TextChoices):
    """What proved a run's final state. Only the provider's own word counts, except where the
    label says otherwise (never sent, an admin's force-mark, Runbrake's own finding)."""

    STOP_ANSWER = "stop_answer", "the provider's answer to the stop call"
    STREAM_EVENT = "stream_event", "a final event in the provider's stream"
    STREAM_END = "stream_end", "the provider's stream ending after the stop"
    STATUS_READ = "status_read", "a read of the provider's status"
    HISTORY = "history", "the provider's record of the message"
    WEBHOOK = "webhook", "a signed webhook from the provider"
    PROVIDER_REFUSAL = "provider_refusal", "the provider refusing the run"
    NEVER_SENT = "never_sent", "never having been sent to the provider"
    START_REFUSED = "start_refused", "the provider refusing the start call, none sent since"
    ADMIN_FORCE = "admin_force", "an admin's force-mark, not the provider"
    RUNBRAKE = "runbrake", "Runbrake, without word from the provider"


# How a provider event's source becomes the proof of the state it ends in.
PROOF_BY_SOURCE = {
    "stream": Proof.STREAM_EVENT,
    "status": Proof.STATUS_READ,
    "history": Proof.HISTORY,
    "webhook": Proof.WEBHOOK,
}

ACTIVE = (Status.PENDING, Status.RUNNING, Status.STOPPING, Status.STOP_UNCONFIRMED)
# What a batched output save writes (RunQuerySet.record_outputs).
OUTPUT_COLUMNS = ("id", "status", "output", "stall_deadline", "updated_at", "version")


def _column(field: Any) -> str:
    column = field.column
    assert isinstance(column, str)
    return column


STOP_IN_PROGRESS = (Status.STOPPING, Status.STOP_UNCONFIRMED)
TERMINAL = (Status.STOPPED, Status.COMPLETED, Status.FAILED)
FINISHED = (Status.COMPLETED, Status.FAILED)


class RunAlreadyFinished(Exception):
    def __init__(self, run: Run) -> None:
        self.run = run
        verb = "completed" if run.status == Status.COMPLETED else "failed"
        super().__init__(f"This run already {verb}; there is nothing left to stop.")


@dataclass(frozen=True)
class StopOutcome:
    """What a stop request did: `requested` is False when a stop was already under way."""

    run: Run
    requested: bool


@dataclass(frozen=True)
class BulkStopResult:
    id: int
    # stopped, stopping, queued, unconfirmed, already_finished, not_allowed, not_found, failed
    outcome: str
    status: str | None
    message: str

    @property
    def is_stopped(self) -> bool:
        return self.outcome == "stopped"

    @classmethod
    def after_stop(cls, run: Run) -> BulkStopResult:
        """Where a run stands once its stop request returned."""
        if run.status == Status.STOPPED:
            return cls(run.pk, "stopped", run.status, f"Confirmed by {run.stop_confirmation}.")
        if run.status in FINISHED:
            return cls(
                run.pk,
                "already_finished",
                run.status,
                f"It {run.get_status_display().lower()} before the stop landed.",
            )
        if run.quota_endpoint == "stop" and run.quota_until is not None:
            return cls(run.pk, "queued", run.status, run.quota_note)
        if run.status == Status.STOP_UNCONFIRMED:
            return cls(run.pk, "unconfirmed", run.status, run.stop_error or "Not confirmed yet.")
        if run.stop_error:
            return cls(run.pk, "failed", run.status, run.stop_error)
        if not run.external_id:
            return cls(
                run.pk,
                "stopping",
                run.status,
                "Not named by the provider yet; the stop goes out when it is.",
            )
        return cls(
            run.pk, "stopping", run.status, "Stop sent; waiting for the provider to confirm."
        )


# "Stop all 2,000 selected runs" must not open 2,000 provider connections at once.
STOP_CONCURRENCY = 16


async def astop_each(
    ids: list[int], *, user: Any, channel: str, reason: str = ""
) -> list[BulkStopResult]:
    """Stop many of the user's runs through the verified path, one outcome per requested id."""
    runs = {r.pk: r async for r in Run.objects.for_user(user).filter(pk__in=ids)}
    memberships = {
        m.team_id: m async for m in Membership.objects.filter(user=user).select_related("team")
    }
    stopped = {
        result.id: result
        for result in await astop_runs(
            list(runs.values()),
            actor=user,
            channel=channel,
            reason=reason,
            may_stop=lambda run: memberships[run.team_id].can_stop(run),
        )
    }
    return [
        stopped.get(pk) or BulkStopResult(pk, "not_found", None, f"No run {pk} in your teams.")
        for pk in ids
    ]


async def astop_runs(
    runs: list[Run],
    *,
    actor: Any,
    channel: str,
    reason: str = "",
    may_stop: Callable[[Run], bool] | None = None,
) -> list[BulkStopResult]:
    """Stop each run concurrently (one slow provider holds up no other), then read what
    happened to it. Callers decide which runs the actor may see; `may_stop` is the role check
    (none for an operator in the admin, who usually belongs to no team)."""
    slots = asyncio.Semaphore(STOP_CONCURRENCY)

    async def one(run: Run) -> BulkStopResult:
        if may_stop is not None and not may_stop(run):
            return BulkStopResult(
                run.pk, "not_allowed", run.status, "Your role does not allow stopping this run."
            )
        try:
            async with slots:
                await run.astop(actor=actor, channel=channel, reason=reason)
        except RunAlreadyFinished as exc:
            return BulkStopResult(run.pk, "already_finished", run.status, str(exc))
        except Exception as exc:
            # One broken account must not hide the outcome of every other run.
            logger.exception("Stopping run %s failed", run.pk)
            return BulkStopResult(run.pk, "failed", run.status, str(exc) or exc.__class__.__name__)
        await run.arefresh_from_db()
        return BulkStopResult.after_stop(run)

    return list(await asyncio.gather(*(one(run) for run in runs)))


class RunQuerySet(models.QuerySet["Run"]):
    def for_user(self, user: AnyUser) -> RunQuerySet:
        if not user.is_authenticated:
            return self.none()
        return self.filter(team__memberships__user=user)

    def for_team(self, team: Team | int) -> RunQuerySet:
        return self.filter(team=team)

    def active(self) -> RunQuerySet:
        return self.filter(status__in=ACTIVE)

    def listed(self) -> RunQuerySet:
        """With what a list row shows, and without the account's key: a row never shows it,
        and deferring it saves a decryption per row."""
        return self.select_related("provider_account", "created_by", "stop_requested_by").defer(
            "provider_account__api_key"
        )

    def page_before(self, cursor: int | None, size: int) -> tuple[list[Run], int | None]:
        """One page, newest first, of the runs older than `cursor` (all when None), and the
        cursor of the next page (None on the last).

        A cursor instead of page numbers: a live list keeps gaining rows at the top, which
        would shift every numbered page under the reader's feet."""
        runs = self if cursor is None else self.filter(pk__lt=cursor)
        rows: list[Run] = list(runs.order_by("-id")[: size + 1])
        return rows[:size], rows[size - 1].pk if len(rows) > size else None

    def status_counts(self, cap: int) -> dict[str, int]:
        """Runs per status, each counted up to `cap` + 1: an index range scan per status, not
        a count of the whole team, and the caller can say "1,000+"."""
        runs = self.order_by()  # no ORDER BY: it would pick the list index over (team, status)
        return {value: runs.filter(status=value)[: cap + 1].count() for value in Status.values}

    def stop_due(self, now: dt.datetime) -> RunQuerySet:
        """Stops whose (next) provider call is due: never sent, or a retry whose wait is over."""
        return self.filter(status__in=STOP_IN_PROGRESS, stop_next_attempt_at__lte=now).exclude(
            external_id=""
        )

    def stop_overdue(self, now: dt.datetime) -> RunQuerySet:
        return self.filter(status=Status.STOPPING, stop_deadline__lt=now)

    def past_timeout(self, now: dt.datetime) -> RunQuerySet:
        """Runs past their own time limit; a launch queued for its provider's quota has not
        started, so its limit starts when it is sent (`record_external_id`)."""
        return self.filter(status__in=(Status.PENDING, Status.RUNNING), deadline__lt=now).exclude(
            status=Status.PENDING, quota_endpoint="create"
        )

    def stalled(self, now: dt.datetime) -> RunQuerySet:
        """Running runs that made no progress (output, provider status) within their limit."""
        return self.filter(status=Status.RUNNING, stall_deadline__lt=now)

    def claim_watch(
        self, watcher_id: str, *, lease_seconds: float, limit: int, per_claim: int = 100
    ) -> list[int]:
        """Renew this watcher's leases, take unwatched or orphaned active runs up to `limit`,
        and return the ids of every active run it now holds.

        Each active run is held by exactly one watcher: the claim locks candidate rows with
        SKIP LOCKED (two watchers claiming at once take different runs instead of waiting on
        each other) and only takes rows that are still free when it writes. A watcher that
        dies stops renewing; its leases lapse and the next claim anywhere takes its runs.
        """
        now = timezone.now()
        until = now + dt.timedelta(seconds=lease_seconds)
        free = models.Q(watched_by="") | models.Q(watch_lease_until__lt=now)
        with transaction.atomic():
            self.filter(pk__in=self._lock_in_order(watched_by=watcher_id)).update(
                watch_lease_until=until
            )
            held = self.active().filter(watched_by=watcher_id).count()
            # A few at a time, so that watchers started together share the runs out.
            room = min(per_claim, max(0, limit - held))
            if room:
                candidates = list(
                    self.active()
                    .filter(free)
                    .order_by("created_at", "id")
                    .select_for_update(skip_locked=True)
                    .values_list("pk", "watched_by")[:room]
                )
                if candidates:
                    self.filter(pk__in=[pk for pk, _ in candidates]).filter(free).update(
                        watched_by=watcher_id, watch_lease_until=until
                    )
                    orphans = [pk for pk, previous in candidates if previous]
                    if orphans:
                        logger.warning(
                            "watcher %s took over runs %s from watchers that stopped renewing",
                            watcher_id,
                            orphans,
                        )
                        self._mark_text_unsure(orphans)
            return list(self.active().filter(watched_by=watcher_id).values_list("pk", flat=True))

    def mark_unconfirmed_text(self, now: dt.datetime) -> int:
        """Runs whose reader never vouched for the text it showed before they ended (it
        died) have their kept text marked incomplete; how many."""
        due = self.filter(text_unconfirmed_until__lt=now)
        return sum(run.mark_text_unconfirmed() for run in due)

    def _mark_text_unsure(self, orphans: list[int]) -> None:
        """Runs taken from a watcher that stopped renewing (killed, or stalled past its
        lease). A graceful hand-over (the watcher saved, then let go) leaves no orphan."""
        for run in self.filter(pk__in=orphans):
            run.mark_text_unsure("The watcher following it stopped without handing it over")

    def record_outputs(self, outputs: dict[int, tuple[str, int]]) -> set[int]:
        """Save many runs' output so far (the watcher's batched writes: one statement run
        for every row, in one transaction) and return the ids of those with a stop under way
        (their output after the stop is worth a look). `outputs` maps id → (text,
        no-progress s). Nothing is pushed: pages got the text as it arrived (live.py)."""
        if not outputs:
            return set()
        now = timezone.now()
        connection = connections[self.db]
        ops = connection.ops
        meta = self.model._meta
        column = {name: ops.quote_name(_column(meta.get_field(name))) for name in OUTPUT_COLUMNS}
        active = [status.value for status in ACTIVE]
        # Only quoted names of our own model are formatted in; every value is a parameter.
        sql = (
            f"UPDATE {ops.quote_name(meta.db_table)} SET {column['output']} = %s, "  # noqa: S608
            f"{column['stall_deadline']} = %s, {column['updated_at']} = %s, "
            f"{column['version']} = {column['version']} + 1 "
            f"WHERE {column['id']} = %s AND {column['status']} IN "
            f"({', '.join(['%s'] * len(active))})"
        )
        at = ops.adapt_datetimefield_value(now)
        # In id order, like every multi-row lock here: two transactions that lock rows in the
        # same order wait for each other instead of deadlocking.
        rows = [
            (
                text,
                ops.adapt_datetimefield_value(now + dt.timedelta(seconds=stall)) if stall else None,
                at,
                pk,
                *active,
            )
            for pk, (text, stall) in sorted(outputs.items())
        ]
        with transaction.atomic(using=self.db):
            with connection.cursor() as cursor:
                cursor.executemany(sql, rows)
            return set(
                self.filter(pk__in=list(outputs), status__in=STOP_IN_PROGRESS).values_list(
                    "pk", flat=True
                )
            )

    def _lock_in_order(self, **filters: Any) -> list[int]:
        """Lock the matching active runs in id order (a plain multi-row UPDATE locks in scan
        order, and deadlocked against the watcher's batched output writes on PostgreSQL)."""
        return list(
            self.active()
            .filter(**filters)
            .order_by("pk")
            .select_for_update()
            .values_list("pk", flat=True)
        )

    def release_watch(self, watcher_id: str) -> int:
        """Hand this watcher's runs back (graceful shutdown): others take them at once."""
        with transaction.atomic():
            return self.filter(pk__in=self._lock_in_order(watched_by=watcher_id)).update(
                watched_by="", watch_lease_until=None
            )

    async def arelease_watch(self, watcher_id: str) -> int:
        return await sync_to_async(self.release_watch)(watcher_id)

    def launch(
        self,
        *,
        account: ProviderAccount,
        user: Any,
        prompt: str,
        options: dict[str, Any],
        timeout_seconds: int,
        no_progress_seconds: int | None = None,
        channel: str = "button",
        idempotency_key: str = "",
    ) -> Run:
        """Create a PENDING run (the watcher starts it). With an idempotency key, a retried
        launch returns the first run; the same key with a different request raises
        IdempotencyConflict. The unique constraint settles two retries racing each other."""
        now = timezone.now()
        if no_progress_seconds is None:
            no_progress_seconds = settings.RUNBRAKE_NO_PROGRESS_SECONDS
        fingerprint = ""
        if idempotency_key:
            fingerprint = hashlib.sha256(
                json.dumps(
                    [account.pk, prompt, options, timeout_seconds, no_progress_seconds],
                    sort_keys=True,
                    default=str,
                ).encode()
            ).hexdigest()
            first = self.filter(created_by=user, idempotency_key=idempotency_key).first()
            if first is not None:
                return first.replayed(fingerprint)
        try:
            with transaction.atomic():
                return self._create_launched(
                    account,
                    user,
                    prompt,
                    options,
                    timeout_seconds,
                    no_progress_seconds,
                    channel,
                    now,
                    idempotency_key,
                    fingerprint,
                )
        except IntegrityError:
            if not idempotency_key:
                raise
            first = self.get(created_by=user, idempotency_key=idempotency_key)
            return first.replayed(fingerprint)

    def _create_launched(
        self,
        account: ProviderAccount,
        user: Any,
        prompt: str,
        options: dict[str, Any],
        timeout_seconds: int,
        no_progress_seconds: int,
        channel: str,
        now: dt.datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Run:
        run = self.create(
            idempotency_key=idempotency_key,
            request_fingerprint=fingerprint,
            team_id=account.team_id,
            provider_account=account,
            provider=account.kind,
            created_by=user,
            prompt=prompt,
            options=options,
            timeout_seconds=timeout_seconds,
            deadline=now + dt.timedelta(seconds=timeout_seconds),
            no_progress_seconds=no_progress_seconds,
            created_at=now,
            updated_at=now,
        )
        RunEvent.objects.create(
            run=run,
            kind=RunEvent.Kind.CREATED,
            to_status=Status.PENDING,
            actor=user,
            channel=channel,
            message=f"Launched on {account.name}.",
        )
        announce_after_commit(run.pk, created=True)
        return run


class IdempotencyConflict(Exception):
    def __init__(self, run: Run) -> None:
        self.run = run
        super().__init__(
            f"This Idempotency-Key was already used for run {run.pk} with a different "
            "request. Use a new key for a new run."
        )


class Run(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="runs")
    provider_account = models.ForeignKey(
        ProviderAccount, on_delete=models.PROTECT, related_name="runs"
    )
    # Denormalised from the account: the run list filters by provider without a join.
    provider = models.CharField(max_length=20, choices=ProviderKind)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="runs",
    )
    status = models.CharField(max_length=20, choices=Status, default=Status.PENDING)
    # Bumped by every visible change; the browser drops pushes older than what it shows.
    version = models.PositiveIntegerField(default=1)
    external_id = models.CharField(max_length=200, blank=True, db_index=True)
    # Other ids the provider handed out (Dify's conversation and message), for follow-ups.
    provider_refs = models.JSONField(default=dict, blank=True)
    provider_status = models.CharField(max_length=40, blank=True)
    prompt = models.TextField()
    options = models.JSONField(default=dict, blank=True)
    timeout_seconds = models.PositiveIntegerField()
    deadline = models.DateTimeField()
    # The "no progress" guardrail: a running run whose output and provider status stay
    # unchanged for this long is stopped (0 = never). Each sign of progress moves the deadline.
    no_progress_seconds = models.PositiveIntegerField(default=0)
    stall_deadline = models.DateTimeField(null=True, blank=True)
    # Which watcher process follows this run, and until when its lease holds without renewal.
    watched_by = models.CharField(max_length=100, blank=True)
    watch_lease_until = models.DateTimeField(null=True, blank=True)

    # The run ended on its kept text (a stop answer) while a watcher read it: until this
    # time, that watcher may vouch for what it showed the pages (Run.keep_text_after_end);
    # after it, the text is marked incomplete (RunQuerySet.mark_unconfirmed_text).
    text_unconfirmed_until = models.DateTimeField(null=True, blank=True)

    output = models.TextField(blank=True)
    # The stream was lost and the provider could not give the rest of the text: what is shown
    # is what arrived, and the page says so (until the provider's final text replaces it).
    output_incomplete = models.BooleanField(default=False)
    structured_output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    # What the provider says the run consumed (tokens, price and currency), when it says.
    usage = models.JSONField(null=True, blank=True)
    # A call this run needs waits for the account's quota (`create`: the run is queued).
    quota_endpoint = models.CharField(max_length=10, blank=True)
    quota_until = models.DateTimeField(null=True, blank=True)
    quota_reason = models.CharField(max_length=300, blank=True)

    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    start_attempted_at = models.DateTimeField(null=True, blank=True)

    stop_requested_at = models.DateTimeField(null=True, blank=True)
    stop_requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    stop_channel = models.CharField(max_length=10, choices=Channel, blank=True)
    stop_reason = models.CharField(max_length=STOP_REASON_MAX, blank=True)
    stop_deadline = models.DateTimeField(null=True, blank=True)
    stop_next_attempt_at = models.DateTimeField(null=True, blank=True)
    stop_attempts = models.PositiveIntegerField(default=0)
    stop_sent_at = models.DateTimeField(null=True, blank=True)
    stop_answer = models.JSONField(null=True, blank=True)
    stop_error = models.TextField(blank=True)
    stop_confirmed_at = models.DateTimeField(null=True, blank=True)
    # The sentence shown to people ("Fay's stop answer"); `proof` is what it means, as data.
    stop_confirmation = models.CharField(max_length=200, blank=True)
    proof = models.CharField(max_length=20, choices=Proof, blank=True)

    # A launch retried with the same key returns this run instead of starting a second one.
    idempotency_key = models.CharField(max_length=200, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)

    objects = RunQuerySet.as_manager()
    was_replayed = False

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["created_by", "idempotency_key"],
                condition=~models.Q(idempotency_key=""),
                name="one_run_per_idempotency_key",
            )
        ]
        indexes = [
            models.Index(fields=["team", "-created_at", "-id"], name="run_team_recent"),
            models.Index(fields=["status"], name="run_status"),
            models.Index(fields=["watched_by", "status"], name="run_watched_by"),
            # The list pages newest first by id, and counts by status, within one team.
            models.Index(fields=["team", "-id"], name="run_team_newest"),
            models.Index(fields=["team", "status"], name="run_team_status"),
            # The sweep of text no reader vouched for reads only the few rows waiting.
            models.Index(
                fields=["text_unconfirmed_until"],
                condition=models.Q(text_unconfirmed_until__isnull=False),
                name="run_text_unconfirmed",
            ),
        ]

    def __str__(self) -> str:
        return f"Run {self.pk} ({self.status})"

    def get_absolute_url(self) -> str:
        return reverse("runs:detail", args=[self.pk])

    def replayed(self, fingerprint: str) -> Run:
        """This run, as the answer to a retried launch with its idempotency key."""
        if fingerprint != self.request_fingerprint:
            raise IdempotencyConflict(self)
        self.was_replayed = True
        return self

    # --- Read-only helpers for templates and the API --------------------------------------

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def is_stopped(self) -> bool:
        return self.status == Status.STOPPED

    @property
    def is_failed(self) -> bool:
        return self.status == Status.FAILED

    @property
    def is_stop_unconfirmed(self) -> bool:
        return self.status == Status.STOP_UNCONFIRMED

    @property
    def stop_in_progress(self) -> bool:
        """A stop was asked for and the provider has not confirmed it yet."""
        return self.status in STOP_IN_PROGRESS

    @property
    def stop_call_unanswered(self) -> bool:
        """A stop call's lease runs and no answer is recorded: the call may still be out (or
        its sender died holding the lease). The lease is taken before the call is made, so a
        lease alone never proves the provider had the stop."""
        return (
            self.stop_sent_at is not None
            and not self.stop_answer
            and timezone.now() < self.stop_sent_at + self._stop_lease()
        )

    @property
    def can_be_stopped(self) -> bool:
        return self.status in (Status.PENDING, Status.RUNNING)

    @property
    def stop_can_be_retried(self) -> bool:
        """Worth offering "send the stop again now": unconfirmed or failing, not queued for
        the quota, and named by the provider."""
        return (
            self.status in STOP_IN_PROGRESS
            and bool(self.external_id)
            and self.quota_endpoint != "stop"
            and (self.status == Status.STOP_UNCONFIRMED or bool(self.stop_error))
        )

    @property
    def usage_summary(self) -> str:
        """What the provider says the run consumed, e.g. "1,161 tokens (18 in, 1,143 out) ·
        0.0081 USD"; "" when it said nothing."""
        usage = self.usage if isinstance(self.usage, dict) else {}
        parts = []
        total = usage.get("total_tokens")
        if isinstance(total, int):
            split = ""
            if isinstance(usage.get("prompt_tokens"), int) and isinstance(
                usage.get("completion_tokens"), int
            ):
                split = f" ({usage['prompt_tokens']:,} in, {usage['completion_tokens']:,} out)"
            parts.append(f"{total:,} tokens{split}")
        if isinstance(usage.get("price"), str):
            parts.append(f"{usage['price']} {usage.get('currency') or ''}".strip())
        return " · ".join(parts)

    @property
    def pacing_note(self) -> str:
        """How often Runbrake reads a polled run's status, and why (the account's quota), in
        words; "" where the provider streams or no quota paces it."""
        account = self.provider_account
        if not self.is_active or self.provider != ProviderKind.FAY:
            return ""
        if account.receives_webhooks:
            return (
                "Fay pushes this run's news (webhooks); its status is read only every 10 "
                "minutes, as a safety net."
            )
        limit = account.limits.get("status")
        if not limit:
            return ""
        every = account.poll_interval("status", 2.0)
        return (
            f"Fay's status is read about every {_seconds_words(every)}, so that this account's "
            f"running runs fit its {limit:,} status reads an hour."
        )

    @property
    def is_queued(self) -> bool:
        """Launched, but held back until the account's create quota allows sending it."""
        return self.status == Status.PENDING and self.quota_endpoint == "create"

    @property
    def quota_note(self) -> str:
        """What waits for the quota and until when, in words ("" when nothing waits)."""
        if not self.quota_endpoint or self.quota_until is None:
            return ""
        what = {
            "create": "The launch is queued",
            "stop": "The stop is queued",
            "status": "The next status read waits",
            "output": "Reading the output waits",
        }.get(self.quota_endpoint, "The next call waits")
        when = timezone.localtime(self.quota_until).strftime("%H:%M:%S %Z")
        if self.quota_until - timezone.now() > dt.timedelta(hours=20):
            when = timezone.localtime(self.quota_until).strftime("%Y-%m-%d %H:%M %Z")
        return f"{what} until {when}: {self.quota_reason}"

    @property
    def finished_before_stop(self) -> bool:
        return self.status in FINISHED and self.stop_requested_at is not None

    @property
    def stop_latency_ms(self) -> int | None:
        if self.stop_requested_at and self.stop_confirmed_at:
            delta = self.stop_confirmed_at - self.stop_requested_at
            return round(delta.total_seconds() * 1000)
        return None

    @property
    def elapsed_seconds(self) -> float:
        end = self.finished_at or timezone.now()
        return max(0.0, (end - (self.started_at or self.created_at)).total_seconds())

    # --- The state machine -----------------------------------------------------------------

    def _transition(
        self,
        allowed: tuple[str, ...],
        new: str,
        *,
        kind: str,
        message: str = "",
        actor: Any = None,
        channel: str = Channel.SYSTEM,
        data: dict[str, Any] | None = None,
        wake_watchers: bool = False,
        **fields: Any,
    ) -> bool:
        with transaction.atomic():
            current = (
                Run.objects.select_for_update().filter(pk=self.pk).values_list("status", flat=True)
            ).first()
            # Timed once the run is held: a transition that waited for another to commit is
            # later on the timeline too, never before the one it waited for.
            now = timezone.now()
            if "provider_status" in fields:
                fields["provider_status"] = _provider_words(fields["provider_status"])
            if new in TERMINAL:
                # Nothing waits for a quota once the run is over.
                fields = {"quota_endpoint": "", "quota_until": None, "quota_reason": "", **fields}
            won = current in allowed and bool(
                Run.objects.filter(pk=self.pk, status__in=allowed).update(
                    status=new, updated_at=now, version=F("version") + 1, **fields
                )
            )
            if won:
                RunEvent.objects.create(
                    run_id=self.pk,
                    at=now,
                    kind=kind,
                    from_status=current or "",
                    to_status=new,
                    actor=actor,
                    channel=channel,
                    message=message,
                    data=data or {},
                )
                announce_after_commit(self.pk, wake_watchers=wake_watchers)
        self.refresh_from_db()
        return won

    def record_event(
        self,
        kind: str,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        statuses: tuple[str, ...] | None = None,
        **fields: Any,
    ) -> None:
        """An event that changes no status (a backoff, a stop answer, late provider news);
        with `statuses`, only while the run is in one of them."""
        with transaction.atomic():
            runs = Run.objects.filter(pk=self.pk)
            if statuses is not None:
                runs = runs.filter(status__in=statuses)
            if not runs.update(updated_at=timezone.now(), version=F("version") + 1, **fields):
                self.refresh_from_db()
                return
            # Read after the update, which holds the row: the caller's copy may be stale (a
            # stop answer arriving after the stream ended the run). Timed then too (as in
            # _transition), so the timeline keeps the order the run's lock gave.
            status = Run.objects.filter(pk=self.pk).values_list("status", flat=True).get()
            RunEvent.objects.create(
                run_id=self.pk,
                at=timezone.now(),
                kind=kind,
                from_status=status,
                to_status=status,
                message=message,
                data=data or {},
            )
            announce_after_commit(self.pk)
        self.refresh_from_db()

    def mark_text_unsure(self, what_happened: str) -> None:
        """The reader of this run's output ended abnormally (its watcher died, its session
        crashed): text it had read but not saved may be gone, and pages may have shown it.
        The kept text is marked incomplete until the provider's own final text replaces it.
        Only a run that can have streamed: sent, and not finished."""
        if not self.external_id or self.output_incomplete:
            return
        self.record_event(
            RunEvent.Kind.STREAM_LOST,
            f"{what_happened}; text read but not saved may be missing, so the run's text is "
            "marked incomplete until the provider's final text replaces it.",
            statuses=(Status.RUNNING, *STOP_IN_PROGRESS),
            output_incomplete=True,
        )

    def record_external_id(
        self, external_id: str, refs: dict[str, Any] | None = None, *, acknowledged: bool = True
    ) -> bool:
        """Persist the provider's id the moment it is known (once). An id of our own that the
        provider has not answered to yet is "sent", not "accepted"."""
        with transaction.atomic():
            won = bool(
                Run.objects.filter(pk=self.pk, external_id="").update(
                    external_id=external_id,
                    provider_refs=refs or {},
                    # The run's time limit counts from when the provider has it (a launch
                    # queued for the provider's quota had not started).
                    deadline=timezone.now() + dt.timedelta(seconds=self.timeout_seconds),
                    stall_deadline=self._next_stall_deadline(),
                    updated_at=timezone.now(),
                    version=F("version") + 1,
                )
            )
            if won:
                RunEvent.objects.create(
                    run_id=self.pk,
                    kind=RunEvent.Kind.ACCEPTED if acknowledged else RunEvent.Kind.SENT,
                    from_status=self.status,
                    to_status=self.status,
                    message=f"The provider accepted the run as {external_id}."
                    if acknowledged
                    else f"Sent to the provider as {external_id} (an id of Runbrake's own).",
                    data={"external_id": external_id},
                )
                announce_after_commit(self.pk)
        self.refresh_from_db()
        return won

    def record_output_complete(self) -> None:
        """The provider's own whole text arrived after a lost stream: nothing is missing."""
        if self.output_incomplete:
            self._update_quiet(output_incomplete=False)

    def record_progress(self, provider_status: str) -> bool:
        """The provider showed progress without new text (a polled run, a stream followed
        through its status): move the "no progress" deadline, and show a new provider status.
        """
        provider_status = _provider_words(provider_status)
        changed = bool(provider_status) and provider_status != self.provider_status
        if not changed and not self.no_progress_seconds:
            return False
        fields: dict[str, Any] = {"stall_deadline": self._next_stall_deadline()}
        if changed:
            fields.update(
                provider_status=provider_status,
                updated_at=timezone.now(),
                version=F("version") + 1,
            )
        with transaction.atomic():
            updated = Run.objects.filter(pk=self.pk, status=Status.RUNNING).update(**fields)
            if updated and changed:
                announce_after_commit(self.pk)
        if updated and changed:
            self.provider_status = provider_status
        return bool(updated)

    def _next_stall_deadline(self) -> dt.datetime | None:
        if not self.no_progress_seconds:
            return None
        return timezone.now() + dt.timedelta(seconds=self.no_progress_seconds)

    def claim_start(self) -> bool:
        """Only one process ever sends the start call for a run."""
        won = Run.objects.filter(
            pk=self.pk, start_attempted_at__isnull=True, external_id=""
        ).update(start_attempted_at=timezone.now())
        self.refresh_from_db()
        return bool(won)

    def release_start(self) -> None:
        """No start call is out (the provider refused the last, or the launch waits for its
        quota): whoever holds the run next may start it (or, stopped meanwhile, settle it)
        instead of waiting out a call that may be lost."""
        Run.objects.filter(pk=self.pk, external_id="").update(start_attempted_at=None)
        self.refresh_from_db()

    def never_answered_for(self) -> bool:
        """The run's id is our own (sent with the start call, never accepted) and the
        provider never said anything of it: no acceptance, no running, no output."""
        said = (RunEvent.Kind.ACCEPTED, RunEvent.Kind.RUNNING)
        return (
            not self.output
            and self.events.filter(kind=RunEvent.Kind.SENT).exists()
            and not self.events.filter(kind__in=said).exists()
        )

    def record_start_refused(self, message: str, seconds: float, *, announce: bool) -> None:
        """The start call was refused in a way that proves nothing started: its claim is
        released, and the first refusal of a backoff episode goes on the timeline in the same
        update (the timeline is what later says the run was refused, not never sent)."""
        if not announce:
            self.release_start()
            return
        self.record_event(
            RunEvent.Kind.BACKOFF,
            message,
            data={"seconds": seconds},
            statuses=ACTIVE,
            start_attempted_at=None,
        )

    def mark_running(self, provider_status: str = "") -> bool:
        return self._transition(
            (Status.PENDING,),
            Status.RUNNING,
            kind=RunEvent.Kind.RUNNING,
            message="The provider is working on it.",
            started_at=timezone.now(),
            stall_deadline=self._next_stall_deadline(),
            provider_status=provider_status,
            data={"provider_status": provider_status},
        )

    def request_stop(self, *, actor: Any = None, channel: str, reason: str = "") -> bool:
        """Record the intent to stop (saved before anyone is told it happened).

        Returns True when this call moved the run to STOPPING; False when a stop was already
        under way or done (idempotent). Raises RunAlreadyFinished for COMPLETED/FAILED.
        """
        if self.status in FINISHED:
            raise RunAlreadyFinished(self)
        reason = stop_reason(reason)
        now = timezone.now()
        # With a provider id the requester takes the first stop call's lease in the same
        # update, so the watcher's pass cannot send it first and leave the requester's answer
        # behind. Without an id there is nothing to send yet: due now, for whoever gets it.
        # The row decides, under the transition's lock (no query of its own before it).
        named = ~models.Q(external_id="")
        first_call: dict[str, Any] = {
            "stop_next_attempt_at": models.Case(
                models.When(named, then=models.Value(now + self._stop_lease())),
                default=models.Value(now),
            ),
            "stop_attempts": models.Case(
                models.When(named, then=F("stop_attempts") + 1),
                default=F("stop_attempts"),
                output_field=models.PositiveIntegerField(),
            ),
            "stop_sent_at": models.Case(
                models.When(named, then=models.Value(now)), default=F("stop_sent_at")
            ),
        }
        won = self._transition(
            (Status.PENDING, Status.RUNNING),
            Status.STOPPING,
            kind=RunEvent.Kind.STOP_REQUESTED,
            actor=actor,
            channel=channel,
            message=reason or "Stop requested.",
            stop_requested_at=now,
            stop_requested_by=actor if getattr(actor, "pk", None) else None,
            stop_channel=channel,
            stop_reason=reason,
            stop_deadline=now + dt.timedelta(seconds=settings.RUNBRAKE_STOP_GRACE_SECONDS),
            # Unnamed, the run has nothing for the requester to call: a watcher ends it.
            wake_watchers=not self.external_id,
            **first_call,
        )
        if not won and self.status in FINISHED:
            raise RunAlreadyFinished(self)
        return won

    @staticmethod
    def _stop_lease() -> dt.timedelta:
        return dt.timedelta(seconds=settings.RUNBRAKE_STOP_CALL_TIMEOUT + 5)

    def retry_stop_now(self, *, actor: Any) -> bool:
        """Someone asks for the stop call to go out again now, not at its next retry (the
        provider has not confirmed it). Refused while the last call's lease runs (a call may
        still be out: two at once must never happen) or the provider's quota holds it."""
        now = timezone.now()
        lease_over = models.Q(stop_sent_at__isnull=True) | models.Q(
            stop_sent_at__lt=now - self._stop_lease()
        )
        due = (
            Run.objects.filter(
                pk=self.pk, status__in=STOP_IN_PROGRESS, stop_next_attempt_at__isnull=False
            )
            .exclude(external_id="")
            .exclude(quota_endpoint="stop")
            .filter(lease_over)
            .update(stop_next_attempt_at=now)
        )
        self.refresh_from_db()
        if due:
            self.record_event(
                RunEvent.Kind.STOP_RETRY,
                f"{getattr(actor, 'username', 'Someone')} asked to send the stop again now.",
            )
        return bool(due)

    def claim_stop_attempt(self) -> bool:
        """Lease the next stop call: no two processes send a stop for the same run at once."""
        now = timezone.now()
        lease = self._stop_lease()
        won = (
            Run.objects.filter(
                pk=self.pk, status__in=STOP_IN_PROGRESS, stop_next_attempt_at__lte=now
            )
            .exclude(external_id="")
            .update(
                stop_next_attempt_at=now + lease,
                stop_attempts=F("stop_attempts") + 1,
                stop_sent_at=now,
            )
        )
        self.refresh_from_db()
        return bool(won)

    def record_stop_answer(self, result: StopResult, *, provider_label: str) -> None:
        data = {
            "provider_status": result.provider_status,
            "answer": result.answer,
            # What the answer proved ("completed": nothing left to stop), or None.
            "terminal": result.terminal,
        }
        # An answer that ends the run on the text kept so far (not the provider's whole final
        # text) may miss what the watcher reading the run showed the pages and has not saved
        # yet (it saves every second). A live reader says so when it lets go of the run
        # (`keep_text_after_end`); one that died never does, and the text stays marked. A dead
        # reader cannot be told from a live one here: its lease may be seconds from lapsing.
        ends_on_kept_text = (
            result.finished.output is None
            if result.finished is not None
            else result.terminal == "stopped"
        )
        unconfirmed: dict[str, Any] = {}
        if (
            ends_on_kept_text
            and self.external_id
            and self.watched_by
            and not self.output_incomplete
        ):
            data["text_unconfirmed_by"] = self.watched_by
            # A live reader lets go within a tick of the end; twice its lease is ample.
            wait = dt.timedelta(seconds=2 * settings.RUNBRAKE_WATCHER_LEASE_SECONDS)
            unconfirmed = {"text_unconfirmed_until": timezone.now() + wait}
        recheck = timezone.now() + dt.timedelta(seconds=settings.RUNBRAKE_STOP_RECHECK_SECONDS)
        self.record_event(
            RunEvent.Kind.STOP_ANSWER,
            result.message,
            data=data,
            stop_answer=data,
            **unconfirmed,
            stop_error="",
            **self._quota_cleared("stop"),
            # An answer that proves the outcome ends the calls; an acceptance that proves
            # nothing (Dify always says success) is sent again if nothing confirms it soon.
            # "Nothing to stop, it completed" (or failed) without the run's end is looked at
            # again too: the stream's reader gets the first chance to settle it with its
            # whole text, and the recheck reads the status if it did not (asend_stop).
            stop_next_attempt_at=None
            if result.terminal == "stopped" or result.finished is not None
            else recheck,
            # A run the provider says was over already has nothing left to confirm: no
            # "unconfirmed" while its end is read.
            **({"stop_deadline": None} if result.terminal in ("completed", "failed") else {}),
        )
        if result.finished is not None:
            final = result.finished
            if final.output is not None:
                self.settle(final, output=final.output, label=provider_label)
            else:
                self.settle(
                    final,
                    output=self.output,
                    label=provider_label,
                    output_incomplete=self.output_incomplete,
                )
            return
        if result.terminal == "stopped":
            by_status = result.via == "status"
            self.mark_stopped(
                confirmation=f"{provider_label}'s status after the stop call"
                if by_status
                else f"{provider_label}'s stop answer",
                proof=Proof.STATUS_READ if by_status else Proof.STOP_ANSWER,
                data=data,
            )

    def record_stop_failure(self, error: ProviderError) -> None:
        delay = error.retry_after if error.retry_after is not None else self._stop_backoff()
        if not error.retryable:
            # A bad key or unknown run will not fix itself quickly; keep checking, slowly.
            delay = max(delay, 30.0)
        self.record_event(
            RunEvent.Kind.STOP_FAILED,
            error.message,
            data={**error.as_dict(), "retry_in_seconds": round(delay, 2)},
            stop_error=error.message,
            stop_next_attempt_at=timezone.now() + dt.timedelta(seconds=delay),
            **self._quota_cleared("stop"),
        )

    def record_stop_queued(self, exc: QuotaExhausted, *, sent_before: dt.datetime | None) -> None:
        """The stop call waits for the account's stop quota: nothing was sent (or the provider
        refused it as over its quota, which stops nothing), nothing failed. It goes out the
        moment the budget allows, and the deadline for the provider to confirm starts then."""
        now = timezone.now()
        wait = dt.timedelta(seconds=exc.retry_after or 0.0)
        grace = dt.timedelta(seconds=settings.RUNBRAKE_STOP_GRACE_SECONDS)
        episode = self.quota_endpoint != "stop"
        fields: dict[str, Any] = {
            "quota_endpoint": "stop",
            "quota_until": now + wait,
            "quota_reason": exc.message[:300],
            "stop_next_attempt_at": now + wait,
            "stop_deadline": now + wait + grace,
            # The claimed attempt never went out, or was refused unheard: it does not count.
            "stop_attempts": F("stop_attempts") - 1,
            "stop_sent_at": sent_before,
            "stop_error": "",
        }
        if not episode:
            self._update_quiet(statuses=STOP_IN_PROGRESS, **fields)
            return
        self.record_event(
            RunEvent.Kind.STOP_QUEUED,
            f"{exc.message} The stop is queued, not failed: it goes out at "
            f"{timezone.localtime(now + wait):%H:%M:%S %Z}.",
            data={
                "endpoint": "stop",
                "wait_seconds": round(wait.total_seconds(), 1),
                "refused_by_provider": exc.refused_by_provider,
            },
            statuses=STOP_IN_PROGRESS,
            **fields,
        )

    def record_quota_wait(
        self,
        endpoint: str,
        seconds: float,
        reason: str,
        *,
        refused_by_provider: bool = False,
        release_start: bool = False,
    ) -> None:
        """A call this run needs (a status or output read) waits for the account's quota; one
        event per waiting episode, the time shown on the run kept current. The first call the
        provider itself refused gets an event of its own, even mid-episode: the timeline is the
        record that a call went out (and proves, being refused, that nothing started)."""
        now = timezone.now()
        fields = {
            "quota_endpoint": endpoint,
            "quota_until": now + dt.timedelta(seconds=seconds),
            "quota_reason": reason[:300],
        }
        if release_start and not self.external_id:
            # In the same update as the wait: a watcher dying between the two would leave a
            # claim on a start call that is not out (taken for one lost in a restart).
            fields["start_attempted_at"] = None
        if self.quota_endpoint == endpoint and not (
            refused_by_provider and not self._provider_refused_over_quota()
        ):
            self._update_quiet(statuses=ACTIVE, **fields)
            return
        data: dict[str, Any] = {"endpoint": endpoint, "wait_seconds": round(seconds, 1)}
        if refused_by_provider:
            data["refused_by_provider"] = True
        self.record_event(RunEvent.Kind.QUOTA_WAIT, reason, data=data, statuses=ACTIVE, **fields)

    def _provider_refused_over_quota(self) -> bool:
        return self.events.filter(
            kind=RunEvent.Kind.QUOTA_WAIT, data__endpoint="create", data__refused_by_provider=True
        ).exists()

    def queue_for_quota(self, exc: QuotaExhausted) -> None:
        """The launch waits for the create quota: the start call was never sent, or the
        provider refused it as over quota, so nothing started and the claim on it is released
        (a restarted watcher sends it, once) and the run shows Queued."""
        self.record_quota_wait(
            "create",
            exc.retry_after or 0.0,
            exc.message,
            refused_by_provider=exc.refused_by_provider,
            release_start=True,
        )

    def clear_quota_wait(self, *endpoints: str) -> None:
        """The call that waited went out: the run no longer waits (only for these kinds of
        call, so a session's status read never clears a stop queued by another process)."""
        if self.quota_endpoint and self.quota_endpoint in endpoints:
            self._update_quiet(**self._quota_cleared(self.quota_endpoint))

    def _quota_cleared(self, endpoint: str) -> dict[str, Any]:
        if self.quota_endpoint != endpoint:
            return {}
        return {"quota_endpoint": "", "quota_until": None, "quota_reason": ""}

    def _update_quiet(self, *, statuses: tuple[str, ...] = ACTIVE, **fields: Any) -> None:
        """A visible change that is not worth a timeline entry: saved and pushed (while the
        run is still in one of `statuses`; a run that ended meanwhile keeps its last word)."""
        with transaction.atomic():
            if Run.objects.filter(pk=self.pk, status__in=statuses).update(
                updated_at=timezone.now(), version=F("version") + 1, **fields
            ):
                announce_after_commit(self.pk)
        self.refresh_from_db()

    def _stop_backoff(self) -> float:
        return float(min(60, 2 ** max(0, self.stop_attempts - 1)))

    def mark_stopped(
        self,
        *,
        confirmation: str,
        proof: str,
        data: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> bool:
        now = timezone.now()
        unrequested = self.status in (Status.PENDING, Status.RUNNING)
        return self._transition(
            (Status.PENDING, Status.RUNNING, Status.STOPPING, Status.STOP_UNCONFIRMED),
            Status.STOPPED,
            kind=RunEvent.Kind.STOPPED,
            channel=Channel.PROVIDER if unrequested else Channel.SYSTEM,
            message=f"Stopped — confirmed by {confirmation}.",
            data={**(data or {}), "proof": proof},
            finished_at=now,
            provider_status=(data or {}).get("provider_status") or self.provider_status,
            stop_confirmed_at=now,
            stop_confirmation=confirmation[:200],
            proof=proof,
            stop_next_attempt_at=None,
            **self._usage_fields(usage),
        )

    def mark_stopped_unstarted(self, *, refused: bool | None = None) -> bool:
        """Stopped before the provider started it, so there is nothing to call: the start
        call was never sent, or (`refused`) every one sent was refused in a way that proves
        nothing started (a 429, a 5xx, a refused connection) and none went out after the stop.
        Unsaid, the timeline tells: before the provider names a run, the only waits to try
        again follow a refused start call, and a launch queued for the quota says whether the
        provider refused one."""
        if refused is None:
            refused = (
                self.events.filter(kind=RunEvent.Kind.BACKOFF).exists()
                or self._provider_refused_over_quota()
            )
        if refused:
            return self.mark_stopped(
                confirmation="the provider refusing the start call (nothing started there), "
                "with none sent after the stop",
                proof=Proof.START_REFUSED,
            )
        return self.mark_stopped(
            confirmation="never having been sent to the provider", proof=Proof.NEVER_SENT
        )

    def force_mark_stopped(self, *, actor: Any, reason: str) -> bool:
        """An admin's last resort for a stop the provider never confirmed; says so plainly."""
        reason = stop_reason(reason)[:FORCE_REASON_MAX]
        now = timezone.now()
        return self._transition(
            STOP_IN_PROGRESS,
            Status.STOPPED,
            kind=RunEvent.Kind.FORCED_STOP,
            actor=actor,
            channel=Channel.ADMIN,
            message=f"Force-marked stopped by an admin without provider confirmation: {reason}",
            data={"proof": Proof.ADMIN_FORCE},
            finished_at=now,
            stop_confirmed_at=now,
            stop_confirmation=f"an admin's force-mark, not the provider ({reason})",
            proof=Proof.ADMIN_FORCE,
            stop_next_attempt_at=None,
        )

    def mark_stop_unconfirmed(self) -> bool:
        return self._transition(
            (Status.STOPPING,),
            Status.STOP_UNCONFIRMED,
            kind=RunEvent.Kind.STOP_UNCONFIRMED,
            message=(
                "The provider has not confirmed the stop within "
                f"{settings.RUNBRAKE_STOP_GRACE_SECONDS:g} s. Runbrake keeps checking and "
                "sending it again; a team admin who sees the run stopped at the provider can "
                "mark it stopped by hand on its page."
            ),
        )

    def mark_completed(
        self,
        *,
        proof: str,
        output: str = "",
        structured_output: Any = None,
        provider_status: str = "",
        message: str = "",
        usage: dict[str, Any] | None = None,
        output_incomplete: bool = False,
    ) -> bool:
        before_stop = self.status in STOP_IN_PROGRESS
        won = self._transition(
            (Status.PENDING, Status.RUNNING, Status.STOPPING, Status.STOP_UNCONFIRMED),
            Status.COMPLETED,
            kind=RunEvent.Kind.COMPLETED,
            message=message
            or (
                "Completed — the run finished before the stop landed."
                if before_stop
                else f"Completed — known from {Proof(proof).label}."
            ),
            data={"proof": proof},
            finished_at=timezone.now(),
            output=output or "",
            output_incomplete=output_incomplete,
            structured_output=structured_output,
            provider_status=provider_status,
            proof=proof,
            stop_next_attempt_at=None,
            **self._usage_fields(usage),
        )
        if not won:
            self._record_late("completed", provider_status)
        return won

    def mark_failed(
        self,
        *,
        error: str,
        proof: str,
        provider_status: str = "",
        usage: dict[str, Any] | None = None,
    ) -> bool:
        won = self._transition(
            ACTIVE,
            Status.FAILED,
            kind=RunEvent.Kind.FAILED,
            message=error,
            data={"proof": proof},
            finished_at=timezone.now(),
            error=error,
            provider_status=provider_status,
            proof=proof,
            stop_next_attempt_at=None,
            **self._usage_fields(usage),
        )
        if not won:
            self._record_late("failed", provider_status)
        return won

    def settle(
        self, finished: Finished, *, output: str, label: str, output_incomplete: bool = False
    ) -> bool:
        """Apply the provider's own word that the run ended (from its stream, a status read,
        its history or a webhook), keeping `output` as the run's text."""
        proof = PROOF_BY_SOURCE[finished.via]
        usage = finished.usage.as_dict() if finished.usage is not None else None
        data = {"provider_status": finished.provider_status}
        if finished.status == "stopped":
            self.keep_text(output, output_incomplete)
            via = {
                "stream": f"{label}'s stream reporting the run stopped",
                "status": f"{label}'s status ({finished.provider_status})",
                "history": f"{label}'s record of the message",
                "webhook": f"{label}'s webhook",
            }[finished.via]
            return self.mark_stopped(confirmation=via, proof=proof, data=data, usage=usage)
        if finished.status == "failed":
            self.keep_text(output, output_incomplete)
            return self.mark_failed(
                error=finished.error or f"{label} reported the run as failed.",
                proof=proof,
                provider_status=finished.provider_status,
                usage=usage,
            )
        message = ""
        if self.status == Status.STOP_UNCONFIRMED:
            message = f"Completed — {label} ran the run to its end despite the stop."
        return self.mark_completed(
            proof=proof,
            output=output,
            output_incomplete=output_incomplete,
            structured_output=finished.structured_output,
            provider_status=finished.provider_status,
            message=message,
            usage=usage,
        )

    def keep_text_after_end(self, text: str, incomplete: bool, *, reader: str) -> None:
        """The run ended without the session that reads it for watcher `reader` (a stop
        answer, a webhook): what the session showed the pages is kept when it carries on
        from the saved text (saves skip ended runs), and marked incomplete if the session
        lost some. When the stop answer left the text unconfirmed until this reader let go,
        it vouches for it now. No mark of incomplete text is ever cleared: a session vouches
        only for what it read. A completed run keeps the provider's own final text."""
        self.refresh_from_db()
        unconfirmed_by = (self.stop_answer or {}).get("text_unconfirmed_by")
        # A completion counts only when it, too, ended on the kept text (a stop answer).
        ended = (Status.STOPPED, Status.FAILED, *((Status.COMPLETED,) if unconfirmed_by else ()))
        if self.status not in ended:
            return
        if text.startswith(self.output):
            kept = text
        elif self.output.startswith(text):
            kept = self.output  # everything it showed is saved (more came another way)
        else:
            return  # the provider's own text replaced what streamed
        fields: dict[str, Any] = {}
        if kept != self.output:
            fields["output"] = kept
        if incomplete and not self.output_incomplete:
            fields["output_incomplete"] = True
        if reader and unconfirmed_by == reader and self.text_unconfirmed_until is not None:
            fields["text_unconfirmed_until"] = None
        if not fields:
            return
        with transaction.atomic():
            # Only over the row just read: another session letting go of the same run
            # (after a takeover) never loses its longer text to this one.
            if Run.objects.filter(pk=self.pk, status__in=ended, version=self.version).update(
                updated_at=timezone.now(), version=F("version") + 1, **fields
            ):
                announce_after_commit(self.pk)
        self.refresh_from_db()

    def mark_text_unconfirmed(self) -> bool:
        """The watcher that read this run never vouched for the text it showed before the
        run ended (it died): what it had not saved is gone, so the kept text is marked
        incomplete, once."""
        with transaction.atomic():
            if not Run.objects.filter(pk=self.pk, text_unconfirmed_until__isnull=False).update(
                text_unconfirmed_until=None
            ):
                return False
            self.record_event(
                RunEvent.Kind.STREAM_LOST,
                "The watcher reading this run stopped before it confirmed the text it had "
                "shown; text shown but not saved may be missing, so the kept text is marked "
                "incomplete.",
                statuses=TERMINAL,
                output_incomplete=True,
            )
        return True

    def keep_text(self, output: str, incomplete: bool) -> None:
        """Keep the text so far before a stopped or failed transition (which writes none)."""
        if output != self.output or incomplete != self.output_incomplete:
            Run.objects.filter(pk=self.pk, status__in=ACTIVE).update(
                output=output, output_incomplete=incomplete
            )
            self.output, self.output_incomplete = output, incomplete

    @staticmethod
    def _usage_fields(usage: dict[str, Any] | None) -> dict[str, Any]:
        return {"usage": usage} if usage else {}

    def _record_late(self, news: str, provider_status: str) -> None:
        if self.is_terminal and self.status != news:
            self.record_event(
                RunEvent.Kind.LATE_RESULT,
                f"The provider later reported '{provider_status or news}'; the run stays "
                f"{self.get_status_display().lower()}.",
                data={"provider_status": provider_status, "reported": news},
            )

    # --- The stop path (async: the view and the watcher both use it) -----------------------

    def launch_again(self, *, user: Any) -> Run:
        """Run again: the same prompt and options on the same account, as a new run."""
        return Run.objects.launch(
            account=self.provider_account,
            user=user,
            prompt=self.prompt,
            options=self.options,
            timeout_seconds=self.timeout_seconds,
            no_progress_seconds=self.no_progress_seconds,
        )

    async def astop(self, *, actor: Any, channel: str, reason: str = "") -> StopOutcome:
        requested = await dbthreads.call(
            self.pk, self.request_stop, actor=actor, channel=channel, reason=reason
        )
        return await self.asend_requested_stop(requested)

    async def asend_requested_stop(
        self, requested: bool, account: ProviderAccount | None = None
    ) -> StopOutcome:
        """The rest of `astop`, for a view that called `request_stop` itself, in the thread
        hop of its own checks; `account` when it loaded the run's account with the run."""
        if requested:
            # request_stop took the first call's lease when the provider id was known.
            await self.asend_stop(claimed=self.stop_sent_at is not None, account=account)
        return StopOutcome(run=self, requested=requested)

    async def asend_stop(
        self, *, claimed: bool = False, account: ProviderAccount | None = None
    ) -> None:
        """Make one provider stop call if one is due (or already leased to us), and record
        what the provider said."""
        sent_before = None if claimed else self.stop_sent_at
        if not claimed and not await dbthreads.call(self.pk, self.claim_stop_attempt):
            return
        if account is None:
            account = await dbthreads.call(
                self.pk, ProviderAccount.objects.get, pk=self.provider_account_id
            )
        provider = account.provider()
        if self.stop_answer and not provider.normal_end_confirms_stop:
            # The provider answered a stop before and nothing has settled the run since: the
            # reader of its stream may be gone. If the provider says the run is over, that is
            # applied (the text kept so far marked incomplete: what streamed after the last
            # save was never read), and no second stop call goes out. (Dify's status is its
            # message history, which its sessions read with the stop's own rules.)
            over = await self._ended_by_the_providers_word(provider)
            if over is not None:
                await dbthreads.call(
                    self.pk,
                    self.settle,
                    over,
                    output=self.output,
                    label=provider.label,
                    output_incomplete=True,
                )
                return
            if self.stop_answer.get("terminal") in ("completed", "failed"):
                # It said there was nothing left to stop: never a second call; look again.
                await dbthreads.call(self.pk, self.recheck_later, sent_before=sent_before)
                return
        try:
            result = await provider.stop(
                self.external_id, self.options, timeout=settings.RUNBRAKE_STOP_CALL_TIMEOUT
            )
        except QuotaExhausted as exc:
            await dbthreads.call(self.pk, self.record_stop_queued, exc, sent_before=sent_before)
            return
        except ProviderError as exc:
            await dbthreads.call(self.pk, self.record_stop_failure, exc)
            return
        await dbthreads.call(
            self.pk, self.record_stop_answer, result, provider_label=provider.label
        )

    def recheck_later(self, *, sent_before: dt.datetime | None) -> None:
        """The claimed attempt was a status read, not a stop call: it is not counted as one,
        and the status is read again at the next recheck."""
        recheck = dt.timedelta(seconds=settings.RUNBRAKE_STOP_RECHECK_SECONDS)
        self._update_quiet(
            statuses=STOP_IN_PROGRESS,
            stop_next_attempt_at=timezone.now() + recheck,
            stop_attempts=F("stop_attempts") - 1,
            stop_sent_at=sent_before,
        )

    async def _ended_by_the_providers_word(self, provider: Provider) -> Finished | None:
        """How the run ended, in the provider's words: its status now; or, once the status no
        longer knows the run (a provider restart forgot it: IntelligenceBox's `not_found`, or a
        refusal that will not change), what its answer to the stop already said ("nothing to
        stop: completed"). None while neither says (a transient error waits for the next
        recheck)."""
        answer = self.stop_answer or {}
        said = answer.get("terminal")
        earlier = (
            Finished(said, str(answer.get("provider_status") or said), via="status")
            if said in ("completed", "failed")
            else None
        )
        try:
            status = await provider.status(self.external_id, self.provider_refs)
        except ProviderError as exc:
            return None if exc.retryable else earlier
        if status.terminal is not None:
            return Finished(
                status.terminal, status.provider_status, error=status.error, via="status"
            )
        return earlier


class RunEvent(models.Model):
    class Kind(models.TextChoices):
        CREATED = "created", "Launched"
        ACCEPTED = "accepted", "Accepted by provider"
        SENT = "sent", "Sent to the provider"
        RUNNING = "running", "Running"
        BACKOFF = "backoff", "Waiting to try again"
        QUOTA_WAIT = "quota_wait", "Waiting for the provider's quota"
        STOP_QUEUED = "stop_queued", "Stop queued for the provider's quota"
        STOP_RETRY = "stop_retry", "Stop sent again on request"
        STOP_REQUESTED = "stop_requested", "Stop requested"
        STOP_ANSWER = "stop_answer", "Provider answered the stop"
        STOP_FAILED = "stop_failed", "Stop call failed"
        STOP_UNCONFIRMED = "stop_unconfirmed", "Stop unconfirmed"
        STOPPED = "stopped", "Stopped"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        LATE_RESULT = "late_result", "Late provider result"
        OUTPUT_AFTER_STOP = "output_after_stop", "Output after the stop"
        FORCED_STOP = "forced_stop", "Force-marked stopped"
        STREAM_LOST = "stream_lost", "Stream lost"
        PROVIDER_ERROR = "provider_error", "Provider error"

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=24, choices=Kind.choices)
    from_status = models.CharField(max_length=20, blank=True)
    to_status = models.CharField(max_length=20, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    channel = models.CharField(max_length=10, choices=Channel, default=Channel.SYSTEM)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} at {self.at:%H:%M:%S}"


class QuotaSpend(models.Model):
    """One call an account made that its provider counts against a quota (runs/quota.py)."""

    account = models.ForeignKey(ProviderAccount, on_delete=models.CASCADE, related_name="+")
    endpoint = models.CharField(max_length=10)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["account", "endpoint", "at"], name="quota_spend_window"),
            models.Index(fields=["account", "at"], name="quota_spend_month"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} call of account {self.account_id} at {self.at:%H:%M:%S}"


class QuotaBlock(models.Model):
    """The provider itself refused an account's calls of one kind as over quota (a 429):
    every process waits until `until`. `strikes` grows the wait while refusals repeat."""

    account = models.ForeignKey(ProviderAccount, on_delete=models.CASCADE, related_name="+")
    endpoint = models.CharField(max_length=10)
    until = models.DateTimeField()
    strikes = models.PositiveIntegerField(default=1)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "endpoint"], name="one_block_per_endpoint")
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} calls of account {self.account_id} refused until {self.until}"


class WebhookEvent(models.Model):
    """A provider webhook delivery applied once: redeliveries of the same event id are
    answered and ignored."""

    account = models.ForeignKey(ProviderAccount, on_delete=models.CASCADE, related_name="+")
    event_id = models.CharField(max_length=200)
    kind = models.CharField(max_length=40, blank=True)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "event_id"], name="one_delivery_per_event")
        ]

    def __str__(self) -> str:
        return f"{self.kind} webhook {self.event_id}"


# A force-mark's reason goes into stop_confirmation (200 characters) after its own words.
FORCE_REASON_MAX = 150

LAST_USED_PRECISION = dt.timedelta(minutes=1)


class ApiToken(models.Model):
    """A bearer token for the JSON API. Only its SHA-256 is stored."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12)
    # What it is for, in its owner's words ("nightly report script"); optional.
    name = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @staticmethod
    def digest_of(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    @classmethod
    def issue(cls, user: Any, *, name: str = "", expires_at: dt.datetime | None = None) -> str:
        """A new token: returned once, only its digest kept."""
        token = "rb_" + secrets.token_urlsafe(32)
        cls.objects.create(
            user=user,
            digest=cls.digest_of(token),
            prefix=token[:10],
            name=name[:100],
            expires_at=expires_at,
        )
        return token

    @classmethod
    def user_for(cls, token: str) -> Any:
        now = timezone.now()
        found = (
            cls.objects.select_related("user")
            .filter(digest=cls.digest_of(token), user__is_active=True)
            .filter(models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now))
            .first()
        )
        if found is None:
            return None
        if found.last_used_at is None or now - found.last_used_at >= LAST_USED_PRECISION:
            # A write per API call would serialise every call on SQLite's write lock; to the
            # minute is precise enough for "last used".
            cls.objects.filter(pk=found.pk).update(last_used_at=now)
        return found.user


__all__ = [
    "ACTIVE",
    "TERMINAL",
    "ApiToken",
    "Channel",
    "Membership",
    "Proof",
    "ProviderAccount",
    "QuotaBlock",
    "QuotaSpend",
    "QuotaTier",
    "Role",
    "Run",
    "RunAlreadyFinished",
    "RunEvent",
    "Status",
    "StopOutcome",
    "Team",
    "WebhookEvent",
]
