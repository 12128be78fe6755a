"""A streaming run stopped from its own page: bob launches a Dify run, watches its answer
stream in, and cancels it while alice watches the same page; both screens end on *Stopped*
with the partial answer kept, in real Chromium against a real server and Dify simulator.
Also: Esc on a running run's page stops it."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

DIFY_KEY = "sim-acme-dify-key"
# 30 s of output in ~450 deltas: long enough to watch it grow and stop it half-way.
LONG_DIFY_RUN = "Explain quantum computing sim:duration=30"
LONG_FAY_RUN = "Survey of AI book editors sim:pending=0 sim:duration=120"
# How long the output may take to show (or grow) on a loaded machine.
GROWTH_TIMEOUT_MS = 15_000


@pytest.fixture
def dify(server: Server, acme: Any) -> Any:
    """Acme's Dify account, pointing at the server's own simulator."""
    from runs.models import ProviderAccount

    return ProviderAccount.objects.create(
        team=acme,
        kind="dify",
        name="Dify",
        base_url=f"{server.url}/sim/dify/v1",
        api_key=DIFY_KEY,
    )


def launch_via_form(page: Page, account: Any, prompt: str, options_legend: str) -> int:
    """Launch a run with the team list's form; return the id of the row it adds."""
    rows = page.locator("#run-rows > tr[id^='run-row-']")
    before = set(rows.evaluate_all("rows => rows.map(r => r.id)"))
    form = page.locator("#launch-form")
    form.locator("select[name=provider_account]").select_option(value=str(account.pk))
    # The form shows the selected provider's options, and only those.
    expect(form.locator("fieldset.provider-options:visible")).to_have_count(1)
    expect(form.locator("fieldset.provider-options:visible legend")).to_have_text(options_legend)
    form.locator("textarea[name=prompt]").fill(prompt)
    form.get_by_role("button", name="Launch run").click()
    expect(rows).to_have_count(len(before) + 1)
    expect(form.locator("textarea[name=prompt]")).to_have_value("")
    (new_id,) = set(rows.evaluate_all("rows => rows.map(r => r.id)")) - before
    return int(new_id.removeprefix("run-row-"))


def open_run_page(page: Page, server: Server, run_id: int) -> None:
    page.goto(f"{server.url}/runs/{run_id}/")
    expect(page.locator("body")).to_have_attribute("data-ws", "open")
    # A reload would drop this marker: checked at the end to prove updates came live.
    page.evaluate("window.__noReload = true")


def output_length(page: Page, run_id: int) -> int:
    return int(
        page.evaluate(
            "sel => (document.querySelector(sel)?.textContent || '').length",
            f"#run-output-{run_id} .markdown",
        )
    )


def wait_for_output_longer_than(page: Page, run_id: int, length: int) -> int:
    """Wait (auto-waiting, no sleep) until the shown output is longer than `length`."""
    page.wait_for_function(
        "([sel, n]) => (document.querySelector(sel)?.textContent || '').length > n",
        arg=[f"#run-output-{run_id} .markdown", length],
        timeout=GROWTH_TIMEOUT_MS,
    )
    return output_length(page, run_id)


