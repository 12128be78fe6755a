"""Shared, filtered run lists in real Chromium against a real server and Fay simulator.

bob and alice watch the same filtered list (`?status=running`); alice stops two of three runs
with *Stop selected*: the preview names exactly those two, the report says *Stopped* for each,
both lists drop the two rows live (they left the filter) and keep the third, and the provider
got exactly one stop call per stopped run. carol (viewer) sees no Cancel button and no
selection boxes, and a direct POST of hers to the stop URL is refused with a 403."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LONG_RUN = "Quarterly market scan sim:pending=0 sim:duration=120"
ROWS = "#run-rows > tr[id^='run-row-']"
VIEWER_REFUSAL = "Viewers can watch runs but not stop them."
STOPPED = "Stopped"
# What the report says when the server's watcher claimed the stop call between the view's
# request_stop() and its own claim_stop_attempt(): the run is stopped a moment later by the
# watcher's call, but the static report already said this. A known race (see the end).
RACED = "Stopping (awaiting confirmation)"


class PageLog:
    """Console messages and uncaught errors of the test's pages, reported with the test."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.page_errors: list[str] = []

    def attach(self, page: Page, who: str) -> None:
        page.on("console", lambda m: self.lines.append(f"[{who}] console.{m.type}: {m.text}"))

        def on_error(error: Any) -> None:
            text = f"[{who}] pageerror: {error}"
            self.lines.append(text)
            self.page_errors.append(text)

        page.on("pageerror", on_error)


@pytest.fixture
def page_log(request: pytest.FixtureRequest) -> Iterator[PageLog]:
    log = PageLog()
    yield log
    # Shown with a failure's report (and with -rP).
    request.node.add_report_section("teardown", "browser console", "\n".join(log.lines))


@pytest.fixture
def open_list(
    server: Server, log_in: Callable[[Any], Page], page_log: PageLog
) -> Callable[[Any, Any, str], Page]:
    """Log `user` in and open `team`'s run list at `query`, its websocket open."""

    def _open(user: Any, team: Any, query: str = "") -> Page:
        page = log_in(user)
        page_log.attach(page, user.get_username())
        goto_list(page, server, team, query)
        return page

    return _open


def goto_list(page: Page, server: Server, team: Any, query: str = "") -> None:
    page.goto(f"{server.url}/teams/{team.pk}/runs/{query}")
    expect(page.locator("body")).to_have_attribute("data-ws", "open")
    # A reload would drop this marker: the test checks it to prove updates came live.
    page.evaluate("window.__noReload = true")


def expect_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__noReload") is True, "the page was reloaded"


def row_ids(page: Page) -> set[int]:
    ids = page.locator(ROWS).evaluate_all("rows => rows.map(r => r.id)")
    return {int(i.removeprefix("run-row-")) for i in ids}


def expect_running(page: Page, run_id: int) -> None:
    row = page.locator(f"#run-row-{run_id}")
    expect(row).to_have_attribute("data-status", "running")
    expect(row.locator(".badge")).to_have_text("Running")


def post_from_page(page: Page, url: str, fields: dict[str, str]) -> Any:
    """POST from the page itself (its cookies, its origin) as htmx would: with the CSRF
    token the page carries (<body hx-headers>) and HX-Request."""
    return page.evaluate(
        """async ([url, fields]) => {
            const headers = JSON.parse(document.body.getAttribute("hx-headers"));
            const r = await fetch(url, {
                method: "POST",
                headers: {...headers, "HX-Request": "true"},
                body: new URLSearchParams(fields),
                redirect: "manual",
            });
            return {status: r.status, text: await r.text()};
        }""",
        [url, fields],
    )


def csrf_cookie(page: Page) -> str:
    (token,) = [c["value"] for c in page.context.cookies() if c["name"] == "csrftoken"]
    return token


