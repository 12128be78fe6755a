"""The operator's admin: runs are found (filters, search, dates), read but never edited, stopped
through the verified path by a superuser in no team, force-marked only with a reason and only
when stuck; provider keys never leave the server; teams show their members."""

from __future__ import annotations

import datetime as dt
import html
import json

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone
from django.utils.html import strip_tags

from runs.models import Channel, Run, RunEvent, Status
from tests.conftest import start_at_provider

CHANGELIST = reverse("admin:runs_run_changelist")


def change_url(run: Run) -> str:
    return reverse("admin:runs_run_change", args=[run.pk])


def listed(response) -> set[int]:
    return {run.pk for run in response.context["cl"].result_list}


def notes(response) -> list[tuple[str, str]]:
    """The admin messages the response queued, as (level tag, the text a person reads)."""
    return [
        (m.level_tag, html.unescape(strip_tags(str(m))))
        for m in get_messages(response.wsgi_request)
    ]


def stuck_stopping(run: Run, by) -> Run:
    run.request_stop(actor=by, channel=Channel.BUTTON, reason="too slow")
    return run


# --- Finding runs -------------------------------------------------------------------------


def test_it_lists_runs_with_status_badges(admin_client, launch):
    running, pending = launch("a running one"), launch("a pending one")
    running.mark_running("PROCESSING")
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    assert listed(response) == {running.pk, pending.pk}
    html = response.content.decode()
    assert '<span class="rb-badge rb-badge-running">Running</span>' in html
    assert '<span class="rb-badge rb-badge-pending">Pending</span>' in html
    assert "css/admin.css" in html


def test_every_filter_narrows_the_list(admin_client, acme, alice, launch, globex_account, mallory):
    mine = launch("bob's question")
    stopped_by_alice = stuck_stopping(launch("alice stops this"), alice)
    globex = launch("globex question", user=mallory, account=globex_account)
    old = launch("an old question")
    Run.objects.filter(pk=old.pk).update(created_at=timezone.now() - dt.timedelta(days=40))
    Run.objects.filter(pk=globex.pk).update(provider="dify")
    # The date filter's own links: aware midnights, as DateFieldListFilter builds them.
    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    week = {
        "created_at__gte": str(midnight - dt.timedelta(days=7)),
        "created_at__lt": str(midnight + dt.timedelta(days=1)),
    }
    month = {"created_at__year": midnight.year, "created_at__month": midnight.month}
    recent = {mine.pk, stopped_by_alice.pk, globex.pk}
    cases = [
        ({"status__exact": "stopping"}, {stopped_by_alice.pk}),
        ({"provider__exact": "dify"}, {globex.pk}),
        ({"team__id__exact": acme.pk}, {mine.pk, stopped_by_alice.pk, old.pk}),
        ({"stop_requested_by__id__exact": alice.pk}, {stopped_by_alice.pk}),
        ({"stop_channel__exact": "button"}, {stopped_by_alice.pk}),
        (week, recent),
        (month, recent),  # the date hierarchy
    ]
    for query, expected in cases:
        response = admin_client.get(CHANGELIST, query)
        # An unknown filter parameter would redirect with ?e=1 instead of filtering.
        assert response.status_code == 200, query
        assert listed(response) == expected, query


def test_the_stopped_by_filter_offers_only_people_who_stopped_something(
    admin_client, alice, bob, launch
):
    stuck_stopping(launch(), alice)
    html = admin_client.get(CHANGELIST).content.decode()
    assert f"?stop_requested_by__id__exact={alice.pk}" in html
    assert f"?stop_requested_by__id__exact={bob.pk}" not in html
    assert "By stopped by" in html


