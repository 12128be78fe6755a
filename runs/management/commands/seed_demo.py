import os
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.urls import reverse

from runs.models import Membership, ProviderAccount, ProviderKind, QuotaTier, Role, Team
from simulators.fay import register_webhook

TEAMS = {
    "Acme Research": [("alice", Role.ADMIN), ("bob", Role.MEMBER), ("carol", Role.VIEWER)],
    "Globex": [("mallory", Role.ADMIN)],
}


# One simulator account per provider in every demo team, plus a Fay free-tier key to show
# quota pacing: (name, kind, path, options, key prefix, quota tier, receives webhooks).
ACCOUNTS = [
    ("Fay (simulator)", ProviderKind.FAY, "/sim/fay/api/v1", {}, "sim-pro", QuotaTier.PRO, True),
    (
        "Fay free tier (simulator)",
        ProviderKind.FAY,
        "/sim/fay/api/v1",
        {},
        "sim-free",
        QuotaTier.FREE,
        False,
    ),
    ("Dify (simulator)", ProviderKind.DIFY, "/sim/dify/v1", {}, "sim", QuotaTier.UNLIMITED, False),
    (
        "IntelligenceBox (simulator)",
        ProviderKind.INTELLIGENCEBOX,
        "/sim/intelligencebox",
        {},
        "sim",
        QuotaTier.UNLIMITED,
        False,
    ),
    (
        "xpander.ai (simulator)",
        ProviderKind.XPANDER,
        "/sim/xpander",
        {"agent_id": "research-agent"},
        "sim",
        QuotaTier.UNLIMITED,
        False,
    ),
]


class Command(BaseCommand):
    help = "Create (or refresh) the demo teams, users and simulator accounts. Idempotent."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--base-url", help="Where the simulators are served.")

    def handle(self, *args: Any, base_url: str | None = None, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError("seed_demo creates well-known passwords: refused with DEBUG off.")
        password = os.environ.get("DEMO_PASSWORD", "runbrake-demo")
        base = (base_url or f"http://127.0.0.1:{os.environ.get('PORT', '8000')}").rstrip("/")
        User = get_user_model()
        with transaction.atomic():
            admin, created = User.objects.get_or_create(
                username="admin", defaults={"is_staff": True, "is_superuser": True}
            )
            if created:
                admin.set_password(password)
                admin.save()
            for team_name, people in TEAMS.items():
                team, _ = Team.objects.get_or_create(name=team_name)
                for username, role in people:
                    user, created = User.objects.get_or_create(username=username)
                    if created:
                        user.set_password(password)
                        user.save()
                    Membership.objects.update_or_create(
                        team=team, user=user, defaults={"role": role}
                    )
                slug = team_name.lower().split()[0]
                for name, kind, path, options, prefix, tier, hooks in ACCOUNTS:
                    key = f"{prefix}-{slug}-{kind}-demo-key"
                    account, _ = ProviderAccount.objects.update_or_create(
                        team=team,
                        name=name,
                        defaults={
                            "kind": kind,
                            "base_url": f"{base}{path}",
                            "api_key": key,
                            "options": options,
                            "quota_tier": tier,
                        },
                    )
                    if hooks:
                        # As an admin would: register the account's URL in Fay's dashboard
                        # (the simulator's), then keep the secret it shows once.
                        url = base + reverse("runs:fay-webhook", args=[account.webhook_token])
                        account.webhook_secret = register_webhook(key, url)
                        account.save(update_fields=["webhook_secret"])
        self.stdout.write(self.style.SUCCESS("Demo data ready."))
