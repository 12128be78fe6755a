"""The chaos soak's data: one team of members with sessions (for the live viewers) and API
tokens (for the clients), and an account per provider on that provider's own simulator
process.

    chaos_setup.py '<json: {provider: simulator base URL}>'  -> JSON {team, cookies, tokens,
                                                                  accounts: {provider: id}}
Runs in the soak's environment (DATABASE_URL is its private PostgreSQL)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

import django

django.setup()

from django.db import transaction  # noqa: E402
from setup_data import member, session_for  # noqa: E402

from runs.models import ApiToken, ProviderAccount, Team  # noqa: E402


def setup(sims: dict[str, str]) -> dict[str, object]:
    with transaction.atomic():
        team = Team.objects.create(name="Chaos")
        users = [member(team, f"chaos-{i}") for i in range(3)]
        accounts = {}
        for kind, url in sims.items():
            account = ProviderAccount.objects.create(
                team=team,
                name=f"chaos {kind}",
                kind=kind,
                base_url=url,
                api_key="sim-chaos-key",
                options={"agent_id": "chaos-agent"} if kind == "xpander" else {},
            )
            accounts[kind] = account.pk
    return {
        "team": team.pk,
        "cookies": [session_for(u) for u in users],
        "tokens": [ApiToken.issue(u) for u in users],
        "accounts": accounts,
    }


if __name__ == "__main__":
    print(json.dumps(setup(json.loads(sys.argv[1]))))