@pytest.mark.parametrize("field", ["prompt", "external_id", "owner"])
def test_search_finds_runs_by_prompt_external_id_or_owner(admin_client, launch, alice, field):
    wanted = launch("Which editors read AI books?", user=alice)
    wanted.record_external_id("fay-run-1234")
    other = launch("Something else entirely")
    other.record_external_id("fay-run-9999")
    term = {"prompt": "editors read", "external_id": "run-1234", "owner": "alice"}[field]
    response = admin_client.get(CHANGELIST, {"q": term})
    assert response.status_code == 200
    assert listed(response) == {wanted.pk}


# --- Reading a run ------------------------------------------------------------------------


def test_the_run_page_shows_its_events_inline_and_nothing_editable(admin_client, launch, bob):
    run = stuck_stopping(launch("read me sim:duration=30"), bob)
    response = admin_client.get(change_url(run))
    assert response.status_code == 200
    html = response.content.decode()
    assert "read me sim:duration=30" in html
    assert "Launched on Fay." in html
    assert "too slow" in html  # the stop_requested event's message
    assert 'class="rb-badge rb-badge-stopping"' in html
    fields = ("prompt", "status", "external_id", "created_at", "stop_reason", "events-0-message")
    for name in fields:
        assert f'name="{name}"' not in html, name
    assert 'name="_save"' not in html
    assert "<textarea" not in html
    # What the page does offer is the two run actions, scoped to this run.
    assert '<option value="stop_selected">Stop this run</option>' in html
    assert '<option value="force_mark_stopped">Force mark stopped</option>' in html


def test_runs_cannot_be_added_or_changed_by_posting(admin_client, launch):
    run = launch("unchanged")
    assert admin_client.get(reverse("admin:runs_run_add")).status_code == 403
    response = admin_client.post(change_url(run), {"prompt": "edited", "status": "completed"})
    assert response.status_code == 403
    run.refresh_from_db()
    assert (run.prompt, run.status) == ("unchanged", Status.PENDING)


def test_only_superusers_may_delete_and_view_only_staff_get_no_actions(
    client, admin_client, django_user_model, launch
):
    launch()

    def action_names(c) -> list[str]:
        form = c.get(CHANGELIST).context["action_form"]
        return [] if form is None else [v for v, _ in form.fields["action"].choices if v]

    assert action_names(admin_client) == ["delete_selected", "stop_selected", "force_mark_stopped"]
    operator = django_user_model.objects.create_user("operator", is_staff=True)
    operator.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_run", "change_run", "delete_run"])
    )
    client.force_login(operator)
    assert action_names(client) == ["stop_selected", "force_mark_stopped"]
    watcher = django_user_model.objects.create_user("watcher", is_staff=True)
    watcher.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(watcher)
    assert action_names(client) == []


def test_view_only_staff_cannot_stop_by_posting_the_action(client, django_user_model, launch):
    run = launch()
    watcher = django_user_model.objects.create_user("watcher", is_staff=True)
    watcher.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(watcher)
    client.post(CHANGELIST, {"action": "stop_selected", "_selected_action": [run.pk], "index": 0})
    run.refresh_from_db()
    assert run.status == Status.PENDING
    assert not run.events.filter(kind=RunEvent.Kind.STOP_REQUESTED).exists()


# --- Stop ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_stop_stops_at_the_provider_and_reports_each_outcome(admin_client, admin_user, launch, sim):
    # The superuser is in no team: the admin's stop is not scoped by memberships.
    running = start_at_provider(launch("long sim:pending=0 sim:duration=60"))
    done = launch("short")
    done.mark_completed(proof="status_read", output="done")
    response = admin_client.post(
        CHANGELIST,
        {
            "action": "stop_selected",
            "_selected_action": [running.pk, done.pk],
            "index": 0,
            "reason": "runaway spend",
        },
    )
    assert response.status_code == 302
    assert response["Location"] == CHANGELIST
    assert notes(response) == [
        (
            "success",
            f"Stopped 1 run, confirmed by the provider: #{running.pk} "
            "(Confirmed by Fay's stop answer).",
        ),
        (
            "info",
            f"Already finished, nothing to stop for 1 run: #{done.pk} "
            "(This run already completed; there is nothing left to stop).",
        ),
    ]
    running.refresh_from_db()
    assert running.status == Status.STOPPED
    assert (running.stop_channel, running.stop_requested_by, running.stop_reason) == (
        Channel.ADMIN,
        admin_user,
        "runaway spend",
    )
    event = running.events.get(kind=RunEvent.Kind.STOP_REQUESTED)
    assert (event.actor, event.channel) == (admin_user, Channel.ADMIN)
    done.refresh_from_db()
    assert done.status == Status.COMPLETED
    assert len(sim.stop_calls(running.external_id)) == 1