def dify_history_answer(server: Server, run: Any) -> str:
    """The answer the Dify simulator kept in history for the run's message."""
    refs = run.provider_refs
    query = urlencode({"conversation_id": refs["conversation_id"], "user": refs["user"]})
    request = urllib.request.Request(
        f"{server.url}/sim/dify/v1/messages?{query}",
        headers={"Authorization": f"Bearer {DIFY_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        history = json.load(r)
    (message,) = [m for m in history["data"] if m["id"] == refs["message_id"]]
    return str(message["answer"])


def test_dify_stream_cancelled_from_run_page_for_both_users(
    server: Server,
    acme: Any,
    alice: Any,
    bob: Any,
    dify: Any,
    log_in: Callable[[Any], Page],
    open_team_list: Callable[[Any, Any], Page],
    screenshot: Callable[[Page, str], None],
) -> None:
    from runs.models import Run
    from runs.templatetags.runs_tags import markdown

    bob_page = open_team_list(bob, acme)
    run_id = launch_via_form(bob_page, dify, LONG_DIFY_RUN, "Dify options")
    run = Run.objects.get(pk=run_id)
    assert (run.provider, run.created_by_id, run.prompt) == ("dify", bob.pk, LONG_DIFY_RUN)
    assert run.options.get("user") == "bob", "the Dify end-user defaults to the username"

    open_run_page(bob_page, server, run_id)
    alice_page = log_in(alice)
    open_run_page(alice_page, server, run_id)

    status = {page: page.locator(f"#run-status-{run_id}") for page in (bob_page, alice_page)}
    output = {page: page.locator(f"#run-output-{run_id}") for page in (bob_page, alice_page)}
    for page in (bob_page, alice_page):
        expect(status[page]).to_have_attribute("data-status", "running")
        expect(page.get_by_text("Esc stops this run")).to_be_visible()

    # The answer streams in live: its text grows between two observations, on both pages.
    for page in (bob_page, alice_page):
        first = wait_for_output_longer_than(page, run_id, 0)
        wait_for_output_longer_than(page, run_id, first)
        expect(output[page]).to_contain_text("characters so far")
    screenshot(bob_page, "dify-run-streaming")

    status[bob_page].locator("button.stop-button").click()

    for page in (bob_page, alice_page):
        expect(status[page]).to_have_attribute("data-status", "stopped")
        expect(status[page].locator(".badge")).to_have_text("Stopped")
        expect(status[page].locator(".stop-proof")).to_contain_text("confirmed by")
        expect(status[page].locator(".stop-proof")).to_contain_text(
            "Dify's stream ending after the stop"
        )
        expect(status[page]).to_contain_text("by bob")
        expect(status[page].locator("button.stop-button")).to_have_count(0)
        expect(page.get_by_text("Esc stops this run")).to_have_count(0)
        # The partial answer stays, marked as such.
        expect(
            output[page].get_by_text("Partial output, kept from before the stop")
        ).to_be_visible()
        expect(output[page].locator(".markdown")).to_be_visible()
        expect(output[page].locator(".markdown")).not_to_have_class(re.compile(r"\bstreaming\b"))
    screenshot(alice_page, "dify-run-stopped")

    run.refresh_from_db()
    assert run.status == "stopped"
    assert run.stop_requested_by_id == bob.pk
    assert "confirmed by" not in run.stop_confirmation  # the template adds those words
    assert run.stop_confirmation == "Dify's stream ending after the stop"
    assert run.external_id, "Dify names the task in its first stream event"
    assert run.output, "output streamed before the stop is kept"

    # Exactly one stop call reached Dify, for this run's task.
    stop_calls = [
        r
        for r in server.requests("dify")
        if r["method"] == "POST" and r["path"].endswith(f"/chat-messages/{run.external_id}/stop")
    ]
    assert len(stop_calls) == 1, stop_calls
    assert stop_calls[0]["body"] == {"user": "bob"}

    # Nothing grew after STOPPED: what each page shows is exactly the stored output, which is
    # the partial answer Dify kept in its history.
    expected_text = bob_page.evaluate(
        "html => { const d = document.createElement('div'); d.innerHTML = html;"
        " return d.textContent; }",
        str(markdown(run.output)),
    )
    for page in (bob_page, alice_page):
        expect(output[page].locator(".markdown")).to_have_text(expected_text)
        expect(output[page]).to_contain_text(f"{len(run.output)} characters")
        expect(output[page]).not_to_contain_text("so far")
        assert output_length(page, run_id) == len(expected_text)
        assert page.evaluate("window.__noReload") is True, "the page was reloaded"
    # Dify saves the answer stripped of surrounding whitespace (its `_save_message`).
    assert dify_history_answer(server, run) == run.output.strip()

    # Still exactly one stop call (no re-send once the stop was confirmed), and the stored
    # output has not changed since.
    run_after = Run.objects.get(pk=run_id)
    assert (run_after.status, run_after.output) == ("stopped", run.output)
    assert len(server.stop_calls(run.external_id, provider="dify")) == 1


def test_escape_key_stops_the_run_on_its_page(
    server: Server,
    bob: Any,
    fay: Any,
    log_in: Callable[[Any], Page],
) -> None:
    from runs.models import Run

    run = Run.objects.launch(
        account=fay, user=bob, prompt=LONG_FAY_RUN, options={}, timeout_seconds=600
    )
    page = log_in(bob)
    open_run_page(page, server, run.pk)
    status = page.locator(f"#run-status-{run.pk}")
    expect(status).to_have_attribute("data-status", "running")
    hint = page.get_by_text("Esc stops this run")
    expect(hint).to_be_visible()

    # Nothing has the focus, so the key goes to the document, whose handler presses the
    # run's Cancel button.
    page.keyboard.press("Escape")

    expect(status).to_have_attribute("data-status", "stopped")
    expect(status.locator(".badge")).to_have_text("Stopped")
    expect(status.locator(".stop-proof")).to_contain_text("confirmed by")
    expect(status).to_contain_text("by bob")
    expect(hint).to_have_count(0)
    assert page.evaluate("window.__noReload") is True, "the page was reloaded"

    run.refresh_from_db()
    assert run.status == "stopped"
    assert run.stop_requested_by_id == bob.pk
    assert len(server.stop_calls(run.external_id)) == 1
