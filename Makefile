# Runbrake — `make run` starts the whole product; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PORT ?= 8000
export PORT
# Development defaults; production sets DEBUG=false plus SECRET_KEY and RUNBRAKE_ENCRYPTION_KEYS.
export DEBUG ?= true

# A Python >= 3.12: the one pyenv selects via .python-version, else the newest on PATH.
PYTHON := $(shell for p in python3.13 python3.12 python3 $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3); do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { $$p -c 'import sys; print(sys.executable)'; break; }; done)
UV := .tools/bin/uv
UV_VERSION := 0.13.9
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help run run-scaled test test-unit test-e2e lint fmt check-deploy clean setup browser bench chaos chaos-short

help:
	@echo "make run    - set up and start Runbrake on http://127.0.0.1:$(PORT)/"
	@echo "make test   - set up and run every test (unit, integration, browser)"
	@echo "make lint   - the pre-commit hooks on every file: django-upgrade, ruff, ruff format, mypy"
	@echo "make run-scaled - 2 web + 2 watcher processes on PostgreSQL + Redis (see Procfile)"
	@echo "make bench  - measure performance, write docs/PERFORMANCE.md (BENCH_QUICK=1: a few min;"
	@echo "              BENCH_BEFORE=<git ref>: before and after side by side)"
	@echo "make chaos  - the chaos soak: the scaled topology under mixed faults for CHAOS_SECONDS"
	@echo "              (default 1800), then the invariants checked (CHAOS_SEED replays a schedule)"
	@echo "make chaos-short - the same soak, fixed seed, a few minutes; fails on a broken invariant"

$(UV):
	@test -n "$(PYTHON)" || { echo "Runbrake needs Python 3.12 or newer on PATH (or under pyenv)." >&2; exit 1; }
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

# A development checkout's settings, so README commands work in a new terminal (settings.py
# reads .env for what the environment does not set; production has none).
.env:
	@printf '# Development settings, written by make (not for production; see docs/DEPLOY.md).\nDEBUG=true\n' > $@

setup: $(VENV)/.synced .env

run: setup
	$(PY) manage.py migrate --no-input -v0
	$(PY) manage.py seed_demo
	@echo
	@echo "  Runbrake:  http://127.0.0.1:$(PORT)/"
	@echo "  Logins:    alice (admin) · bob (member) · carol (viewer) · mallory (Globex)"
	@echo "             admin (Django admin at /admin/) — password: $${DEMO_PASSWORD:-runbrake-demo}"
	@echo
	exec $(PY) manage.py serve --port $(PORT)

# The scaled topology on this machine: PostgreSQL and Redis must be running (see docs/DEPLOY.md).
SCALED_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/runbrake
SCALED_REDIS_URL ?= redis://127.0.0.1:6379/0
run-scaled: setup
	$(PY) -c "import sys, psycopg; from urllib.parse import urlsplit; u = urlsplit(sys.argv[1]); \
	c = psycopg.connect(u._replace(path='/postgres').geturl(), autocommit=True); \
	n = u.path.lstrip('/'); \
	c.execute('SELECT 1 FROM pg_database WHERE datname = %s', (n,)).fetchone() or c.execute(f'CREATE DATABASE \"{n}\"')" \
	"$(SCALED_DATABASE_URL)"
	DATABASE_URL=$(SCALED_DATABASE_URL) REDIS_URL=$(SCALED_REDIS_URL) $(PY) manage.py migrate --no-input -v0
	DATABASE_URL=$(SCALED_DATABASE_URL) REDIS_URL=$(SCALED_REDIS_URL) PORT=8001 $(PY) manage.py seed_demo
	@echo
	@echo "  Runbrake (scaled): http://127.0.0.1:8001/ and http://127.0.0.1:8002/ — same runs, same live view"
	@echo
	DATABASE_URL=$(SCALED_DATABASE_URL) REDIS_URL=$(SCALED_REDIS_URL) RUNBRAKE_EMBEDDED_WATCHER=false \
	exec $(VENV)/bin/honcho -f Procfile start

# axe-core for the browser tests' accessibility checks (npm, pinned by the lock file).
AXE := tests/browser/node_modules/axe-core/axe.min.js
$(AXE): tests/browser/package.json tests/browser/package-lock.json
	npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
	@touch $@

# The suite mostly waits on real sockets and processes, so it runs on several workers
# (pytest-xdist; tests/xdist_worker.py keeps their Redis apart). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 4
test: setup $(AXE)
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not e2e and not chaos"
	$(PY) -m pytest -m e2e tests/browser

test-unit: setup
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not e2e and not chaos"

test-e2e: setup $(AXE)
	$(PY) -m pytest -m e2e tests/browser

# The hooks in .pre-commit-config.yaml on every file: django-upgrade, ruff, ruff format, mypy.
lint: setup
	$(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .tools db.sqlite3* .test-db.sqlite3*

# Measure P1–P6 on SQLite and on PostgreSQL+Redis (≤ 15 min); writes docs/PERFORMANCE.md.
# BENCH_QUICK=1: smaller sizes, a few minutes. BENCH_BEFORE=<git ref>: the same rows on that
# commit too (a temporary git worktree), before and after side by side. BENCH_SERVERS=both: daphne
# and uvicorn compared. More knobs at the top of bench/run.py.
bench: setup
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); $(PY) bench/run.py

# The chaos soak (issue 15): its own PostgreSQL cluster and redis-server on free ports, 2 web +
# 2 watcher processes, each simulator in its own process, clients and live viewers, a seeded
# fault schedule; then the checker (bench/chaos_check.py). History and summary in CHAOS_OUT.
CHAOS_SECONDS ?= 1800
CHAOS_OUT ?= /tmp/chaos-out
chaos: setup
	CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_OUT=$(CHAOS_OUT) $(PY) bench/chaos.py

# The short version CI runs: a fixed seed, 75 s of workload (2-3 minutes on an idle machine).
chaos-short: setup
	CHAOS_SECONDS=75 CHAOS_SEED=$${CHAOS_SEED:-15} CHAOS_QUIET_SECONDS=150 \
	CHAOS_OUT=/tmp/chaos-short $(PY) bench/chaos.py