@pytest.mark.django_db(transaction=True)
def test_a_failed_stop_call_is_reported_with_the_providers_message(admin_client, launch, sim):
    run = start_at_provider(launch("x sim:pending=0 sim:duration=60 sim:stop=error"))
    response = admin_client.post(
        CHANGELIST, {"action": "stop_selected", "_selected_action": [run.pk], "index": 0}
    )
    [(level, text)] = notes(response)
    assert level == "error"
    assert text.startswith(f"The stop call failed for 1 run (Runbrake retries it): #{run.pk} (")
    assert "Fay had an internal error" in text
    run.refresh_from_db()
    assert run.status == Status.STOPPING
    assert run.stop_next_attempt_at is not None


def test_stop_from_the_runs_own_page_saves_the_stop_before_the_provider_names_the_run(
    admin_client, admin_user, launch
):
    run = launch()  # pending: the provider has not named it, so no call can go out yet
    response = admin_client.post(
        change_url(run),
        {
            "CHANGE_FORM-action": "stop_selected",
            "CHANGE_FORM-reason": "wrong prompt",
            "_selected_action": [run.pk],
        },
    )
    assert response.status_code == 302
    assert response["Location"] == change_url(run)
    assert notes(response) == [
        (
            "info",
            f"Stopping 1 run, awaiting provider confirmation: #{run.pk} "
            "(Not named by the provider yet; the stop goes out when it is).",
        )
    ]
    run.refresh_from_db()
    assert run.status == Status.STOPPING
    assert (run.stop_channel, run.stop_requested_by, run.stop_reason) == (
        Channel.ADMIN,
        admin_user,
        "wrong prompt",
    )


# --- Force mark stopped -------------------------------------------------------------------


def test_force_mark_asks_for_a_reason_first_and_changes_nothing(admin_client, launch, bob):
    stuck = stuck_stopping(launch(), bob)
    running = launch()
    running.mark_running("PROCESSING")
    response = admin_client.post(
        CHANGELIST,
        {"action": "force_mark_stopped", "_selected_action": [stuck.pk, running.pk], "index": 0},
    )
    assert response.status_code == 200
    assert response.templates[0].name == "admin/runs/run/force_mark_stopped.html"
    html = response.content.decode()
    assert '<textarea name="reason"' in html
    assert 'name="apply" value="yes"' in html
    assert "Force mark 1 run stopped" in html
    assert f"#{running.pk}</a>" in html.split("Skipped: not stuck in a stop")[1]
    stuck.refresh_from_db()
    running.refresh_from_db()
    assert (stuck.status, running.status) == (Status.STOPPING, Status.RUNNING)
    assert not RunEvent.objects.filter(kind=RunEvent.Kind.FORCED_STOP).exists()


def test_force_mark_without_a_reason_is_refused_on_the_page(admin_client, launch, bob):
    stuck = stuck_stopping(launch(), bob)
    response = admin_client.post(
        CHANGELIST,
        {
            "action": "force_mark_stopped",
            "_selected_action": [stuck.pk],
            "apply": "yes",
            "reason": "   ",
        },
    )
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    stuck.refresh_from_db()
    assert stuck.status == Status.STOPPING


