"""Browser tests: real Chromium (Playwright) against a real `manage.py serve` subprocess.

Run them on their own (Playwright's sync API keeps an event loop running in this thread,
which does not mix with the async unit tests):

    DEBUG=true .venv/bin/python -m pytest -m e2e tests/browser

- Chromium: $RUNBRAKE_CHROMIUM, else Debian's /usr/lib/chromium/chromium, else one on PATH,
  else Playwright's own download. None found: the tests skip, except with CI=true, where
  they fail (a CI job that silently skips its browser tests proves nothing).
- The server subprocess uses the very database pytest-django set up for the test (a file for
  SQLite), so the test's data, committed by `transactional_db`, is what the browser sees.
- RUNBRAKE_E2E_SCREENSHOTS=<dir> saves screenshots of the pages the tests pass through.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import ROOT, Server, database_url

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHROMIUM_CANDIDATES = [
    "/usr/lib/chromium/chromium",  # Debian's real binary (/usr/bin/chromium is a wrapper)
    "chromium",
    "chromium-browser",
    "google-chrome-stable",
    "google-chrome",
]
# Generous for a loaded CI machine; a passing run waits only as long as the UI needs.
EXPECT_TIMEOUT_MS = 15_000


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _find_chromium(playwright: Any) -> str | None:
    """The Chromium to drive; "" means Playwright's own download."""
    override = os.environ.get("RUNBRAKE_CHROMIUM")
    if override:
        found = shutil.which(override)
        return found  # an explicit choice that is missing is not silently replaced
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    try:
        bundled = playwright.chromium.executable_path
    except Exception:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return ""
    return None


@pytest.fixture(scope="session", autouse=True)
def _allow_orm_beside_playwright_loop() -> Iterator[None]:
    """Playwright's sync API runs an event loop in this thread, so Django would refuse every
    ORM call from the test body as "async". Set only while browser tests run: a module-level
    setting would leak into the unit suite (this conftest is imported on every collection)."""
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(autouse=True)
def _fast_passwords() -> None:
    """Keep Django's real password hashers in browser tests. tests/conftest.py's autouse
    fixture of this name switches the test process to MD5 only, which the `manage.py serve`
    subprocess does not have: it could not verify the hashes and every browser login would
    fail."""


@pytest.fixture(scope="session", autouse=True)
def chromium_executable(_allow_orm_beside_playwright_loop: None, playwright: Any) -> str:
    """Skip (or, on CI, fail) before any database or server is set up."""
    path = _find_chromium(playwright)
    if path is None:
        override = os.environ.get("RUNBRAKE_CHROMIUM")
        message = (
            f"No Chromium at RUNBRAKE_CHROMIUM={override}."
            if override
            else f"No Chromium found (looked for {', '.join(CHROMIUM_CANDIDATES)} and "
            "Playwright's own download). Install Debian's `chromium` package or set "
            "RUNBRAKE_CHROMIUM=/path/to/chromium."
        )
        if _truthy(os.environ.get("CI")):
            pytest.fail(f"CI=true and the browser tests cannot run: {message}", pytrace=False)
        pytest.skip(message)
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    return path


@pytest.fixture(scope="session")
def browser_type_launch_args(
    browser_type_launch_args: dict[str, Any], chromium_executable: str
) -> dict[str, Any]:
    options = dict(browser_type_launch_args)
    headless = options.get("headless", True)
    if chromium_executable:
        options["executable_path"] = chromium_executable
    options["args"] = [*(["--headless"] if headless else []), *CHROMIUM_ARGS]
    return options


@pytest.fixture(scope="session")
def base_url() -> None:
    """No base URL: each test's server has its own port. (Also keeps pytest-playwright's
    fallback fixture, which pytest 9 warns about, out of the run.)"""
    return None


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings: None) -> None:
    """Give the browser suite its own test database (`.test-db.sqlite3_e2e`, `test_x_e2e`),
    so it can run while the unit suite runs without either wiping the other's database."""
    from django.conf import settings

    for db in settings.DATABASES.values():
        test = db.setdefault("TEST", {})
        name = test.get("NAME")
        if not name:
            if db["ENGINE"] == "django.db.backends.sqlite3":
                continue  # in-memory: a subprocess could not share it anyway
            name = f"test_{db['NAME']}"
        if name != ":memory:" and not str(name).endswith("_e2e"):
            test["NAME"] = f"{name}_e2e"


