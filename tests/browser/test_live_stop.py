"""Two people, one team list, one long run: launched by one, cancelled by the other, and both
screens follow along live, in real Chromium against a real server and Fay simulator."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LONG_RUN = "Survey of AI book editors sim:pending=0 sim:duration=120"


def launch_via_form(page: Page, account: Any, prompt: str) -> int:
    """Launch a run with the page's form; return the id of the row it adds to the list."""
    before = set(
        page.locator("#run-rows > tr[id^='run-row-']").evaluate_all("rows => rows.map(r => r.id)")
    )
    form = page.locator("#launch-form")
    form.locator("select[name=provider_account]").select_option(value=str(account.pk))
    form.locator("textarea[name=prompt]").fill(prompt)
    form.get_by_role("button", name="Launch run").click()
    rows = page.locator("#run-rows > tr[id^='run-row-']")
    expect(rows).to_have_count(len(before) + 1)
    # The answer swaps in a fresh (empty) form and slips the new row into the table
    # out-of-band; nothing of the row may land beside the form.
    expect(form.locator("textarea[name=prompt]")).to_have_value("")
    expect(
        page.locator("section.card:has(#launch-form) > :not(h2, #launch-form)"),
        "the launch answer left run-row content next to the form instead of in #run-rows",
    ).to_have_count(0)
    (new_id,) = set(rows.evaluate_all("rows => rows.map(r => r.id)")) - before
    return int(new_id.removeprefix("run-row-"))


def expect_status(page: Page, run_id: int, status: str, label: str) -> None:
    row = page.locator(f"#run-row-{run_id}")
    expect(row).to_have_attribute("data-status", status)
    expect(row.locator(".badge")).to_have_text(label)


def expect_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__noReload") is True, "the page was reloaded"


def test_launch_and_cancel_show_live_for_both_users(
    server: Server,
    acme: Any,
    alice: Any,
    bob: Any,
    fay: Any,
    open_team_list: Callable[[Any, Any], Page],
    screenshot: Callable[[Page, str], None],
) -> None:
    from runs.models import Run

    alice_page = open_team_list(alice, acme)
    bob_page = open_team_list(bob, acme)

    run_id = launch_via_form(alice_page, fay, LONG_RUN)
    run = Run.objects.get(pk=run_id)
    assert (run.team_id, run.created_by_id, run.prompt) == (acme.pk, alice.pk, LONG_RUN)

    # Both see it running: alice from her form's answer and the push, bob from the push only.
    for page in (alice_page, bob_page):
        expect_status(page, run_id, "running", "Running")
        expect(page.get_by_role("button", name=f"Cancel run #{run_id}")).to_be_visible()

    console_errors: list[str] = []
    bob_page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    bob_page.get_by_role("button", name=f"Cancel run #{run_id}").click()

    for page in (bob_page, alice_page):
        expect_status(page, run_id, "stopped", "Stopped")
        expect(page.get_by_role("button", name=f"Cancel run #{run_id}")).to_have_count(0)
        expect_not_reloaded(page)
    # The Cancel answer (its toast comes with it) was applied too, not dropped because the
    # push had already replaced the row holding the form.
    expect(bob_page.locator("#toasts .toast")).to_be_visible()
    assert not [e for e in console_errors if "oobErrorNoTarget" in e], console_errors

    run.refresh_from_db()
    assert run.status == "stopped"
    assert run.stop_requested_by_id == bob.pk
    assert run.external_id, "a running Fay run has the provider's id"
    assert len(server.stop_calls(run.external_id)) == 1

    # The list keeps working after a stop: a second run shows up running on both pages,
    # above the stopped one.
    second_id = launch_via_form(alice_page, fay, LONG_RUN)
    for page in (alice_page, bob_page):
        expect_status(page, second_id, "running", "Running")
        expect_status(page, run_id, "stopped", "Stopped")
        expect(page.locator("#run-rows > tr").first).to_have_id(f"run-row-{second_id}")
        expect_not_reloaded(page)
    screenshot(alice_page, "team-list-running-and-stopped")

    # The detail page of the stopped run says who stopped it and that the provider confirmed.
    bob_page.get_by_role("link", name=f"#{run_id}", exact=True).click()
    expect(bob_page).to_have_url(re.compile(rf"/runs/{run_id}/$"))
    expect(bob_page.locator("body")).to_have_attribute("data-ws", "open")
    status = bob_page.locator(f"#run-status-{run_id}")
    expect(status).to_have_attribute("data-status", "stopped")
    expect(status.locator(".badge")).to_have_text("Stopped")
    expect(status.locator(".stop-proof")).to_contain_text("Stopped")
    expect(status).to_contain_text("by bob")
    expect(bob_page.get_by_role("button", name=re.compile(r"^Cancel run"))).to_have_count(0)
    screenshot(bob_page, "run-detail-stopped")

    assert len(server.stop_calls(run.external_id)) == 1


def test_viewer_sees_no_cancel_and_detail_shows_badge(
    server: Server,
    acme: Any,
    bob: Any,
    carol: Any,
    fay: Any,
    open_team_list: Callable[[Any, Any], Page],
    screenshot: Callable[[Page, str], None],
) -> None:
    bob_page = open_team_list(bob, acme)
    carol_page = open_team_list(carol, acme)
    expect(carol_page.locator("#launch-form")).to_have_count(0)

    run_id = launch_via_form(bob_page, fay, LONG_RUN)

    # The row (pushed to carol live) is the shared fragment: its Cancel button is in the
    # markup but hidden for a viewer, so she has no Cancel button to see or reach.
    expect_status(carol_page, run_id, "running", "Running")
    expect(carol_page.locator(f"#run-row-{run_id} button.stop-button")).to_be_hidden()
    expect(carol_page.get_by_role("button", name=re.compile(r"^Cancel run"))).to_have_count(0)
    expect(bob_page.get_by_role("button", name=f"Cancel run #{run_id}")).to_be_visible()
    expect_not_reloaded(carol_page)

    carol_page.get_by_role("link", name=f"#{run_id}", exact=True).click()
    expect(carol_page).to_have_url(re.compile(rf"/runs/{run_id}/$"))
    expect(carol_page.locator("body")).to_have_attribute("data-ws", "open")
    badge = carol_page.locator(f"#run-status-{run_id} .badge")
    expect(badge).to_be_visible()
    expect(badge).to_have_text("Running")
    expect(badge).to_have_class(re.compile(r"\bbadge-running\b"))
    expect(carol_page.get_by_role("button", name=re.compile(r"^Cancel run"))).to_have_count(0)
    expect(carol_page.get_by_text("stops this run")).to_be_hidden()
    screenshot(carol_page, "run-detail-viewer")