def test_force_mark_with_a_reason_stops_a_stuck_run_and_skips_a_running_one(
    admin_client, admin_user, launch, bob
):
    stuck = stuck_stopping(launch(), bob)
    running = launch()
    running.mark_running("PROCESSING")
    response = admin_client.post(
        CHANGELIST,
        {
            "action": "force_mark_stopped",
            "_selected_action": [stuck.pk, running.pk],
            "apply": "yes",
            "reason": "Fay support confirmed it is dead",
        },
    )
    assert response.status_code == 302
    assert notes(response) == [
        (
            "success",
            f"Force-marked 1 run stopped without provider confirmation: #{stuck.pk}.",
        ),
        ("warning", f"Skipped 1 run not stuck in a stop: #{running.pk} (running)."),
    ]
    stuck.refresh_from_db()
    assert stuck.status == Status.STOPPED
    assert "Fay support confirmed it is dead" in stuck.stop_confirmation
    event = stuck.events.get(kind=RunEvent.Kind.FORCED_STOP)
    assert (event.actor, event.channel) == (admin_user, Channel.ADMIN)
    assert "Fay support confirmed it is dead" in event.message
    running.refresh_from_db()
    assert running.status == Status.RUNNING
    assert not running.events.filter(kind=RunEvent.Kind.FORCED_STOP).exists()


def test_force_mark_on_only_running_runs_says_there_is_nothing_to_do(admin_client, launch):
    running = launch()
    running.mark_running("PROCESSING")
    response = admin_client.post(
        CHANGELIST,
        {"action": "force_mark_stopped", "_selected_action": [running.pk], "index": 0},
    )
    assert response.status_code == 302
    [(level, text)] = notes(response)
    assert level == "warning"
    assert text.startswith("Nothing to force-mark")
    running.refresh_from_db()
    assert running.status == Status.RUNNING


def test_force_mark_from_an_unconfirmed_runs_own_page(admin_client, admin_user, launch, bob):
    run = stuck_stopping(launch(), bob)
    assert run.mark_stop_unconfirmed()
    ask = admin_client.post(
        change_url(run),
        {"CHANGE_FORM-action": "force_mark_stopped", "_selected_action": [run.pk]},
    )
    assert ask.status_code == 200
    html = ask.content.decode()
    assert 'name="CHANGE_FORM-action" value="force_mark_stopped"' in html
    assert '<textarea name="CHANGE_FORM-reason"' in html
    response = admin_client.post(
        change_url(run),
        {
            "CHANGE_FORM-action": "force_mark_stopped",
            "CHANGE_FORM-reason": "provider outage, run is gone",
            "_selected_action": [run.pk],
            "apply": "yes",
        },
    )
    assert response.status_code == 302
    assert response["Location"] == change_url(run)
    run.refresh_from_db()
    assert run.status == Status.STOPPED
    event = run.events.get(kind=RunEvent.Kind.FORCED_STOP)
    assert (event.from_status, event.actor, event.channel) == (
        Status.STOP_UNCONFIRMED,
        admin_user,
        Channel.ADMIN,
    )


# --- Provider accounts and teams ------------------------------------------------------------


def test_provider_account_pages_never_contain_the_plaintext_key(admin_client, fay_account):
    listing = admin_client.get(reverse("admin:runs_provideraccount_changelist"))
    page = admin_client.get(reverse("admin:runs_provideraccount_change", args=[fay_account.pk]))
    for response in (listing, page):
        assert response.status_code == 200
        html = response.content.decode()
        assert "sim-acme-fay-key" not in html
        assert "••••-key" in html
    assert 'type="password" name="api_key"' in page.content.decode()
    assert admin_client.get(reverse("admin:runs_provideraccount_add")).status_code == 200