@pytest.fixture
def server(transactional_db: None, request: pytest.FixtureRequest) -> Iterator[Server]:
    """Runbrake with its embedded watcher, on the test's database. Function-scoped and
    depending on `transactional_db`, so it is closed before the database is flushed."""
    from django.db import connection

    live = Server(
        watcher=True,
        env={
            "DATABASE_URL": database_url(connection.vendor, connection.settings_dict),
            # The test process needs it beside Playwright's loop; the server must not have it.
            "DJANGO_ALLOW_ASYNC_UNSAFE": "",
            "RUNBRAKE_EMBEDDED_WATCHER": "true",
        },
    )
    try:
        yield live
    finally:
        output = live.output()
        live.close()
    # Shown with a failure's report (and with -rP).
    request.node.add_report_section("teardown", "server log", output)
    # A page can look right while the server swallowed an error (a push that failed to
    # render, a 500 behind an htmx swap): any of those fails the test too.
    problems = [
        line
        for line in output.splitlines()
        if "Traceback (most recent call last)" in line or " ERROR " in line
    ]
    if problems:
        pytest.fail("The server logged errors:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def fay(server: Server, acme: Any) -> Any:
    """Acme's Fay account, pointing at the server's own simulator."""
    from runs.models import ProviderAccount

    return ProviderAccount.objects.create(
        team=acme,
        kind="fay",
        name="Fay",
        base_url=f"{server.url}/sim/fay/api/v1",
        api_key="sim-acme-fay-key",
        options={"poll_interval": 0.2},
    )


def serves_static(server: Server) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/static/css/app.css", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


@pytest.fixture
def log_in(
    server: Server, new_context: Callable[..., BrowserContext], password: str
) -> Callable[[Any], Page]:
    """A page of a fresh browser context (its own cookies: one person) logged in as `user`."""

    def _log_in(user: Any) -> Page:
        # Without its CSS and JS (htmx, the websocket) no page here can work: say so plainly.
        assert serves_static(server), (
            "manage.py serve answers 404 for /static/css/app.css: pages get no CSS, no htmx, "
            "no websocket (`make run` serves the same way)."
        )
        page = new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{server.url}/accounts/login/")
        page.get_by_label("Username").fill(user.get_username())
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
        return page

    return _log_in


@pytest.fixture
def open_team_list(server: Server, log_in: Callable[[Any], Page]) -> Callable[[Any, Any], Page]:
    """Log `user` in and open `team`'s run list with its websocket open (subscribed)."""

    def _open(user: Any, team: Any) -> Page:
        page = log_in(user)
        page.goto(f"{server.url}/teams/{team.pk}/runs/")
        expect(page.locator("body")).to_have_attribute("data-ws", "open")
        # A reload would drop this marker: the test checks it to prove updates came live.
        page.evaluate("window.__noReload = true")
        return page

    return _open


@pytest.fixture
def screenshot() -> Callable[[Page, str], None]:
    target = os.environ.get("RUNBRAKE_E2E_SCREENSHOTS")

    def _shot(page: Page, name: str) -> None:
        if target:
            Path(target).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)

    return _shot


AXE = ROOT / "tests" / "browser" / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture
def axe() -> Callable[[Page, str], None]:
    """Check the page with axe-core (npm, installed by `make test`): no serious or critical
    accessibility violation, in the page's current state, width and colour scheme."""
    if not AXE.exists():
        pytest.fail(
            f"{AXE} is missing: run `make test` (or `npm ci --prefix tests/browser`).",
            pytrace=False,
        )

    def _check(page: Page, where: str) -> None:
        if not page.evaluate("typeof window.axe !== 'undefined'"):
            # Evaluated, not added as a <script>: the page's Content-Security-Policy forbids
            # inline scripts (as it should), and DevTools evaluation is not a page script.
            page.evaluate(AXE.read_text())
        found = page.evaluate(
            """async () => {
                const result = await axe.run(document, {resultTypes: ["violations"]});
                return result.violations
                    .filter(v => v.impact === "serious" || v.impact === "critical")
                    .map(v => `${v.impact} ${v.id}: ${v.help} — ` +
                        v.nodes.slice(0, 3).map(n => n.target.join(" ")).join(", "));
            }"""
        )
        assert not found, f"axe-core on {where}:\n" + "\n".join(found)

    return _check