def launch_runs(account: Any, user: Any, count: int) -> list[Any]:
    """Launch PENDING runs for the server's watcher to start. In a thread of their own: the
    launch pushes after commit (async_to_sync), which fails in this thread beside Playwright's
    loop. (That push reaches the server's browsers only through Redis; the pages here are
    opened after the launch and read the runs from the database.)"""
    from django.db import connections

    from runs.models import Run

    def launch() -> list[Any]:
        try:
            return [
                Run.objects.launch(
                    account=account, user=user, prompt=LONG_RUN, options={}, timeout_seconds=600
                )
                for _ in range(count)
            ]
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(launch).result()


def test_stop_selected_on_a_filtered_list_updates_both_lists_and_viewer_is_refused(
    server: Server,
    acme: Any,
    alice: Any,
    bob: Any,
    carol: Any,
    fay: Any,
    open_list: Callable[[Any, Any, str], Page],
    page_log: PageLog,
    screenshot: Callable[[Page, str], None],
) -> None:
    from runs.models import Run

    runs = launch_runs(fay, bob, 3)
    first, second, kept = (r.pk for r in runs)

    # Wait on the unfiltered list until the server's watcher has all three running. (A
    # `?status=running` page opened earlier would not show them: a run that enters a status
    # filter after the page loaded is not added live, see the report that came with this.)
    alice_page = open_list(alice, acme, "")
    for run_id in (first, second, kept):
        expect_running(alice_page, run_id)

    goto_list(alice_page, server, acme, "?status=running")
    bob_page = open_list(bob, acme, "?status=running")
    for page in (alice_page, bob_page):
        expect(page.locator(ROWS)).to_have_count(3)
        for run_id in (first, second, kept):
            expect_running(page, run_id)
    screenshot(alice_page, "filtered-list-before-bulk-stop")

    # alice ticks two runs and asks for a preview.
    alice_page.get_by_role("checkbox", name=f"Select run #{first}").check()
    alice_page.get_by_role("checkbox", name=f"Select run #{second}").check()
    alice_page.get_by_role("button", name="Stop selected…").click()

    dialog = alice_page.locator("#bulk-dialog")
    preview = dialog.get_by_role("dialog", name="Confirm stopping runs")
    expect(preview.get_by_role("heading")).to_have_text("Stop 2 runs?")
    expect(preview.locator(".bulk-list > li")).to_have_count(2)
    for run_id in (first, second):
        expect(preview.get_by_role("link", name=f"#{run_id}", exact=True)).to_be_visible()
    expect(preview.get_by_role("link", name=f"#{kept}", exact=True)).to_have_count(0)
    screenshot(alice_page, "bulk-stop-preview")
    # A preview changes nothing.
    assert set(
        Run.objects.filter(pk__in=[first, second, kept]).values_list("status", flat=True)
    ) == {"running"}
    for page in (alice_page, bob_page):
        expect(page.locator(ROWS)).to_have_count(3)

    preview.get_by_role("button", name="Stop 2", exact=True).click()

    # alice's dialog reports each run with its outcome.
    report = dialog.get_by_role("status")
    expect(report.get_by_role("heading")).to_have_text("Stop results")
    report_rows = report.locator("tbody > tr")
    outcomes: dict[int, str] = {}
    expect(report_rows).to_have_count(2)
    for run_id in (first, second):
        result = report_rows.filter(
            has=alice_page.get_by_role("link", name=f"#{run_id}", exact=True)
        )
        outcome = result.locator(".outcome")
        expect(outcome).to_have_text(re.compile(rf"^({STOPPED}|{re.escape(RACED)})$"))
        outcomes[run_id] = outcome.inner_text().strip()
    screenshot(alice_page, "bulk-stop-report")

    # Both filtered lists drop the two stopped rows live and keep the third one, running.
    for page in (alice_page, bob_page):
        for run_id in (first, second):
            expect(page.locator(f"#run-row-{run_id}")).to_have_count(0)
        expect(page.locator(ROWS)).to_have_count(1)
        expect_running(page, kept)
        expect(page.get_by_role("checkbox", name=f"Select run #{kept}")).not_to_be_checked()
        expect_not_reloaded(page)
    assert row_ids(alice_page) == row_ids(bob_page) == {kept}
    screenshot(bob_page, "filtered-list-after-bulk-stop-bob")

    # The provider was asked exactly once per stopped run, and never about the third.
    for run in runs:
        run.refresh_from_db()
        assert run.external_id, f"run #{run.pk} has the provider's id"
    by_id = {r.pk: r for r in runs}
    for run_id in (first, second):
        run = by_id[run_id]
        assert run.status == "stopped"
        assert run.stop_requested_by_id == alice.pk
        assert len(server.stop_calls(run.external_id)) == 1, f"stop calls for run #{run_id}"
    assert by_id[kept].status == "running"
    assert server.stop_calls(by_id[kept].external_id) == []

    # carol (viewer) on the unfiltered list: every run listed, nothing to stop them with.
    carol_page = open_list(carol, acme, "")
    expect(carol_page.locator(ROWS)).to_have_count(3)
    expect_running(carol_page, kept)
    for run_id in (first, second):
        expect(carol_page.locator(f"#run-row-{run_id}")).to_have_attribute("data-status", "stopped")
    expect(carol_page.locator(f"#run-row-{kept} button.stop-button")).to_be_hidden()
    expect(carol_page.locator("button.stop-button:visible")).to_have_count(0)
    expect(carol_page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(carol_page.locator(f"#run-row-{kept} input[name=ids]")).to_be_hidden()
    expect(carol_page.locator("input[name=ids]:visible")).to_have_count(0)
    expect(carol_page.get_by_role("checkbox")).to_have_count(0)
    expect(carol_page.get_by_role("button", name="Stop selected…")).to_have_count(0)
    screenshot(carol_page, "viewer-list")

    # A direct POST from carol's page, as htmx would send it (the CSRF token the page
    # carries, HX-Request), to the run's stop URL and to the bulk stop: refused by her role
    # (not by CSRF, whose refusal says something else), and the run keeps running.
    for url, fields in (
        (f"{server.url}/runs/{kept}/stop", {"reason": "carol tried"}),
        (
            f"{server.url}/teams/{acme.pk}/runs/stop",
            {"action": "confirm", "scope": "selected", "ids": str(kept)},
        ),
    ):
        answer = post_from_page(carol_page, url, fields)
        assert answer["status"] == 403, (url, answer)
        assert answer["text"] == VIEWER_REFUSAL, (url, answer)

        # And as a plain form POST (no htmx) with her csrftoken cookie: the refusal page.
        plain = carol_page.request.post(
            url,
            headers={"X-CSRFToken": csrf_cookie(carol_page)},
            form=dict(fields),
            max_redirects=0,
        )
        assert plain.status == 403, (url, plain.status, plain.text()[:300])
        assert VIEWER_REFUSAL in plain.text(), url

    run = by_id[kept]
    run.refresh_from_db()
    assert run.status == "running"
    assert run.stop_requested_at is None
    assert server.stop_calls(run.external_id) == []
    for page in (carol_page, alice_page, bob_page):
        expect_running(page, kept)
        expect_not_reloaded(page)

    assert not page_log.page_errors, "\n".join(page_log.page_errors)

    # Everything else held; only the report's wording may have lost the race.
    raced = sorted(run_id for run_id, said in outcomes.items() if said != STOPPED)
    if raced:
        pytest.xfail(
            f"BUG (race): the Stop selected report said {RACED!r} for run(s) {raced}, which "
            "the provider confirmed stopped moments later: the watcher's tick claimed the "
            "stop call between bulk_stop's request_stop() and its own claim_stop_attempt(), "
            "so astop_each() read the run while still STOPPING."
        )