def test_saving_an_account_with_a_blank_key_keeps_it_and_a_new_key_replaces_it(
    admin_client, fay_account, acme
):
    url = reverse("admin:runs_provideraccount_change", args=[fay_account.pk])
    form = {
        "team": acme.pk,
        "kind": "fay",
        "name": "Fay renamed",
        "base_url": fay_account.base_url,
        "options": json.dumps(fay_account.options),
        "api_key": "",
    }
    assert admin_client.post(url, form).status_code == 302
    fay_account.refresh_from_db()
    assert (fay_account.name, fay_account.api_key) == ("Fay renamed", "sim-acme-fay-key")
    assert admin_client.post(url, {**form, "api_key": "sim-new-fay-key"}).status_code == 302
    fay_account.refresh_from_db()
    assert fay_account.api_key == "sim-new-fay-key"


def test_the_team_page_has_its_memberships_inline(admin_client, acme, alice, bob, carol):
    response = admin_client.get(reverse("admin:runs_team_change", args=[acme.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="memberships-TOTAL_FORMS" value="3"' in html
    for username in ("alice", "bob", "carol"):
        assert f">{username}</option>" in html
    assert '<option value="viewer" selected>Viewer</option>' in html
    listing = admin_client.get(reverse("admin:runs_team_changelist"))
    assert listing.status_code == 200
    assert listing.context["cl"].result_list[0].member_total == 3


def test_a_running_run_cannot_be_deleted_from_the_admin(admin_client, launch):
    run = launch()
    response = admin_client.get(f"/admin/runs/run/{run.pk}/delete/")
    assert response.status_code == 403
    admin_client.post(
        "/admin/runs/run/",
        {"action": "delete_selected", "_selected_action": [run.pk], "post": "yes"},
    )
    assert Run.objects.filter(pk=run.pk).exists()


# --- Following a stop -----------------------------------------------------------------------

OUTCOMES_URL = reverse("admin:runs_run_outcomes")


@pytest.mark.django_db(transaction=True)
def test_a_stop_not_yet_confirmed_is_a_message_the_page_follows(admin_client, launch, sim):
    run = start_at_provider(launch("sim:pending=0 sim:duration=60 sim:stop=error"))
    response = admin_client.post(
        CHANGELIST, {"action": "stop_selected", "_selected_action": [run.pk], "index": 0}
    )
    page = admin_client.get(response.url).content.decode()
    assert f'data-follow-runs="{run.pk}"' in page
    assert f'data-follow-url="{OUTCOMES_URL}"' in page
    assert "js/admin.js" in page


def test_the_followed_outcomes_say_where_each_run_stands(admin_client, launch, bob):
    stopping = stuck_stopping(launch("a"), bob)
    stopped = stuck_stopping(launch("b"), bob)
    stopped.mark_stopped(confirmation="stop answer", proof="stop_answer")
    answer = admin_client.get(OUTCOMES_URL, {"ids": f"{stopping.pk},{stopped.pk}"}).json()
    cells = [run.pop("cells") for run in answer["runs"]]
    assert [c["status_badge"] for c in cells] == [
        '<span class="rb-badge rb-badge-stopping">Stopping…</span>',
        '<span class="rb-badge rb-badge-stopped">Stopped</span>',
    ]
    assert "awaiting the provider" in cells[0]["stop_summary"]
    assert answer["runs"] == [
        {
            "id": stopping.pk,
            "status": "stopping",
            "settled": False,
            "text": f"#{stopping.pk} stopping",
        },
        {
            "id": stopped.pk,
            "status": "stopped",
            "settled": True,
            "text": f"#{stopped.pk} stopped, confirmed by the provider's answer to the stop call",
        },
    ]


@pytest.mark.parametrize("ids", ["", "x", "1,,2", "²", str(2**64)])
def test_followed_outcomes_refuse_ids_that_are_not_ids(admin_client, ids):
    response = admin_client.get(OUTCOMES_URL, {"ids": ids})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_followed_outcomes_are_for_staff_who_may_view_runs(client, django_user_model, launch):
    run = launch()
    assert client.get(OUTCOMES_URL, {"ids": run.pk}).status_code == 302  # to the admin login
    client.force_login(django_user_model.objects.create_user("clerk", is_staff=True))
    response = client.get(OUTCOMES_URL, {"ids": run.pk})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "FORBIDDEN"
