"""Bench data: a team of members with ready sessions (cookies) and an API token, provider
accounts on the simulator process, and (for the list rows) bulk-seeded runs.

    setup_data.py accounts <sim_url,...> <n_users>   -> JSON {team, cookies, token, accounts}
    setup_data.py seed <big_n> <small_n>        -> JSON {big_team, small_team, cookie}
Runs inside the bench's environment (DATABASE_URL picks the backend) against the measured
tree's code (BENCH_APP: this checkout, or the BENCH_BEFORE checkout)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("BENCH_APP") or str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

import django

django.setup()

from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from runs.models import (  # noqa: E402
    ApiToken,
    Membership,
    ProviderAccount,
    ProviderKind,
    Role,
    Run,
    Team,
)


def session_for(user: User) -> str:
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    assert store.session_key is not None
    return store.session_key


def member(team: Team, name: str, role: str = Role.MEMBER) -> User:
    user, created = User.objects.get_or_create(username=name)
    if created:
        user.set_unusable_password()
        user.save()
    Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    return user


def accounts(sim_urls: list[str], n_users: int) -> dict[str, object]:
    sim_url = sim_urls[0]
    call_command("migrate", verbosity=0, interactive=False)
    with transaction.atomic():
        team, _ = Team.objects.get_or_create(name="Bench")
        users = [member(team, f"bench-{i}") for i in range(n_users)]
        made = {}
        for kind, path in (
            (ProviderKind.FAY, "/sim/fay/api/v1"),
            (ProviderKind.INTELLIGENCEBOX, "/sim/intelligencebox"),
        ):
            account, _ = ProviderAccount.objects.update_or_create(
                team=team,
                name=f"bench {kind}",
                defaults={"kind": kind, "base_url": sim_url + path, "api_key": "sim-bench-key"},
            )
            made[str(kind)] = account.pk
        # One IntelligenceBox account per simulator process: many streams, spread out.
        ib_accounts = []
        for i, url in enumerate(sim_urls):
            account, _ = ProviderAccount.objects.update_or_create(
                team=team,
                name=f"bench intelligencebox {i}",
                defaults={
                    "kind": ProviderKind.INTELLIGENCEBOX,
                    "base_url": url + "/sim/intelligencebox",
                    "api_key": "sim-bench-key",
                },
            )
            ib_accounts.append(account.pk)
    return {
        "team": team.pk,
        "cookies": [session_for(u) for u in users],
        "token": ApiToken.issue(users[0]),
        "accounts": made,
        "ib_accounts": ib_accounts,
    }


def seed(big_n: int, small_n: int) -> dict[str, object]:
    """Bulk-insert finished runs (set-based SQL: ~10 s per million rows)."""
    call_command("migrate", verbosity=0, interactive=False)
    out: dict[str, object] = {}
    for label, n in (("big", big_n), ("small", small_n)):
        team, _ = Team.objects.get_or_create(name=f"Bench list {label}")
        user = member(team, f"bench-list-{label}")
        account, _ = ProviderAccount.objects.update_or_create(
            team=team,
            name="bench list fay",
            defaults={
                "kind": ProviderKind.FAY,
                "base_url": "http://127.0.0.1:9/sim/fay/api/v1",
                "api_key": "sim-bench-key",
            },
        )
        have = Run.objects.filter(team=team).count()
        if have < n:
            started = time.monotonic()
            _insert_runs(team.pk, account.pk, user.pk, n - have)
            print(f"seeded {n - have} runs in {time.monotonic() - started:.1f} s", file=sys.stderr)
        out[f"{label}_team"] = team.pk
        out[f"{label}_cookie"] = session_for(user)
        out[f"{label}_n"] = Run.objects.filter(team=team).count()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE runs_run")
    return out


def _insert_runs(team_id: int, account_id: int, user_id: int, n: int) -> None:
    """Mostly finished runs, a realistic mix, each 30 s long, ending over the last n seconds.
    The columns come from the model (any column the measured tree has that is not set here gets
    its field's default), so the same code seeds an older or a newer schema."""
    now = timezone.now()
    pg = connection.vendor == "postgresql"
    stamp: Any = now if pg else now.strftime("%Y-%m-%d %H:%M:%S.%f")
    if pg:
        status = "(ARRAY['completed','completed','completed','stopped','failed'])[1 + g %% 5]"
        created = "%s - make_interval(secs => %s - g + 30)"
        finished = "%s - make_interval(secs => %s - g)"
    else:
        status = "CASE g %% 5 WHEN 3 THEN 'stopped' WHEN 4 THEN 'failed' ELSE 'completed' END"
        created = "datetime(%s, '-' || (%s - g + 30) || ' seconds')"
        finished = "datetime(%s, '-' || (%s - g) || ' seconds')"
    special: dict[str, tuple[str, list[Any]]] = {
        "team_id": ("%s", [team_id]),
        "provider_account_id": ("%s", [account_id]),
        "created_by_id": ("%s", [user_id]),
        "provider": ("'fay'", []),
        "status": (status, []),
        "version": ("3", []),
        "external_id": ("'bench-' || g", []),
        "prompt": ("'Bench prompt number ' || g", []),
        "timeout_seconds": ("1800", []),
        "deadline": ("%s", [stamp]),
        "created_at": (created, [stamp, n]),
        # Finished runs ran for 30 s, as the state machine records them (a finished row
        # without an end would show a time that grows on every view).
        "started_at": (created, [stamp, n]),
        "finished_at": (finished, [stamp, n]),
        "updated_at": ("%s", [stamp]),
    }
    columns, values, params = [], [], []
    for field in Run._meta.concrete_fields:
        if field.primary_key:
            continue
        column = str(field.column)
        columns.append(connection.ops.quote_name(column))
        if column in special:
            expr, args = special[column]
        elif field.null:
            expr, args = "NULL", []
        else:
            expr, args = "%s", [field.get_db_prep_save(field.get_default(), connection)]
        values.append(expr)
        params += args
    head = f"INSERT INTO runs_run ({', '.join(columns)}) SELECT {', '.join(values)}"
    if pg:
        sql = f"{head} FROM generate_series(1, %s) AS g"
        params.append(n)
    else:
        sql = (
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < %s) "
            f"{head} FROM s"
        )
        params.insert(0, n)
    with transaction.atomic(), connection.cursor() as cursor:
        if not pg or n < 100_000:
            cursor.execute(sql, params)
            return
        # A million rows load several times faster without per-row foreign-key triggers (the
        # rows point at the team, account and user just made) and with the plain indexes built
        # once afterwards, from their own definitions; all in one transaction.
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(
            """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
            FROM pg_index i
            WHERE i.indrelid = 'runs_run'::regclass AND NOT i.indisprimary
            AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"""
        )
        indexes = cursor.fetchall()
        for name, _ddl in indexes:
            cursor.execute(f"DROP INDEX {name}")
        cursor.execute(sql, params)
        for _name, ddl in indexes:
            cursor.execute(ddl)


if __name__ == "__main__":
    if sys.argv[1] == "accounts":
        print(json.dumps(accounts(sys.argv[2].split(","), int(sys.argv[3]))))
    elif sys.argv[1] == "seed":
        print(json.dumps(seed(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        raise SystemExit(__doc__)
