"""Runbrake settings: one file, driven by environment variables.

Defaults make `make run` work on a fresh clone (DEBUG, SQLite, in-memory channel layer,
simulators mounted). Production sets DEBUG=false and must then provide SECRET_KEY and
RUNBRAKE_ENCRYPTION_KEYS; anything malformed stops start-up with ImproperlyConfigured.

A `.env` file beside manage.py (`NAME=value` lines; `make` writes one with `DEBUG=true` for
development) supplies variables the environment does not set, so a development checkout's
commands work in a new terminal. The environment always wins; `RUNBRAKE_ENV_FILE` names
another file, or none when empty.
"""

import base64
import hashlib
import os
import re
from pathlib import Path

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

# Django's generic classes (ModelAdmin[Run], ModelForm[Team], …) subscriptable at run time, as
# the type annotations write them.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


def _load_env_file(path: Path) -> None:
    """NAME=value lines (blank lines and # comments allowed) for what the environment lacks."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, value = text.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not sep or not name.replace("_", "").isalnum():
            raise ImproperlyConfigured(f"{path}, line {number}: expected NAME=value")
        os.environ.setdefault(name, value.strip().strip("'\""))


_env_file = os.environ.get("RUNBRAKE_ENV_FILE", str(BASE_DIR / ".env"))
if _env_file:
    _load_env_file(Path(_env_file))

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = "insecure-dev-only-runbrake-key-never-use-in-production-0123456789"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
# Addresses of the reverse proxies whose X-Forwarded-* headers uvicorn believes (none: the
# client address is the connection's own).
RUNBRAKE_TRUSTED_PROXIES = env_list("RUNBRAKE_TRUSTED_PROXIES", [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "runs",
    "simulators",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "runs.web.middleware.FriendlyNotFoundMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "runs.web.middleware.HtmxSessionEndedMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "runs.web.middleware.PrivacyHeadersMiddleware",
]

ROOT_URLCONF = "webapp.urls"
ASGI_APPLICATION = "webapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# The embedded default is SQLite in WAL mode with IMMEDIATE transactions and a busy timeout:
# measured here, that combination is what keeps the web process and the watcher from
# tripping over "database is locked" when both write at once.
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
try:
    _db = dj_database_url.parse(DATABASE_URL, conn_max_age=0)
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # A file, not memory: browser tests run the ASGI server in a subprocess that must see it.
    _db["TEST"] = {"NAME": env_str("TEST_DATABASE_NAME", str(BASE_DIR / ".test-db.sqlite3"))}
    # CONN_MAX_AGE stays 0, as Django advises under ASGI: every request runs its database work
    # on a thread of its own, so a connection kept open would never be used again, only closed
    # whenever that thread's storage is collected. The long-lived threads (the watcher, live
    # pushes) keep theirs anyway, since nothing closes it between calls. Opening SQLite is a
    # file open and two PRAGMAs: 0.4 ms measured here.
else:
    _db["TEST"] = {"NAME": env_str("TEST_DATABASE_NAME", f"test_{_db.get('NAME') or 'runbrake'}")}
if _db["ENGINE"] == "django.db.backends.postgresql" and env_bool("RUNBRAKE_DB_POOL", True):
    # Django's pool (psycopg_pool): a request takes an open connection and gives it back when
    # it ends, instead of connecting (~5 ms here) and disconnecting every time. Each request
    # in flight holds one (a stop until its provider call is answered), and so does each
    # long-lived thread; a request that finds them all taken waits up to 30 s.
    # It requires CONN_MAX_AGE=0 (parsed so above): closing a connection returns it.
    _pool_min = env_int("RUNBRAKE_DB_POOL_MIN_SIZE", 2, minimum=0)
    _pool_max = env_int("RUNBRAKE_DB_POOL_MAX_SIZE", 20, minimum=1)
    if _pool_max < _pool_min:
        raise ImproperlyConfigured(
            f"RUNBRAKE_DB_POOL_MAX_SIZE ({_pool_max}) must be at least "
            f"RUNBRAKE_DB_POOL_MIN_SIZE ({_pool_min})."
        )
    _db.setdefault("OPTIONS", {})["pool"] = {"min_size": _pool_min, "max_size": _pool_max}
# The watcher's per-run database work (transitions, output saves, pushes' reads) runs on this
# many threads of its own, runs side by side, each run's calls in order (runs/dbthreads.py).
# 0 = asgiref's one shared thread. SQLite has one writer: 0 or 1. With the pool, each thread
# holds a connection only during a call, and they may take at most half the pool, so
# requests and handshakes in the same process always find one.
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db_threads = env_int("RUNBRAKE_DB_THREADS", 0, minimum=0)
    if _db_threads > 1:
        raise ImproperlyConfigured("RUNBRAKE_DB_THREADS must be 0 or 1 on SQLite (one writer).")
elif "pool" in _db.get("OPTIONS", {}):
    _db_threads_max = _pool_max // 2
    _db_threads = env_int("RUNBRAKE_DB_THREADS", min(4, _db_threads_max), minimum=0)
    if _db_threads > _db_threads_max:
        raise ImproperlyConfigured(
            f"RUNBRAKE_DB_THREADS ({_db_threads}) may be at most half of "
            f"RUNBRAKE_DB_POOL_MAX_SIZE ({_pool_max}), so requests always find a connection."
        )
else:
    # Without the pool every call would open and close a connection (~5 ms here).
    _db_threads = env_int("RUNBRAKE_DB_THREADS", 0, minimum=0)
RUNBRAKE_DB_THREADS = _db_threads
DATABASES = {"default": _db}

# --- Channels -------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
# Names in Redis (pub/sub channels, cache keys) start with this: two deployments, or parallel
# test workers, can share one Redis. Pub/sub ignores Redis's numbered databases, so a
# different database in REDIS_URL does not keep them apart; this does.
RUNBRAKE_REDIS_PREFIX = env_str("RUNBRAKE_REDIS_PREFIX", "asgi")
if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", RUNBRAKE_REDIS_PREFIX):
    raise ImproperlyConfigured(
        f"RUNBRAKE_REDIS_PREFIX must be 1-40 letters, digits, '_', '.' or '-', "
        f"got {RUNBRAKE_REDIS_PREFIX!r}"
    )
# Messages waiting per websocket consumer; past it the backlog collapses into one resync.
RUNBRAKE_CHANNEL_CAPACITY = env_int("RUNBRAKE_CHANNEL_CAPACITY", 100, minimum=1)
if REDIS_URL:
    if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(f"REDIS_URL must be a redis:// URL, got {REDIS_URL!r}")
    CHANNEL_LAYERS = {
        "default": {
            # Pub/sub: a group_send costs ~0.5 ms flat in the number of sockets (stack notes).
            # It may drop messages across reconnects; clients resync from the database.
            # Ours (runs/realtime/layers.py): bounded backlogs that overflow into a resync, and a
            # resync of every viewer after a lost Redis connection comes back.
            "BACKEND": "runs.realtime.layers.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "capacity": RUNBRAKE_CHANNEL_CAPACITY,
                "prefix": RUNBRAKE_REDIS_PREFIX,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "runs.realtime.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": RUNBRAKE_CHANNEL_CAPACITY},
        }
    }

# --- Cache (rate limits) ------------------------------------------------------------------
# Redis when scaled out, so every web process counts against the same limits.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": RUNBRAKE_REDIS_PREFIX,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}


def env_rate(name: str, default: str) -> tuple[int, int]:
    raw = os.environ.get(name, default)
    try:
        count, seconds = (int(part) for part in raw.split("/"))
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must look like 30/60 (count/seconds), got {raw!r}"
        ) from None
    if count < 1 or seconds < 1:
        raise ImproperlyConfigured(f"{name} needs a positive count and window, got {raw!r}")
    return count, seconds


# Per user (launch, stop) or per client address and username (login): count/seconds.
RUNBRAKE_RATE_LIMITS = {
    "launch": env_rate("RUNBRAKE_RATE_LAUNCH", "30/60"),
    "stop": env_rate("RUNBRAKE_RATE_STOP", "120/60"),
    # Failed logins only: per client address and username (slows one guesser), and per
    # username from anywhere, higher (slows many addresses without locking the owner out).
    "login": env_rate("RUNBRAKE_RATE_LOGIN", "10/300"),
    "login_name": env_rate("RUNBRAKE_RATE_LOGIN_NAME", "50/900"),
}

# --- Auth -----------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "runs:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- Security -------------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_FAILURE_VIEW = "runs.web.views.csrf_failure"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    # Load balancers probe over plain HTTP inside the network.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
DATA_UPLOAD_MAX_MEMORY_SIZE = 1_048_576
# Scripts, styles, images and connections only from the site itself: model output rendered as
# Markdown can carry `![](http://elsewhere/?secret)`, and no viewer's browser may fetch it.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "font-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.SELF],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}

# Provider API keys are encrypted at rest with Fernet. The first key encrypts; every key
# decrypts, so a rotation prepends the new key and keeps the old ones until re-encrypted.
_encryption_keys = env_list("RUNBRAKE_ENCRYPTION_KEYS", [])
if not _encryption_keys:
    if not DEBUG:
        raise ImproperlyConfigured(
            "RUNBRAKE_ENCRYPTION_KEYS must be set when DEBUG is off "
            "(comma-separated Fernet keys; generate one with `manage.py generate_encryption_key`)."
        )
    _encryption_keys = [
        base64.urlsafe_b64encode(
            hashlib.sha256(("runbrake-dev:" + SECRET_KEY).encode()).digest()
        ).decode()
    ]
RUNBRAKE_ENCRYPTION_KEYS = _encryption_keys

# --- Runbrake -------------------------------------------------------------------------------
# The provider simulators are mounted under /sim/ and loopback provider URLs are accepted;
# both only make sense on a developer's machine, so they follow DEBUG unless set.
RUNBRAKE_SIMULATORS = env_bool("RUNBRAKE_SIMULATORS", DEBUG)
RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS = env_bool(
    "RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS", RUNBRAKE_SIMULATORS
)
# What a simulated provider keeps across restarts, as the real service would (the webhooks
# registered in Fay's dashboard).
RUNBRAKE_SIM_STATE_DIR = Path(env_str("RUNBRAKE_SIM_STATE_DIR") or BASE_DIR / ".sim-state")
# Who may read the simulators' request log besides staff (tests and the bench set it).
RUNBRAKE_SIM_INSPECT_TOKEN = env_str("RUNBRAKE_SIM_INSPECT_TOKEN")
RUNBRAKE_EMBEDDED_WATCHER = env_bool("RUNBRAKE_EMBEDDED_WATCHER", True)
RUNBRAKE_STOP_GRACE_SECONDS = env_float("RUNBRAKE_STOP_GRACE_SECONDS", 15.0, minimum=0.1)
RUNBRAKE_STOP_CALL_TIMEOUT = env_float("RUNBRAKE_STOP_CALL_TIMEOUT", 5.0, minimum=0.1)
# A stop the provider accepted without proof is sent again this long after, if unconfirmed.
RUNBRAKE_STOP_RECHECK_SECONDS = env_float("RUNBRAKE_STOP_RECHECK_SECONDS", 5.0, minimum=0.1)
# Streamed output is saved and pushed at most this often per run (≤ 10 pushes a second).
# Output reaches pages as it arrives, batched every PUSH seconds; the database keeps it every
# FLUSH seconds (and on every status change), so a restart loses at most that much.
RUNBRAKE_OUTPUT_PUSH_SECONDS = env_float("RUNBRAKE_OUTPUT_PUSH_SECONDS", 0.05, minimum=0.01)
RUNBRAKE_OUTPUT_FLUSH_SECONDS = env_float("RUNBRAKE_OUTPUT_FLUSH_SECONDS", 1.0, minimum=0.01)
RUNBRAKE_PROVIDER_TIMEOUT = env_float("RUNBRAKE_PROVIDER_TIMEOUT", 30.0, minimum=0.1)
RUNBRAKE_WATCHER_TICK = env_float("RUNBRAKE_WATCHER_TICK", 1.0, minimum=0.05)
# A watcher renews its runs' leases every tick; a run whose lease lapsed (its watcher died)
# is taken by another watcher on that one's next tick.
RUNBRAKE_WATCHER_LEASE_SECONDS = env_float("RUNBRAKE_WATCHER_LEASE_SECONDS", 5.0, minimum=0.5)
RUNBRAKE_WATCHER_CAPACITY = env_int("RUNBRAKE_WATCHER_CAPACITY", 2000, minimum=1)
# On SIGTERM, how long a watcher lets streams that its provider ends on disconnect
# (IntelligenceBox) finish before it lets go of them anyway.
RUNBRAKE_WATCHER_DRAIN_SECONDS = env_float("RUNBRAKE_WATCHER_DRAIN_SECONDS", 30.0, minimum=0.0)
# "No progress" guardrail for new runs: stop a running run whose output and provider status
# have not changed for this long (0 = off). The API and the launch form can set it per run.
RUNBRAKE_NO_PROGRESS_SECONDS = env_int("RUNBRAKE_NO_PROGRESS_SECONDS", 900, minimum=0)
RUNBRAKE_DEFAULT_TIMEOUT_SECONDS = env_int("RUNBRAKE_DEFAULT_TIMEOUT_SECONDS", 1800, minimum=10)
RUNBRAKE_RUNS_PER_PAGE = env_int("RUNBRAKE_RUNS_PER_PAGE", 25, minimum=1)

# Every handler scrubs secrets (provider keys this process has seen, bearer tokens, key-like
# values) from messages and tracebacks. Django's own loggers are pointed at the same handler:
# its default handlers would print a request's traceback unscrubbed.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"scrub_secrets": {"()": "runs.security.logscrub.ScrubSecrets"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["scrub_secrets"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.server": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "httpx": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}
