"""Shared team work: the role matrix, bulk stop, stop reasons, run again, filtered live lists."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from django.urls import reverse

from runs.models import ApiToken, Channel, Run, Status
from tests.conftest import start_at_provider
from tests.sockets import websocket

HTMX: dict[str, Any] = {"HTTP_HX_REQUEST": "true"}


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- The permission matrix --------------------------------------------------------------------
# Rows: who. Columns: what. Each cell is the HTTP status (or socket outcome) the product gives.

MATRIX = {
    #            list  page  launch  stop_own  stop_mate  bulk  api_get  api_stop_mate
    "alice": (200, 200, 200, 200, 200, 200, 200, 409),  # admin
    "bob": (200, 200, 200, 200, 200, 200, 200, 409),  # member (team lets members stop others)
    "carol": (200, 200, 403, None, 403, 403, 200, 403),  # viewer (owns nothing)
    "mallory": (404, 404, 404, 404, 404, 404, 404, 404),  # another team
}


@pytest.mark.parametrize("who", list(MATRIX))
def test_each_role_gets_what_the_matrix_says(
    who, request, acme, fay_account, launch, alice, bob, carol, mallory
):
    user = request.getfixturevalue(who)
    expected = dict(
        zip(
            ["list", "page", "launch", "stop_own", "stop_mate", "bulk", "api_get", "api_stop_mate"],
            MATRIX[who],
            strict=True,
        )
    )
    own = launch("own", user=user) if who in ("alice", "bob") else launch("someone's")
    mate = launch("teammate's", user=alice if who != "alice" else bob)
    # Finished runs keep the stop path off the network: the answer is about permission.
    for run in (own, mate):
        run.mark_completed(proof="status_read", output="done")
    client = client_for(user)
    token = ApiToken.issue(user)
    got = {
        "list": client.get(reverse("runs:team", args=[acme.pk])).status_code,
        "page": client.get(mate.get_absolute_url()).status_code,
        "launch": client.post(
            reverse("runs:launch", args=[acme.pk]),
            {"provider_account": fay_account.pk, "prompt": "x", "timeout_seconds": 60},
            **HTMX,
        ).status_code,
        "stop_own": client.post(reverse("runs:stop", args=[own.pk]), **HTMX).status_code
        if who != "carol"
        else None,
        "stop_mate": client.post(reverse("runs:stop", args=[mate.pk]), **HTMX).status_code,
        "bulk": client.post(
            reverse("runs:bulk-stop", args=[acme.pk]),
            {"action": "preview", "ids": [mate.pk]},
            **HTMX,
        ).status_code,
        "api_get": client.get(
            reverse("runs:api-run", args=[mate.pk]), HTTP_AUTHORIZATION=f"Bearer {token}"
        ).status_code,
        "api_stop_mate": client.post(
            reverse("runs:api-stop", args=[mate.pk]),
            data="{}",
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        ).status_code,
    }
    # The runs are finished, so a permitted stop answers "already finished" (a toast on the
    # page, 409 in the API): past the permission check, refused for the right reason.
    assert got == expected


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("who", "allowed"), [("alice", True), ("bob", True), ("carol", True), ("mallory", False)]
)
async def test_the_team_socket_follows_the_role_matrix(
    who, allowed, acme, alice, bob, carol, mallory
):
    user = {"alice": alice, "bob": bob, "carol": carol, "mallory": mallory}[who]
    async with websocket(f"/ws/teams/{acme.pk}/", user) as (_, connected):
        assert connected is allowed


def test_a_team_can_keep_members_to_their_own_runs(acme, launch, alice, bob):
    acme.members_can_stop_others = False
    acme.save()
    alices = launch("alice's", user=alice)
    bobs = launch("bob's", user=bob)
    client = client_for(bob)
    refused = client.post(reverse("runs:stop", args=[alices.pk]), **HTMX)
    assert refused.status_code == 403
    alices.refresh_from_db()
    assert alices.status == Status.PENDING
    # His own run: allowed (pending, never sent: stopped without a provider call).
    assert client.post(reverse("runs:stop", args=[bobs.pk]), **HTMX).status_code == 200
    bobs.refresh_from_db()
    assert bobs.status == Status.STOPPING


# --- Bulk stop ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_bulk_stop_previews_then_reports_each_outcome(
    acme, launch, bob, alice, mallory, globex_account, sim
):
    running = start_at_provider(launch("long sim:pending=0 sim:duration=60"))
    finished = launch("done")
    finished.mark_completed(proof="status_read", output="x")
    foreign = launch("theirs", user=mallory, account=globex_account)
    client = client_for(bob)
    url = reverse("runs:bulk-stop", args=[acme.pk])
    ids = [running.pk, finished.pk, foreign.pk]

    preview = client.post(url, {"action": "preview", "ids": ids}, **HTMX).content.decode()
    assert "Stop 1 run?" in preview
    assert f"#{finished.pk} (completed)" in preview
    assert f"#{foreign.pk}" not in preview  # another team's id is not even named
    running.refresh_from_db()
    assert running.status == Status.RUNNING  # a preview changes nothing

    report = client.post(url, {"action": "confirm", "ids": ids, "reason": "too slow"}, **HTMX)
    html = report.content.decode()
    assert "Stopped" in html
    assert "Already finished" in html
    assert "Not found" in html
    running.refresh_from_db()
    assert running.status == Status.STOPPED
    assert running.stop_reason == "too slow"
    assert len(sim.stop_calls(running.external_id)) == 1
    foreign.refresh_from_db()
    assert foreign.status == Status.PENDING


def test_stop_all_running_is_the_teams_for_admins_and_ones_own_for_members(
    acme, launch, alice, bob
):
    alices, bobs = launch("a", user=alice), launch("b", user=bob)
    url = reverse("runs:bulk-stop", args=[acme.pk])
    member_view = client_for(bob).post(url, {"action": "preview", "scope": "all"}, **HTMX)
    assert f"#{bobs.pk}" in member_view.content.decode()
    assert f"#{alices.pk}" not in member_view.content.decode()
    admin_view = client_for(alice).post(url, {"action": "preview", "scope": "all"}, **HTMX)
    assert f"#{bobs.pk}" in admin_view.content.decode()
    assert f"#{alices.pk}" in admin_view.content.decode()


def test_bulk_stop_with_nothing_selected_says_what_to_do(acme, bob):
    response = client_for(bob).post(
        reverse("runs:bulk-stop", args=[acme.pk]), {"action": "preview"}, **HTMX
    )
    assert response.status_code == 204
    assert "Select at least one" in json.loads(response["HX-Trigger"])["toast"]["message"]


@pytest.mark.django_db(transaction=True)
def test_the_api_stops_many_with_per_run_outcomes(
    client, launch, bob, mallory, globex_account, sim
):
    running = start_at_provider(launch("long sim:pending=0 sim:duration=60"))
    finished = launch("done")
    finished.mark_completed(proof="status_read", output="x")
    foreign = launch("theirs", user=mallory, account=globex_account)
    token = ApiToken.issue(bob)
    response = client.post(
        reverse("runs:api-stop-many"),
        data=json.dumps({"ids": [running.pk, finished.pk, foreign.pk]}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert response.status_code == 200
    outcomes = {r["id"]: r["outcome"] for r in response.json()["results"]}
    assert outcomes == {
        running.pk: "stopped",
        finished.pk: "already_finished",
        foreign.pk: "not_found",
    }
    bad = client.post(
        reverse("runs:api-stop-many"),
        data=json.dumps({"ids": "all"}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "ids"


def test_the_api_stops_by_filter(client, launch, bob, alice):
    mine, theirs = launch("mine", user=bob), launch("theirs", user=alice)
    token = ApiToken.issue(bob)
    response = client.post(
        reverse("runs:api-stop-many"),
        data=json.dumps({"filter": {"mine": True}}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    assert [r["id"] for r in response.json()["results"]] == [mine.pk]
    theirs.refresh_from_db()
    assert theirs.status == Status.PENDING


# --- Stop reasons and run again -----------------------------------------------------------------


def test_a_one_click_reason_is_recorded_and_filterable(acme, launch, bob):
    run = launch()
    client = client_for(bob)
    client.post(reverse("runs:stop", args=[run.pk]), {"reason": ["wrong prompt", ""]}, **HTMX)
    run.refresh_from_db()
    assert run.stop_reason == "wrong prompt"
    assert run.events.get(kind="stop_requested").message == "wrong prompt"
    listed = client.get(reverse("runs:team", args=[acme.pk]) + "?reason=wrong").content.decode()
    assert f'id="run-row-{run.pk}"' in listed


def test_run_again_launches_the_same_prompt_and_options(launch, bob):
    run = launch("again please", structured_output=True, output_schema={"type": "object"})
    run.mark_completed(proof="status_read", output="x")
    response = client_for(bob).post(reverse("runs:again", args=[run.pk]), **HTMX)
    again = Run.objects.exclude(pk=run.pk).get()
    assert response["HX-Redirect"] == again.get_absolute_url()
    assert (again.prompt, again.options, again.status) == (run.prompt, run.options, "pending")
    assert again.created_by == bob


def test_a_viewer_cannot_run_again(launch, carol):
    run = launch()
    assert client_for(carol).post(reverse("runs:again", args=[run.pk])).status_code == 403
    assert Run.objects.count() == 1


# --- A filtered list keeps updating live and respects its filter -------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_filtered_socket_gets_matching_runs_and_loses_rows_that_leave(bob, acme, launch):
    running = await sync_to_async(launch)("keep me")
    async with websocket(f"/ws/teams/{acme.pk}/?status=pending", bob) as (communicator, connected):
        assert connected
        snapshot = await communicator.receive_from(timeout=5)
        assert f'id="run-row-{running.pk}"' in snapshot

        created = await sync_to_async(launch)("new and pending")
        assert f'id="run-row-{created.pk}"' in await communicator.receive_from(timeout=5)

        await sync_to_async(running.request_stop)(actor=bob, channel=Channel.BUTTON)
        removal = await communicator.receive_from(timeout=5)
        assert removal == f'<tr id="run-row-{running.pk}" hx-swap-oob="delete"></tr>'


@pytest.mark.django_db(transaction=True)
async def test_a_run_that_enters_the_filter_later_is_inserted(bob, acme, launch):
    async with websocket(f"/ws/teams/{acme.pk}/?status=running", bob) as (communicator, connected):
        assert connected
        await communicator.receive_from(timeout=5)  # the (empty) snapshot
        run = await sync_to_async(launch)("pending first")
        assert await communicator.receive_nothing(timeout=0.3)  # pending: not on this list
        await sync_to_async(run.mark_running)("PROCESSING")
        inserted = await communicator.receive_from(timeout=5)
        assert inserted.startswith('<tbody hx-swap-oob="afterbegin:#run-rows">')
        assert f'id="run-row-{run.pk}"' in inserted


def test_this_users_run_and_role_come_in_one_query_and_another_teams_run_is_none(
    acme, launch, alice, bob, carol, mallory, django_assert_num_queries
):
    """The stop path and every run page's socket start here (runs/access.py): the run, its
    team and the asking user's own role, from one query, in a team where every role is held."""
    from runs.access import run_and_membership

    run = launch("whose role?")
    for user, role in ((alice, "admin"), (bob, "member"), (carol, "viewer")):
        with django_assert_num_queries(1):
            found = run_and_membership(user, run.pk, "provider_account")
            assert found is not None
            got, membership = found
            assert (got.pk, membership.role, membership.user_id) == (run.pk, role, user.pk)
            assert membership.team.name == acme.name  # loaded with the run: no query
            assert got.provider_account.pk == run.provider_account_id
    assert run_and_membership(mallory, run.pk) is None
