"""Pages and htmx actions: it works; GET is refused; another team's run is a 404; without
htmx it redirects; CSRF is enforced; viewers cannot act."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from runs.models import Run, Status
from tests.conftest import start_at_provider

HTMX: dict[str, Any] = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def as_bob(client, bob):
    client.force_login(bob)
    return client


def toast_of(response) -> dict[str, Any]:
    toast = json.loads(response["HX-Trigger"])["toast"]
    # Fired on <body>, so it is shown even when the requesting form was replaced meanwhile.
    assert toast.pop("target") == "body"
    return toast


def test_it_redirects_anonymous_users_to_login(client, acme):
    response = client.get(reverse("runs:team", args=[acme.pk]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_home_goes_to_the_users_team(as_bob, acme):
    response = as_bob.get("/")
    assert response.status_code == 302
    assert response["Location"] == reverse("runs:team", args=[acme.pk])


def test_it_lists_the_teams_runs_newest_first_with_live_wiring(as_bob, acme, launch):
    older, newer = launch("first question"), launch("second question")
    response = as_bob.get(reverse("runs:team", args=[acme.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert html.index(f'id="run-row-{newer.pk}"') < html.index(f'id="run-row-{older.pk}"')
    assert f'ws-connect="/ws/teams/{acme.pk}/"' in html
    assert 'aria-label="Cancel run #' in html
    assert "sim-acme" not in html  # the key is never rendered


def test_another_teams_list_is_a_404(as_bob, globex):
    assert as_bob.get(reverse("runs:team", args=[globex.pk])).status_code == 404


def test_the_list_pages_with_a_cursor(as_bob, acme, launch, settings):
    settings.RUNBRAKE_RUNS_PER_PAGE = 2
    runs = [launch(f"q{i}") for i in range(3)]
    first = as_bob.get(reverse("runs:team", args=[acme.pk])).content.decode()
    assert f'href="?before={runs[1].pk}"' in first
    older = as_bob.get(reverse("runs:team", args=[acme.pk]) + f"?before={runs[1].pk}")
    html = older.content.decode()
    assert f'id="run-row-{runs[0].pk}"' in html
    assert f'id="run-row-{runs[2].pk}"' not in html
    assert 'id="run-rows-older"' in html  # no live insertions on an older page


def test_the_list_filters_by_status_provider_owner_and_text(as_bob, acme, launch, alice):
    mine = launch("mine about penguins")
    theirs = launch("alices question", user=alice)
    theirs.mark_completed(proof="status_read", output="x")
    url = reverse("runs:team", args=[acme.pk])
    rows = lambda q: {  # noqa: E731
        r
        for r in (mine.pk, theirs.pk)
        if f'id="run-row-{r}"' in as_bob.get(url + q).content.decode()
    }
    assert rows("") == {mine.pk, theirs.pk}
    assert rows("?status=completed") == {theirs.pk}
    assert rows("?owner=me") == {mine.pk}
    assert rows("?owner=alice") == {theirs.pk}
    assert rows("?q=PENGUIN") == {mine.pk}
    assert rows("?provider=dify") == set()
    page = as_bob.get(url + "?owner=nobody").content.decode()
    assert "No member named" in page
    counts = as_bob.get(url + "?owner=me").content.decode()
    assert "Pending <strong>1</strong>" in counts
    assert "Completed <strong>0</strong>" in counts
    assert f'ws-connect="/ws/teams/{acme.pk}/?owner=me"' in counts


def test_status_counts_stop_at_the_cap_and_say_so(as_bob, acme, launch, monkeypatch):
    from runs.web import views

    monkeypatch.setattr(views, "COUNT_CAP", 2)
    for n in range(3):
        launch(f"run {n}")
    done = launch("done")
    done.mark_completed(proof="status_read", output="x")
    page = as_bob.get(reverse("runs:team", args=[acme.pk])).content.decode()
    assert "Pending <strong>2+</strong>" in page
    assert "Completed <strong>1</strong>" in page
    assert "All <strong>3+</strong>" in page


def test_it_launches_a_run_over_htmx_and_answers_with_a_fresh_form_and_the_row(
    as_bob, acme, fay_account
):
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {"provider_account": fay_account.pk, "prompt": "AI editors", "timeout_seconds": 120},
        **HTMX,
    )
    assert response.status_code == 200
    run = Run.objects.get()
    html = response.content.decode()
    assert 'id="launch-form"' in html
    # In a <template> of its own: after the <form>, the HTML parser would drop a bare <tbody>.
    assert f'<template><tbody hx-swap-oob="afterbegin:#run-rows"><tr id="run-row-{run.pk}"' in (
        html.replace("\n", "")
    )
    assert toast_of(response)["level"] == "success"
    assert (run.status, run.prompt, run.timeout_seconds) == (Status.PENDING, "AI editors", 120)


def test_launch_without_htmx_redirects_to_the_run(as_bob, acme, fay_account):
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {"provider_account": fay_account.pk, "prompt": "AI editors", "timeout_seconds": 120},
    )
    run = Run.objects.get()
    assert response.status_code == 302
    assert response["Location"] == run.get_absolute_url()


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "This field is required."),
        ({"structured_output": "on", "output_schema": "{nope"}, "output_schema", "not valid JSON"),
        (
            {"structured_output": "on", "output_schema": '{"type": 5}'},
            "output_schema",
            "not a valid JSON Schema",
        ),
        ({"structured_output": "on"}, "output_schema", "needs a JSON schema"),
        ({"timeout_seconds": 1}, "timeout_seconds", "greater than or equal to 10"),
    ],
)
def test_launch_errors_are_shown_in_place_and_keep_what_was_typed(
    as_bob, acme, fay_account, data, field, message
):
    post = {
        "provider_account": fay_account.pk,
        "prompt": "kept prompt text",
        "timeout_seconds": 60,
        **data,
    }
    response = as_bob.post(reverse("runs:launch", args=[acme.pk]), post, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert message in html
    assert 'class="field invalid"' in html or "invalid" in html
    if field != "prompt":
        assert "kept prompt text" in html
    assert toast_of(response)["level"] == "error"
    assert not Run.objects.exists()


def test_launch_with_another_teams_account_is_refused_in_place(as_bob, acme, globex_account):
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {"provider_account": globex_account.pk, "prompt": "x", "timeout_seconds": 60},
        **HTMX,
    )
    assert "Select a valid choice" in response.content.decode()
    assert not Run.objects.exists()


def test_launch_into_another_team_is_a_404(as_bob, globex, globex_account):
    response = as_bob.post(
        reverse("runs:launch", args=[globex.pk]),
        {"provider_account": globex_account.pk, "prompt": "x", "timeout_seconds": 60},
    )
    assert response.status_code == 404
    assert not Run.objects.exists()


def test_a_viewer_cannot_launch(client, carol, acme, fay_account):
    client.force_login(carol)
    response = client.post(
        reverse("runs:launch", args=[acme.pk]),
        {"provider_account": fay_account.pk, "prompt": "x", "timeout_seconds": 60},
        **HTMX,
    )
    assert response.status_code == 403
    assert "Viewers" in toast_of(response)["message"]
    assert not Run.objects.exists()


@pytest.mark.parametrize("name", ["runs:launch", "runs:stop"])
def test_get_is_refused_on_actions(as_bob, acme, launch, name):
    arg = acme.pk if name == "runs:launch" else launch().pk
    assert as_bob.get(reverse(name, args=[arg])).status_code == 405


def test_the_run_page_shows_status_timeline_and_live_wiring(as_bob, launch):
    run = launch("research **this**")
    response = as_bob.get(run.get_absolute_url())
    html = response.content.decode()
    assert response.status_code == 200
    assert f'ws-connect="/ws/runs/{run.pk}/"' in html
    assert f'id="run-status-{run.pk}"' in html
    assert f'id="run-events-{run.pk}"' in html
    assert "Launched" in html
    assert "<kbd>Esc</kbd>" in html


def test_markdown_output_is_rendered_safely(as_bob, launch):
    run = launch()
    run.mark_completed(
        proof="status_read", output="# Title\n<script>alert(1)</script>\n[x](javascript:alert(1))"
    )
    html = as_bob.get(run.get_absolute_url()).content.decode()
    assert "<h1>Title</h1>" in html
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html
    assert 'href="javascript:' not in html


def test_another_teams_run_page_is_a_404(client, mallory, launch):
    run = launch()
    client.force_login(mallory)
    assert client.get(run.get_absolute_url()).status_code == 404


@pytest.mark.django_db(transaction=True)
def test_cancel_over_htmx_stops_at_the_provider_and_answers_with_the_fragments(as_bob, launch, sim):
    run = start_at_provider(launch("long sim:pending=0 sim:duration=60"))
    response = as_bob.post(reverse("runs:stop", args=[run.pk]), {"reason": "too slow"}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert f'id="run-row-{run.pk}"' in html
    assert 'data-status="stopped"' in html
    assert 'hx-swap-oob="true"' in html
    toast = toast_of(response)
    assert toast["level"] == "success"
    assert "confirmed by Fay's stop answer" in toast["message"]
    run.refresh_from_db()
    assert run.status == Status.STOPPED
    assert run.stop_reason == "too slow"
    assert run.stop_latency_ms is not None
    assert len(sim.stop_calls(run.external_id)) == 1


@pytest.mark.django_db(transaction=True)
def test_cancel_without_htmx_redirects_to_the_run(as_bob, launch, sim):
    run = start_at_provider(launch("long sim:pending=0 sim:duration=60"))
    response = as_bob.post(reverse("runs:stop", args=[run.pk]))
    assert response.status_code == 302
    assert response["Location"] == run.get_absolute_url()
    run.refresh_from_db()
    assert run.status == Status.STOPPED


def test_cancel_of_a_finished_run_says_so_and_changes_nothing(as_bob, launch):
    run = launch()
    run.mark_completed(proof="status_read", output="done")
    response = as_bob.post(reverse("runs:stop", args=[run.pk]), **HTMX)
    assert response.status_code == 200
    assert "already completed" in toast_of(response)["message"]
    run.refresh_from_db()
    assert run.status == Status.COMPLETED


@pytest.mark.django_db(transaction=True)
def test_a_rate_limited_stop_is_shown_in_words_and_retried(as_bob, launch, sim):
    run = start_at_provider(launch("x sim:pending=0 sim:duration=60 sim:stop=error"))
    response = as_bob.post(reverse("runs:stop", args=[run.pk]), **HTMX)
    toast = toast_of(response)
    assert toast["level"] == "error"
    assert "Fay had an internal error" in toast["message"]
    run.refresh_from_db()
    assert run.status == Status.STOPPING
    assert run.stop_next_attempt_at is not None


def test_another_teams_run_cannot_be_stopped(client, mallory, launch, sim):
    run = launch()
    client.force_login(mallory)
    assert client.post(reverse("runs:stop", args=[run.pk]), **HTMX).status_code == 404
    run.refresh_from_db()
    assert run.status == Status.PENDING


def test_a_viewer_cannot_stop(client, carol, launch):
    run = launch()
    client.force_login(carol)
    response = client.post(reverse("runs:stop", args=[run.pk]), **HTMX)
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == Status.PENDING


def test_csrf_is_enforced_with_a_readable_message(bob, launch):
    run = launch()
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    response = client.post(reverse("runs:stop", args=[run.pk]), **HTMX)
    assert response.status_code == 403
    assert "Reload the page" in toast_of(response)["message"]
    run.refresh_from_db()
    assert run.status == Status.PENDING


def test_csrf_token_from_the_page_lets_htmx_post(bob, launch):
    run = launch()
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    page = client.get(run.get_absolute_url()).content.decode()
    token = page.split('"X-CSRFToken": "')[1].split('"')[0]
    run.mark_completed(proof="status_read", output="x")  # keeps the test off the network
    response = client.post(reverse("runs:stop", args=[run.pk]), HTTP_X_CSRFTOKEN=token, **HTMX)
    assert response.status_code == 200


@pytest.fixture
def streaming_accounts(acme, sim):
    from runs.models import ProviderAccount

    def make(kind, path, **options):
        return ProviderAccount.objects.create(
            team=acme,
            kind=kind,
            name=kind,
            base_url=sim.url + path,
            api_key=f"sim-{kind}",
            options=options,
        )

    return {
        "dify": make("dify", "/sim/dify/v1"),
        "intelligencebox": make("intelligencebox", "/sim/intelligencebox"),
        "xpander": make("xpander", "/sim/xpander", agent_id="researcher"),
    }


def test_the_launch_form_offers_each_providers_own_options(as_bob, acme, streaming_accounts):
    html = as_bob.get(reverse("runs:team", args=[acme.pk])).content.decode()
    for kind in ("dify", "intelligencebox", "xpander"):
        assert f'data-kind="{kind}"' in html
    assert 'value="researcher"' in html  # the account's agent id is the default


@pytest.mark.parametrize(
    ("kind", "extra", "options"),
    [
        (
            "dify",
            {"user": "", "inputs": '{"lang": "en"}'},
            {"user": "bob", "inputs": {"lang": "en"}},
        ),
        (
            "intelligencebox",
            {"messages": '[{"role": "user", "content": "hi"}]'},
            {"messages": [{"role": "user", "content": "hi"}]},
        ),
        (
            "xpander",
            {"agent_id": "", "clear_queue": "on"},
            {"agent_id": "researcher", "clear_queue": True},
        ),
        ("xpander", {"agent_id": "other"}, {"agent_id": "other", "clear_queue": False}),
    ],
)
def test_it_launches_with_the_providers_options(
    as_bob, acme, streaming_accounts, kind, extra, options
):
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {
            "provider_account": streaming_accounts[kind].pk,
            "prompt": "hello",
            "timeout_seconds": 60,
            **extra,
        },
        **HTMX,
    )
    assert toast_of(response)["level"] == "success"
    assert Run.objects.get().options == options


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("dify", {"inputs": "[1]"}, "must be a JSON object"),
        (
            "intelligencebox",
            {"messages": '[{"role": "robot", "content": "x"}]'},
            "needs a role (user, assistant or system)",
        ),
        ("intelligencebox", {"messages": "{oops"}, "not valid JSON"),
    ],
)
def test_provider_options_are_validated_in_place(
    as_bob, acme, streaming_accounts, kind, extra, message
):
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {
            "provider_account": streaming_accounts[kind].pk,
            "prompt": "hello",
            "timeout_seconds": 60,
            **extra,
        },
        **HTMX,
    )
    assert message in response.content.decode()
    assert not Run.objects.exists()


def test_an_xpander_run_needs_an_agent(as_bob, acme, streaming_accounts):
    account = streaming_accounts["xpander"]
    account.options = {}
    account.save()
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {"provider_account": account.pk, "prompt": "hello", "timeout_seconds": 60},
        **HTMX,
    )
    assert "needs the id of the agent" in response.content.decode()
    assert not Run.objects.exists()


def test_a_double_submitted_launch_form_starts_one_run(as_bob, acme, fay_account):
    page = as_bob.get(reverse("runs:team", args=[acme.pk])).content.decode()
    key = page.split('name="idempotency_key" value="')[1].split('"')[0]
    post = {
        "provider_account": fay_account.pk,
        "prompt": "once",
        "timeout_seconds": 60,
        "idempotency_key": key,
    }
    as_bob.post(reverse("runs:launch", args=[acme.pk]), post, **HTMX)
    second = as_bob.post(reverse("runs:launch", args=[acme.pk]), post, **HTMX)
    assert second.status_code == 200
    assert Run.objects.count() == 1
    fresh = second.content.decode().split('name="idempotency_key" value="')[1].split('"')[0]
    assert fresh != key  # the next launch from the fresh form is a new run


def test_a_viewer_pressing_cancel_without_htmx_gets_a_readable_403(client, carol, launch):
    run = launch()
    client.force_login(carol)
    response = client.post(reverse("runs:stop", args=[run.pk]))
    assert response.status_code == 403
    assert "Viewers can watch runs but not stop them." in response.content.decode()


def test_a_viewer_bulk_stopping_without_htmx_gets_a_readable_403(client, carol, acme, launch):
    run = launch()
    client.force_login(carol)
    response = client.post(
        reverse("runs:bulk-stop", args=[acme.pk]), {"action": "confirm", "ids": [run.pk]}
    )
    assert response.status_code == 403
    assert "Viewers" in response.content.decode()


def test_a_leftover_in_another_providers_options_does_not_block_a_launch(
    as_bob, acme, fay_account, streaming_accounts
):
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {
            "provider_account": streaming_accounts["intelligencebox"].pk,
            "prompt": "hello",
            "timeout_seconds": 60,
            "inputs": "{oops",
            "output_schema": "[not a schema",
        },
        **HTMX,
    )
    assert toast_of(response)["level"] == "success"
    assert Run.objects.get().options == {}


def test_an_invalid_schema_is_one_error_not_two(as_bob, acme, fay_account):
    response = as_bob.post(
        reverse("runs:launch", args=[acme.pk]),
        {
            "provider_account": fay_account.pk,
            "prompt": "x",
            "timeout_seconds": 60,
            "structured_output": "on",
            "output_schema": '{"type": "objekt"}',
        },
        **HTMX,
    )
    html = response.content.decode()
    assert "not a valid JSON Schema" in html
    assert "needs a JSON schema" not in html


@pytest.mark.django_db(transaction=True)
def test_cancel_from_the_run_page_answers_with_that_pages_fragments(as_bob, launch, sim):
    run = start_at_provider(launch("long sim:pending=0 sim:duration=60"))
    response = as_bob.post(
        reverse("runs:stop", args=[run.pk]),
        HTTP_HX_CURRENT_URL=f"http://testserver{run.get_absolute_url()}",
        **HTMX,
    )
    html = response.content.decode()
    assert f'id="run-status-{run.pk}"' in html
    assert f'id="run-events-{run.pk}"' in html
    assert f'id="run-row-{run.pk}"' not in html  # that page has no row to swap


def test_the_whole_output_is_a_text_page_for_the_team_only(client, bob, mallory, launch):
    run = launch("long")
    run.mark_completed(proof="status_read", output="x" * 50_000 + "THE END")
    client.force_login(bob)
    response = client.get(reverse("runs:output", args=[run.pk]))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert response.content.decode().endswith("THE END")
    assert len(response.content) == 50_007
    client.force_login(mallory)
    assert client.get(reverse("runs:output", args=[run.pk])).status_code == 404
    client.logout()
    assert client.get(reverse("runs:output", args=[run.pk])).status_code == 302


def test_a_structured_answer_is_its_output_page_as_json(client, bob, launch):
    run = launch("structured")
    run.mark_completed(proof="status_read", output="", structured_output={"editors": ["Ana"]})
    client.force_login(bob)
    response = client.get(reverse("runs:output", args=[run.pk]))
    assert json.loads(response.content) == {"editors": ["Ana"]}


def test_a_viewer_sees_no_controls_they_cannot_use(client, carol, launch):
    run = launch()
    client.force_login(carol)
    page = client.get(run.get_absolute_url()).content.decode()
    assert "stop-form" not in page
    assert "<kbd>Esc</kbd>" not in page
    listing = client.get(f"/teams/{run.team_id}/runs/").content.decode()
    assert "stop-form" not in listing
    assert 'name="ids"' not in listing


def test_a_member_refused_a_teammates_run_is_told_why_in_words(client, alice, bob, launch):
    run = launch(user=alice)
    run.team.members_can_stop_others = False
    run.team.save()
    client.force_login(bob)
    page = client.get(run.get_absolute_url()).content.decode()
    assert "stop-form" not in page
    response = client.post(f"/runs/{run.pk}/stop", HTTP_HX_REQUEST="true")
    assert response.status_code == 403
    toast = json.loads(response["HX-Trigger"])["toast"]["message"]
    assert "lets members stop only the runs they launched" in toast
    assert "Viewers" not in toast


def test_an_htmx_action_after_the_session_ended_leads_to_the_login_page_and_back(client, launch):
    run = launch()
    response = client.post(
        f"/runs/{run.pk}/stop",
        HTTP_HX_REQUEST="true",
        HTTP_HX_CURRENT_URL=f"http://testserver/runs/{run.pk}/",
    )
    assert response.status_code == 204
    assert response["HX-Redirect"] == f"/accounts/login/?next=%2Fruns%2F{run.pk}%2F"
    login = client.get(response["HX-Redirect"]).content.decode()
    assert "Your session ended, so that was not done." in login
    assert f'value="/runs/{run.pk}/"' in login  # where the login goes back to
    run.refresh_from_db()
    assert run.status == "pending"


# --- A stop the provider never confirmed ------------------------------------------------------


def _unconfirmed(run, *, sent_ago: float = 60.0):
    """A run whose stop went out a while ago and was never confirmed."""
    import datetime as dt

    from django.utils import timezone

    from runs.models import Run

    now = timezone.now()
    Run.objects.filter(pk=run.pk).update(
        status="stop_unconfirmed",
        stop_requested_at=now - dt.timedelta(seconds=sent_ago),
        stop_sent_at=now - dt.timedelta(seconds=sent_ago),
        stop_next_attempt_at=now + dt.timedelta(seconds=30),
        stop_error="Fay had an internal error. Runbrake retries.",
    )
    run.refresh_from_db()
    return run


def test_send_the_stop_again_now_makes_one_call_and_the_provider_confirms(
    client, bob, alice, carol, launch, sim
):
    from tests.conftest import start_at_provider

    run = _unconfirmed(start_at_provider(launch()))
    client.force_login(bob)
    page = client.get(run.get_absolute_url()).content.decode()
    assert "Send the stop again now" in page
    assert "Mark stopped by hand" not in page  # a team admin's
    response = client.post(f"/runs/{run.pk}/retry-stop", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    run.refresh_from_db()
    assert run.status == "stopped"
    assert run.proof == "stop_answer"
    assert len(sim.stop_calls(run.external_id)) == 1
    assert run.events.filter(kind="stop_retry").count() == 1
    client.force_login(carol)
    assert "Send the stop again now" not in client.get(run.get_absolute_url()).content.decode()


def test_a_retry_is_refused_while_the_last_stop_call_may_still_be_out(client, bob, launch, sim):
    from tests.conftest import start_at_provider

    run = _unconfirmed(start_at_provider(launch()), sent_ago=1)
    client.force_login(bob)
    response = client.post(f"/runs/{run.pk}/retry-stop", HTTP_HX_REQUEST="true")
    toast = json.loads(response["HX-Trigger"])["toast"]
    assert toast["level"] == "error"
    assert "under way" in toast["message"]
    assert sim.stop_calls(run.external_id) == []


def test_a_team_admin_marks_an_unconfirmed_stop_stopped_by_hand_with_a_reason(
    client, alice, bob, launch
):
    run = _unconfirmed(launch())
    client.force_login(alice)
    assert "Mark stopped by hand" in client.get(run.get_absolute_url()).content.decode()
    empty = client.post(f"/runs/{run.pk}/force-stop", {"reason": " "}, HTTP_HX_REQUEST="true")
    assert empty.status_code == 403
    client.post(
        f"/runs/{run.pk}/force-stop",
        {"reason": "Fay's dashboard shows it stopped"},
        HTTP_HX_REQUEST="true",
    )
    run.refresh_from_db()
    assert run.status == "stopped"
    assert run.proof == "admin_force"
    assert "Fay's dashboard shows it stopped" in run.stop_confirmation
    page = client.get(run.get_absolute_url()).content.decode()
    assert "an admin&#x27;s force-mark, not the provider" in page.lower() or "force-mark" in page


def test_a_member_cannot_mark_a_run_stopped_by_hand(client, bob, launch):
    run = _unconfirmed(launch())
    client.force_login(bob)
    response = client.post(f"/runs/{run.pk}/force-stop", {"reason": "sure"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == "stop_unconfirmed"


def test_repeated_failed_stop_calls_are_one_timeline_entry_with_a_count(client, bob, launch):
    from runs.models import RunEvent

    run = launch()
    for _ in range(7):
        run.record_event(RunEvent.Kind.STOP_FAILED, "Fay had an internal error.")
    client.force_login(bob)
    page = client.get(run.get_absolute_url()).content.decode()
    assert page.count("Stop call failed") == 1
    assert "\u00d77" in page  # times seven


def test_a_run_that_completed_despite_the_stop_says_so_in_the_list(client, bob, launch):
    from django.utils import timezone

    from runs.models import Run

    run = launch()
    Run.objects.filter(pk=run.pk).update(status="completed", stop_requested_at=timezone.now())
    client.force_login(bob)
    listing = client.get(f"/teams/{run.team_id}/runs/").content.decode()
    assert "despite the stop" in listing


def test_a_finished_runs_row_is_rendered_once_and_anew_when_anything_on_it_changes(
    as_bob, acme, launch, fay_account
):
    from django.template.loader import render_to_string
    from django.utils import timezone

    from runs.realtime import live
    from runs.templatetags import runs_tags

    done, active = launch("a finished one"), launch("an active one")
    Run.objects.filter(pk=done.pk).update(status="completed", finished_at=timezone.now())
    url = reverse("runs:team", args=[acme.pk])
    runs_tags._rows.clear()
    first = as_bob.get(url).content.decode()
    # The same row as the partial renders it, and only the finished run's is kept.
    assert render_to_string("runs/partials.html#run-row", {"run": live.load(done.pk)}) in first
    assert [key[0] for key in runs_tags._rows] == [done.pk]
    row = re.compile(rf'<tr id="run-row-{done.pk}".*?</tr>', re.DOTALL)
    assert row.findall(as_bob.get(url).content.decode()) == row.findall(first)
    assert f'data-stop-run="{active.pk}"' in first  # the active row keeps its controls

    # Changes that bump no version are shown all the same.
    fay_account.name = "Renamed account"
    fay_account.save()
    assert "Renamed account" in as_bob.get(url).content.decode()
    Run.objects.filter(pk=done.pk).update(status="failed", error="It broke down")
    page = as_bob.get(url).content.decode()
    assert "It broke down" in page
    assert f'id="run-row-{done.pk}" data-version="{done.version}" data-status="failed"' in page


def test_an_overlong_prompt_is_refused_with_the_limit_named_and_kept_whole(
    client, bob, fay_account
):
    from runs.models import Run
    from runs.web.forms import MAX_PROMPT

    client.force_login(bob)
    prompt = "word " * (MAX_PROMPT // 5) + "TRAILING DIRECTIVE sim:duration=1"
    page = client.get(f"/teams/{fay_account.team_id}/runs/").content.decode()
    assert "maxlength" not in page.split('name="prompt"')[1].split(">")[0]  # never cut
    response = client.post(
        f"/teams/{fay_account.team_id}/runs/launch",
        {
            "provider_account": fay_account.pk,
            "prompt": prompt,
            "timeout_seconds": 600,
            "no_progress_seconds": 0,
        },
        HTTP_HX_REQUEST="true",
    )
    html = response.content.decode()
    assert f"The prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT:,}." in html
    assert "TRAILING DIRECTIVE" in html  # the text is given back whole
    assert not Run.objects.exists()


def test_the_api_refuses_an_overlong_prompt_in_json(client, bob, fay_account):
    from runs.models import ApiToken
    from runs.web.forms import MAX_PROMPT

    token = ApiToken.issue(bob)
    response = client.post(
        "/api/runs",
        data=json.dumps({"provider_account": fay_account.pk, "prompt": "x" * (MAX_PROMPT + 1)}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["field"] == "prompt"
    assert f"the limit is {MAX_PROMPT:,}" in error["message"]


@pytest.mark.parametrize(
    ("status", "words"),
    [
        ("message_end", "reply ended"),
        ("workflow_finished:stopped", "workflow stopped"),
        ("error:completion_request_error", "error (completion request error)"),
        ("finish:stop", "finished"),
        ("history:no_answer", "ended with no answer in its history"),
        ("PROCESSING", "PROCESSING"),
    ],
)
def test_a_providers_status_is_shown_in_words(status, words):
    from runs.templatetags.runs_tags import provider_words

    assert provider_words(status) == words


def test_pages_carry_a_content_security_policy_and_private_pages_are_not_cached(
    client, bob, launch
):
    from runs.models import ApiToken

    run = launch()
    anonymous = client.get("/accounts/login/")
    policy = anonymous["Content-Security-Policy"]
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in policy
    assert "camera=()" in anonymous["Permissions-Policy"]
    client.force_login(bob)
    page = client.get(run.get_absolute_url())
    assert "no-store" in page["Cache-Control"]
    token = ApiToken.issue(bob)
    api = client.get(f"/api/runs/{run.pk}", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert "no-store" in api["Cache-Control"]


def test_the_simulators_request_log_is_for_staff_or_the_inspection_token(client, bob, settings):
    settings.RUNBRAKE_SIM_INSPECT_TOKEN = "t0ken"
    assert client.get("/sim/requests").status_code == 403
    client.force_login(bob)  # a member is not staff: every team's prompts are in it
    assert client.get("/sim/requests").status_code == 403
    assert client.delete("/sim/requests").status_code == 403
    assert client.get("/sim/requests", HTTP_X_SIM_INSPECT_TOKEN="t0ken").status_code == 200
    bob.is_staff = True
    bob.save()
    assert client.get("/sim/requests").status_code == 200


def test_a_missing_page_is_a_friendly_404_even_in_development(client, bob, mallory, launch):
    run = launch()
    client.force_login(mallory)  # another team's run looks exactly like none
    for path in (run.get_absolute_url(), "/no/such/page/"):
        response = client.get(path)
        assert response.status_code == 404
        html = response.content.decode()
        assert "Nothing here" in html
        assert "URLconf" not in html  # not Django's technical page


def test_an_unknown_filter_value_is_said_and_an_empty_result_explained(client, bob, launch):
    run = launch()
    client.force_login(bob)
    page = client.get(f"/teams/{run.team_id}/runs/?status=bogus").content.decode()
    assert "Unknown status in the address" in page
    empty = client.get(f"/teams/{run.team_id}/runs/?q=no-such-words").content.decode()
    assert "No runs match these filters." in empty


def test_stop_all_with_nothing_running_says_so(client, bob, acme):
    client.force_login(bob)
    response = client.post(f"/teams/{acme.pk}/runs/stop", {"scope": "all"}, HTTP_HX_REQUEST="true")
    assert json.loads(response["HX-Trigger"])["toast"]["message"] == "Nothing is running to stop."


def test_the_favicon_is_found_at_the_root(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301
    assert response["Location"].endswith("favicon.svg")
