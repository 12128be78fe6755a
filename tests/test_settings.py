"""Settings are strict on bad values, and production settings pass `check --deploy`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cryptography.fernet import Fernet

from tests.conftest import ROOT

PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "x" * 20 + "-production-secret-key-with-enough-entropy-1234567890",
    "RUNBRAKE_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
    "ALLOWED_HOSTS": "runbrake.example.com",
    "RUNBRAKE_SIMULATORS": "false",
}


# Never connected to: `check` and printing settings open no database connection.
POSTGRES = "postgres://runbrake@db.invalid:5432/runbrake"


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RUNBRAKE_", "DEBUG", "SECRET_KEY"))
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_settings_pass_check_deploy():
    result = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SECRET_KEY": ""}, "SECRET_KEY must be set"),
        ({"RUNBRAKE_ENCRYPTION_KEYS": ""}, "RUNBRAKE_ENCRYPTION_KEYS must be set"),
        ({"RUNBRAKE_ENCRYPTION_KEYS": "not-a-key"}, "not a Fernet key"),
        ({"DEBUG": "maybe"}, "DEBUG must be a boolean"),
        ({"RUNBRAKE_STOP_GRACE_SECONDS": "soon"}, "must be a number"),
        ({"DATABASE_URL": "nosuch://x"}, "DATABASE_URL is not a valid database URL"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL must be a redis:// URL"),
        ({"RUNBRAKE_RATE_LAUNCH": "lots"}, "RUNBRAKE_RATE_LAUNCH must look like 30/60"),
        (
            {"DATABASE_URL": POSTGRES, "RUNBRAKE_DB_POOL_MAX_SIZE": "many"},
            "RUNBRAKE_DB_POOL_MAX_SIZE must be an integer",
        ),
        (
            {"DATABASE_URL": POSTGRES, "RUNBRAKE_DB_POOL_MAX_SIZE": "0"},
            "RUNBRAKE_DB_POOL_MAX_SIZE must be at least 1",
        ),
        (
            {"DATABASE_URL": POSTGRES, "RUNBRAKE_DB_POOL_MIN_SIZE": "-1"},
            "RUNBRAKE_DB_POOL_MIN_SIZE must be at least 0",
        ),
        (
            {
                "DATABASE_URL": POSTGRES,
                "RUNBRAKE_DB_POOL_MIN_SIZE": "8",
                "RUNBRAKE_DB_POOL_MAX_SIZE": "4",
            },
            "RUNBRAKE_DB_POOL_MAX_SIZE (4) must be at least RUNBRAKE_DB_POOL_MIN_SIZE (8)",
        ),
        ({"DATABASE_URL": POSTGRES, "RUNBRAKE_DB_POOL": "sometimes"}, "RUNBRAKE_DB_POOL must be"),
        (
            {
                "DATABASE_URL": POSTGRES,
                "RUNBRAKE_DB_POOL_MAX_SIZE": "6",
                "RUNBRAKE_DB_THREADS": "4",
            },
            "RUNBRAKE_DB_THREADS (4) may be at most half of RUNBRAKE_DB_POOL_MAX_SIZE (6)",
        ),
        (
            {"REDIS_URL": "redis://127.0.0.1:6379/0", "RUNBRAKE_REDIS_PREFIX": "two words"},
            "RUNBRAKE_REDIS_PREFIX must be 1-40 letters",
        ),
        (
            {"DATABASE_URL": "sqlite:///x.db", "RUNBRAKE_DB_THREADS": "2"},
            "must be 0 or 1 on SQLite",
        ),
    ],
)
def test_bad_values_stop_start_up_with_a_clear_error(env, message):
    result = manage("check", **{**PRODUCTION, **env})
    assert result.returncode != 0
    assert message in result.stderr


def database_settings(**env: str) -> dict[str, object]:
    result = manage(
        "shell",
        "-c",
        "import json; from django.conf import settings; "
        "d = settings.DATABASES['default']; "
        "print(json.dumps({'pool': d.get('OPTIONS', {}).get('pool'), "
        "'age': d['CONN_MAX_AGE'], 'threads': settings.RUNBRAKE_DB_THREADS}))",
        **{**PRODUCTION, **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_it_pools_postgresql_connections_by_default_and_never_keeps_them_past_a_request():
    assert database_settings(DATABASE_URL=POSTGRES) == {
        "pool": {"min_size": 2, "max_size": 20},
        "age": 0,
        "threads": 4,
    }
    assert database_settings(
        DATABASE_URL=POSTGRES,
        RUNBRAKE_DB_POOL_MIN_SIZE="0",
        RUNBRAKE_DB_POOL_MAX_SIZE="50",
    ) == {"pool": {"min_size": 0, "max_size": 50}, "age": 0, "threads": 4}
    unpooled = database_settings(DATABASE_URL=POSTGRES, RUNBRAKE_DB_POOL="false")
    assert unpooled["pool"] is None
    # Without the pool each call would connect anew: the watcher stays on the shared thread.
    assert unpooled["threads"] == 0


def test_the_watchers_database_threads_take_at_most_half_the_pool():
    small = database_settings(DATABASE_URL=POSTGRES, RUNBRAKE_DB_POOL_MAX_SIZE="4")
    assert small["threads"] == 2
    tiny = database_settings(
        DATABASE_URL=POSTGRES, RUNBRAKE_DB_POOL_MIN_SIZE="1", RUNBRAKE_DB_POOL_MAX_SIZE="1"
    )
    assert tiny["threads"] == 0


def test_it_does_not_pool_or_keep_sqlite_connections(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    # One writer: the watcher's work stays on asgiref's shared thread.
    assert database_settings(DATABASE_URL=url) == {"pool": None, "age": 0, "threads": 0}


def test_keys_are_ciphertext_at_rest_and_masked(fay_account):
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM runs_provideraccount WHERE id = %s", [fay_account.pk])
        stored = cursor.fetchone()[0]
    assert "sim-acme-fay-key" not in stored
    assert fay_account.masked_key == "••••-key"


def test_rotated_keys_still_decrypt_old_rows(settings):
    from runs.security import crypto

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.RUNBRAKE_ENCRYPTION_KEYS = [old]
    crypto._fernet.cache_clear()
    token = crypto.encrypt("sim-secret")
    settings.RUNBRAKE_ENCRYPTION_KEYS = [new, old]
    crypto._fernet.cache_clear()
    try:
        assert crypto.decrypt(token) == "sim-secret"
        assert crypto.decrypt(crypto.rotate(token)) == "sim-secret"
    finally:
        crypto._fernet.cache_clear()


def test_a_dev_env_file_fills_in_what_the_environment_lacks_and_never_overrides_it(tmp_path):
    """`make` writes .env with DEBUG=true, so README commands work in a new terminal."""
    env_file = tmp_path / "dev.env"
    env_file.write_text(
        "# written by make\nDEBUG=true\n\nexport RUNBRAKE_STOP_GRACE_SECONDS='12'\n"
    )
    assert manage("check", RUNBRAKE_ENV_FILE=str(env_file)).returncode == 0
    production = manage("check", RUNBRAKE_ENV_FILE=str(env_file), DEBUG="false")
    assert production.returncode != 0
    assert "SECRET_KEY must be set" in production.stderr
    assert manage("check", RUNBRAKE_ENV_FILE="").returncode != 0  # no file: DEBUG is off


def test_a_malformed_env_file_stops_start_up_naming_the_line(tmp_path):
    env_file = tmp_path / "bad.env"
    env_file.write_text("DEBUG=true\nthis is not a setting\n")
    result = manage("check", RUNBRAKE_ENV_FILE=str(env_file))
    assert result.returncode != 0
    assert "line 2: expected NAME=value" in result.stderr


def test_a_command_before_the_first_migrate_says_to_migrate_not_a_traceback(tmp_path):
    empty = tmp_path / "fresh.sqlite3"
    result = manage("issue_token", "bob", DEBUG="true", DATABASE_URL=f"sqlite:///{empty}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "manage.py migrate" in result.stderr
