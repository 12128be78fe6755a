"""Team pages: members and roles (who may see, who may change, the last-admin guard) and
provider accounts (admins only, keys write-only and masked, Test connection over real HTTP)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.urls import reverse

from runs.models import Membership, ProviderAccount, Role

HTMX: dict[str, Any] = {"HTTP_HX_REQUEST": "true"}


def toast_of(response) -> dict[str, Any]:
    toast = json.loads(response["HX-Trigger"])["toast"]
    # Fired on <body>, so it is shown even when the requesting form was replaced meanwhile.
    assert toast.pop("target") == "body"
    return toast


def members_url(team) -> str:
    return reverse("runs:members", args=[team.pk])


def accounts_url(team) -> str:
    return reverse("runs:accounts", args=[team.pk])


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    """Every test creates four users; the real hasher's deliberate slowness only costs time."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def cast(alice, bob, carol, mallory):
    return {"alice": alice, "bob": bob, "carol": carol, "mallory": mallory}


@pytest.fixture
def dave(db, password):
    """Has an account but no team yet."""
    return get_user_model().objects.create_user("dave", password=password)


def role_of(team, user) -> str | None:
    found = Membership.objects.filter(team=team, user=user).first()
    return found.role if found else None


# --- Members: who sees what ------------------------------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_every_member_sees_the_members_and_their_roles(client, cast, acme, who):
    client.force_login(cast[who])
    response = client.get(members_url(acme))
    assert response.status_code == 200
    html = response.content.decode()
    for name in ("alice", "bob", "carol"):
        assert f"<strong>{name}</strong>" in html
    assert "mallory" not in html
    assert 'aria-current="page">Members' in html
    admin_controls = 'name="action" value="add"' in html
    assert admin_controls is (who == "alice")
    if who != "alice":
        assert '<span class="role role-viewer">Viewer</span>' in html
        assert "Members stop their own runs" in html  # the setting, read-only


def test_the_list_shows_admins_first(client, cast, acme):
    client.force_login(cast["bob"])
    html = client.get(members_url(acme)).content.decode()
    assert html.index("<strong>alice</strong>") < html.index("<strong>bob</strong>")
    assert html.index("<strong>bob</strong>") < html.index("<strong>carol</strong>")


def test_another_teams_members_page_is_a_404(client, cast, acme):
    client.force_login(cast["mallory"])
    assert client.get(members_url(acme)).status_code == 404
    response = client.post(
        members_url(acme), {"action": "role", "member": "1", "role": "admin"}, **HTMX
    )
    assert response.status_code == 404
    assert role_of(acme, cast["mallory"]) is None


# --- Members: an admin's actions -------------------------------------------------------------


def test_an_admin_adds_an_existing_user_with_a_role_over_htmx(client, cast, acme, dave):
    client.force_login(cast["alice"])
    response = client.post(
        members_url(acme), {"action": "add", "username": "dave", "role": "viewer"}, **HTMX
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="members-panel"')
    assert "<strong>dave</strong>" in html
    assert toast_of(response) == {
        "level": "success",
        "message": "dave joined Acme Research as viewer.",
    }
    assert role_of(acme, dave) == Role.VIEWER


def test_adding_without_htmx_redirects_back_with_a_message(client, cast, acme, dave):
    client.force_login(cast["alice"])
    response = client.post(
        members_url(acme), {"action": "add", "username": "dave", "role": "member"}, follow=True
    )
    assert response.redirect_chain == [(members_url(acme), 302)]
    assert "dave joined Acme Research as member." in response.content.decode()
    assert role_of(acme, dave) == Role.MEMBER


@pytest.mark.parametrize(
    ("username", "error"),
    [
        ("nobody", "There is no user named “nobody”"),
        ("bob", "bob is already a member of Acme Research (member)."),
        ("mallory", None),  # exists elsewhere: joining a second team is allowed
    ],
)
def test_adding_an_unknown_user_or_a_member_is_an_error_in_place(
    client, cast, acme, username, error
):
    client.force_login(cast["alice"])
    response = client.post(
        members_url(acme), {"action": "add", "username": username, "role": "admin"}, **HTMX
    )
    assert response.status_code == 200
    html = response.content.decode()
    if error is None:
        assert toast_of(response)["level"] == "success"
        assert role_of(acme, cast["mallory"]) == Role.ADMIN
        return
    assert error in html
    assert 'class="field invalid"' in html
    assert f'value="{username}"' in html  # what was typed is kept
    assert toast_of(response)["level"] == "error"
    assert role_of(acme, cast["bob"]) == Role.MEMBER
    assert Membership.objects.filter(team=acme).count() == 3


def test_an_unknown_user_without_htmx_shows_the_page_with_the_error(client, cast, acme):
    client.force_login(cast["alice"])
    response = client.post(members_url(acme), {"action": "add", "username": "nobody"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "There is no user named “nobody”" in html
    assert "<h1>Acme Research" in html
    assert Membership.objects.filter(team=acme).count() == 3


def test_an_admin_changes_a_role(client, cast, acme):
    bob = cast["bob"]
    client.force_login(cast["alice"])
    member = Membership.objects.get(team=acme, user=bob)
    response = client.post(
        members_url(acme), {"action": "role", "member": member.pk, "role": "viewer"}, **HTMX
    )
    assert response.status_code == 200
    assert '<option value="viewer" selected>' in response.content.decode()
    assert toast_of(response) == {"level": "success", "message": "bob is now viewer."}
    assert role_of(acme, bob) == Role.VIEWER


def test_an_admin_removes_a_member(client, cast, acme):
    carol = cast["carol"]
    client.force_login(cast["alice"])
    member = Membership.objects.get(team=acme, user=carol)
    response = client.post(members_url(acme), {"action": "remove", "member": member.pk}, **HTMX)
    assert response.status_code == 200
    assert "<strong>carol</strong>" not in response.content.decode()
    assert toast_of(response)["message"] == "carol was removed from Acme Research."
    assert role_of(acme, carol) is None
    assert get_user_model().objects.filter(username="carol").exists()  # only the membership


def test_an_admin_cannot_reach_another_teams_membership(client, cast, acme, globex):
    client.force_login(cast["alice"])
    theirs = Membership.objects.get(team=globex, user=cast["mallory"])
    response = client.post(members_url(acme), {"action": "remove", "member": theirs.pk}, **HTMX)
    assert response.status_code == 200
    assert "no longer in the team" in toast_of(response)["message"]
    assert role_of(globex, cast["mallory"]) == Role.ADMIN


def test_an_admin_toggles_whether_members_stop_teammates_runs(client, cast, acme, launch):
    alice, bob = cast["alice"], cast["bob"]
    alices_run = launch(user=alice)
    client.force_login(alice)

    response = client.post(members_url(acme), {"action": "settings"}, **HTMX)  # box unticked
    assert toast_of(response)["message"] == "Members can now stop only the runs they launched."
    assert 'name="members_can_stop_others"' in response.content.decode()
    acme.refresh_from_db()
    assert acme.members_can_stop_others is False
    bobs = Membership.objects.select_related("team").get(team=acme, user=bob)
    assert not bobs.can_stop(alices_run)

    client.post(members_url(acme), {"action": "settings", "members_can_stop_others": "on"})
    acme.refresh_from_db()
    assert acme.members_can_stop_others is True
    bobs = Membership.objects.select_related("team").get(team=acme, user=bob)
    assert bobs.can_stop(alices_run)


def test_an_unknown_action_is_a_readable_400(client, cast, acme):
    client.force_login(cast["alice"])
    response = client.post(members_url(acme), {"action": "promote-everyone"}, **HTMX)
    assert response.status_code == 400
    assert "reload it" in toast_of(response)["message"]


# --- Members: who may not act ----------------------------------------------------------------


@pytest.mark.parametrize("who", ["bob", "carol"])
@pytest.mark.parametrize(
    "post",
    [
        {"action": "add", "username": "dave", "role": "admin"},
        {"action": "role", "role": "admin"},
        {"action": "remove"},
        {"action": "settings"},
    ],
    ids=["add", "role", "remove", "settings"],
)
def test_members_and_viewers_cannot_change_the_team(client, cast, acme, dave, who, post):
    client.force_login(cast[who])
    alices = Membership.objects.get(team=acme, user=cast["alice"])
    response = client.post(members_url(acme), {"member": alices.pk, **post}, **HTMX)
    assert response.status_code == 403
    assert response["HX-Reswap"] == "none"
    assert "Only team admins" in toast_of(response)["message"]
    assert role_of(acme, dave) is None
    assert role_of(acme, cast["alice"]) == Role.ADMIN
    assert role_of(acme, cast[who]) in (Role.MEMBER, Role.VIEWER)
    acme.refresh_from_db()
    assert acme.members_can_stop_others is True


def test_a_refused_post_without_htmx_is_a_readable_page(client, cast, acme, dave):
    client.force_login(cast["bob"])
    response = client.post(members_url(acme), {"action": "add", "username": "dave"})
    assert response.status_code == 403
    assert "Only team admins can add or remove members" in response.content.decode()
    assert role_of(acme, dave) is None


# --- Members: the last admin -----------------------------------------------------------------


@pytest.mark.parametrize(
    "post", [{"action": "role", "role": "member"}, {"action": "remove"}], ids=["demote", "remove"]
)
def test_the_last_admin_cannot_be_demoted_or_removed(client, cast, acme, post):
    alice = cast["alice"]
    client.force_login(alice)
    own = Membership.objects.get(team=acme, user=alice)
    response = client.post(members_url(acme), {"member": own.pk, **post}, **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert "The team&#x27;s last admin cannot be removed or demoted." in html
    toast = toast_of(response)
    assert toast["level"] == "error"
    assert "alice is the last admin of Acme Research" in toast["message"]
    assert role_of(acme, alice) == Role.ADMIN


def test_the_last_admin_guard_without_htmx_answers_the_page_with_the_error(client, cast, acme):
    alice = cast["alice"]
    client.force_login(alice)
    own = Membership.objects.get(team=acme, user=alice)
    response = client.post(members_url(acme), {"action": "remove", "member": own.pk})
    assert response.status_code == 400
    assert "last admin cannot be removed or demoted" in response.content.decode()
    assert role_of(acme, alice) == Role.ADMIN


def test_with_a_second_admin_an_admin_may_step_down_and_loses_the_controls(client, cast, acme):
    alice, bob = cast["alice"], cast["bob"]
    Membership.objects.filter(team=acme, user=bob).update(role=Role.ADMIN)
    client.force_login(alice)
    own = Membership.objects.get(team=acme, user=alice)
    response = client.post(
        members_url(acme), {"action": "role", "member": own.pk, "role": "member"}, **HTMX
    )
    assert toast_of(response)["message"] == "alice is now member."
    assert 'name="action" value="add"' not in response.content.decode()
    assert role_of(acme, alice) == Role.MEMBER
    # Now bob is the only admin, and the guard protects him in turn.
    bobs = Membership.objects.get(team=acme, user=bob)
    client.force_login(bob)
    client.post(members_url(acme), {"action": "role", "member": bobs.pk, "role": "viewer"})
    assert role_of(acme, bob) == Role.ADMIN


def test_an_admin_who_leaves_is_sent_home(client, cast, acme):
    alice, bob = cast["alice"], cast["bob"]
    Membership.objects.filter(team=acme, user=bob).update(role=Role.ADMIN)
    client.force_login(alice)
    own = Membership.objects.get(team=acme, user=alice)
    response = client.post(members_url(acme), {"action": "remove", "member": own.pk}, **HTMX)
    assert response.status_code == 200
    assert response["HX-Redirect"] == reverse("runs:home")
    assert role_of(acme, alice) is None
    assert client.get(members_url(acme)).status_code == 404


# --- Provider accounts -----------------------------------------------------------------------


def stored_ciphertext(account) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM runs_provideraccount WHERE id = %s", [account.pk])
        return cursor.fetchone()[0]


def new_account(**fields) -> dict[str, Any]:
    return {
        "action": "create",
        "kind": "dify",
        "name": "Support bot",
        "base_url": "https://dify.example.com/v1",
        "api_key": "app-supersecret-123456",
        "options": '{"user": "helpdesk"}',
        **fields,
    }


def test_an_admin_sees_the_accounts_with_masked_keys_only(client, cast, acme, fay_account):
    client.force_login(cast["alice"])
    for url in (accounts_url(acme), accounts_url(acme) + f"?edit={fay_account.pk}"):
        response = client.get(url)
        assert response.status_code == 200
        html = response.content.decode()
        assert "sim-acme-fay-key" not in html
        assert "••••-key" in html  # the masked key: its last four characters
        assert "Fay (deep research)" in html
        assert fay_account.base_url in html
        assert "{&quot;poll_interval&quot;: 0.1}" in html
    assert 'type="password"' in html
    assert 'name="api_key" autocomplete="new-password"' in html
    assert "Edit Fay" in html


def test_the_edit_form_alone_is_answered_to_htmx(client, cast, acme, fay_account):
    client.force_login(cast["alice"])
    response = client.get(accounts_url(acme) + f"?edit={fay_account.pk}", **HTMX)
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="account-form-card"')
    assert f'name="account" value="{fay_account.pk}"' in html
    assert "sim-acme-fay-key" not in html


@pytest.mark.parametrize("who", ["bob", "carol"])
def test_members_and_viewers_are_refused_the_accounts_page(client, cast, acme, fay_account, who):
    client.force_login(cast[who])
    response = client.get(accounts_url(acme))
    assert response.status_code == 403
    html = response.content.decode()
    assert "Only team admins can see and manage the team&#x27;s provider accounts." in html
    assert "sim-acme" not in html
    response = client.post(accounts_url(acme), new_account(), **HTMX)
    assert response.status_code == 403
    response = client.post(
        accounts_url(acme),
        new_account(action="edit", account=fay_account.pk, api_key="stolen"),
        **HTMX,
    )
    assert response.status_code == 403
    assert ProviderAccount.objects.get().api_key == "sim-acme-fay-key"


def test_another_teams_accounts_are_a_404(client, cast, acme, fay_account):
    client.force_login(cast["mallory"])
    assert client.get(accounts_url(acme)).status_code == 404
    assert client.post(accounts_url(acme), new_account()).status_code == 404
    assert client.post(check_url(fay_account), **HTMX).status_code == 404


def test_an_admin_adds_an_account_over_htmx(client, cast, acme):
    client.force_login(cast["alice"])
    response = client.post(accounts_url(acme), new_account(), **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert response["HX-Retarget"] == "#accounts-panel"
    assert "Support bot" in html
    assert "••••3456" in html
    assert "app-supersecret-123456" not in html
    assert toast_of(response)["level"] == "success"
    account = ProviderAccount.objects.get(team=acme)
    assert (account.kind, account.name, account.base_url, account.options) == (
        "dify",
        "Support bot",
        "https://dify.example.com/v1",
        {"user": "helpdesk"},
    )
    assert account.api_key == "app-supersecret-123456"
    assert "supersecret" not in stored_ciphertext(account)  # encrypted at rest


def test_adding_without_htmx_redirects_with_a_message(client, cast, acme):
    client.force_login(cast["alice"])
    response = client.post(accounts_url(acme), new_account(), follow=True)
    assert response.redirect_chain == [(accounts_url(acme), 302)]
    html = response.content.decode()
    assert "Added Support bot." in html
    assert "app-supersecret-123456" not in html
    assert ProviderAccount.objects.filter(team=acme, name="Support bot").exists()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"base_url": "ftp://files.example.com/"}, "must start with http:// or https://"),
        ({"base_url": "not a url"}, "Enter a valid URL."),
        ({"options": "[1, 2]"}, "must be a JSON object"),
        ({"options": "{nope"}, "This is not valid JSON"),
        ({"api_key": ""}, "The provider&#x27;s API key is required."),
        ({"kind": "openai"}, "Select a valid choice."),
        ({"name": "Fay"}, "Acme Research already has an account named Fay."),
    ],
)
def test_account_errors_are_shown_in_place_and_the_key_is_not_echoed(
    client, cast, acme, fay_account, fields, error
):
    client.force_login(cast["alice"])
    response = client.post(accounts_url(acme), new_account(**fields), **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<section id="account-form-card"')
    assert error in html
    assert 'class="field invalid"' in html
    assert "app-supersecret-123456" not in html  # a typed key is not put back into the page
    if fields.get("api_key") != "":
        assert "Type the key again" in html
    assert toast_of(response)["level"] == "error"
    assert list(ProviderAccount.objects.values_list("name", flat=True)) == ["Fay"]


def test_an_invalid_account_without_htmx_answers_the_page_with_the_errors(client, cast, acme):
    client.force_login(cast["alice"])
    response = client.post(accounts_url(acme), new_account(options="[]"))
    assert response.status_code == 400
    html = response.content.decode()
    assert "must be a JSON object" in html
    assert "app-supersecret-123456" not in html
    assert not ProviderAccount.objects.exists()


def test_editing_with_a_blank_key_keeps_the_stored_key(client, cast, acme, fay_account):
    client.force_login(cast["alice"])
    before = stored_ciphertext(fay_account)
    response = client.post(
        accounts_url(acme),
        {
            "action": "edit",
            "account": fay_account.pk,
            "kind": "fay",
            "name": "Fay research",
            "base_url": fay_account.base_url,
            "api_key": "",
            "options": '{"poll_interval": 1}',
        },
        **HTMX,
    )
    assert response.status_code == 200
    assert toast_of(response) == {"level": "success", "message": "Saved Fay research."}
    assert "sim-acme-fay-key" not in response.content.decode()
    account = ProviderAccount.objects.get(pk=fay_account.pk)
    assert (account.name, account.options) == ("Fay research", {"poll_interval": 1})
    assert account.api_key == "sim-acme-fay-key"
    assert stored_ciphertext(account) == before  # not even re-encrypted


def test_editing_with_a_new_key_replaces_it(client, cast, acme, fay_account):
    client.force_login(cast["alice"])
    response = client.post(
        accounts_url(acme),
        {
            "action": "edit",
            "account": fay_account.pk,
            "kind": "fay",
            "name": "Fay",
            "base_url": fay_account.base_url,
            "api_key": "sim-rotated-key-2",
            "options": "",
        },
        follow=True,
    )
    assert "Saved Fay." in response.content.decode()
    assert "sim-rotated-key-2" not in response.content.decode()
    account = ProviderAccount.objects.get(pk=fay_account.pk)
    assert (account.api_key, account.options) == ("sim-rotated-key-2", {})
    assert "sim-rotated" not in stored_ciphertext(account)


def test_an_account_with_runs_keeps_its_provider(client, cast, acme, fay_account, launch):
    launch()
    client.force_login(cast["alice"])
    page = client.get(accounts_url(acme) + f"?edit={fay_account.pk}").content.decode()
    assert "This account has runs" in page
    client.post(
        accounts_url(acme),
        {
            "action": "edit",
            "account": fay_account.pk,
            "kind": "dify",
            "name": "Fay",
            "base_url": fay_account.base_url,
        },
    )
    assert ProviderAccount.objects.get(pk=fay_account.pk).kind == "fay"


@pytest.mark.parametrize("account", ["999999", "abc", ""])
def test_editing_a_missing_account_is_a_404(client, cast, acme, account):
    client.force_login(cast["alice"])
    response = client.post(accounts_url(acme), new_account(action="edit", account=account))
    assert response.status_code == 404


def test_another_teams_account_cannot_be_edited(client, cast, acme, globex_account):
    client.force_login(cast["alice"])
    response = client.post(
        accounts_url(acme), new_account(action="edit", account=globex_account.pk, api_key="x")
    )
    assert response.status_code == 404
    assert client.get(accounts_url(acme) + f"?edit={globex_account.pk}").status_code == 404
    assert ProviderAccount.objects.get(pk=globex_account.pk).api_key == "sim-globex-fay-key"


# --- Test connection (real HTTP to the simulators) --------------------------------------------


def check_url(account) -> str:
    return reverse("runs:account-test", args=[account.team_id, account.pk])


def test_test_connection_reports_the_providers_answer_inline(client, cast, fay_account, sim):
    client.force_login(cast["alice"])
    response = client.post(check_url(fay_account), **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.startswith(f'<div id="account-test-{fay_account.pk}" class="test-result ok"')
    assert "Fay answered and accepted the key." in html
    assert toast_of(response) == {
        "level": "success",
        "message": "Fay: Fay answered and accepted the key.",
    }
    calls = [r for r in sim.requests("fay") if r["path"].endswith("/status")]
    assert calls, "the check reached the simulator"


def test_test_connection_with_a_bad_key_says_so(client, cast, acme, sim):
    account = ProviderAccount.objects.create(
        team=acme, kind="fay", name="Wrong key", base_url=f"{sim.url}/sim/fay/api/v1", api_key="bad"
    )
    client.force_login(cast["alice"])
    response = client.post(check_url(account), **HTMX)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'class="test-result failed"' in html
    assert "Fay refused the API key" in html
    toast = toast_of(response)
    assert toast["level"] == "error"
    assert toast["message"].startswith("Wrong key: Fay refused the API key")


def test_test_connection_to_nowhere_is_an_error_not_a_crash(client, cast, acme):
    from tests.conftest import free_port

    account = ProviderAccount.objects.create(
        team=acme,
        kind="fay",
        name="Down",
        base_url=f"http://127.0.0.1:{free_port()}/api/v1",
        api_key="sim-x-key",
    )
    client.force_login(cast["alice"])
    response = client.post(check_url(account), **HTMX)
    assert "Could not connect to Fay" in response.content.decode()
    assert toast_of(response)["level"] == "error"


def test_test_connection_without_htmx_redirects_with_the_answer(client, cast, fay_account, sim):
    client.force_login(cast["alice"])
    response = client.post(check_url(fay_account), follow=True)
    assert response.redirect_chain == [(accounts_url(fay_account.team), 302)]
    assert "Fay: Fay answered and accepted the key." in response.content.decode()


@pytest.mark.parametrize("htmx", [True, False], ids=["htmx", "plain"])
def test_test_connection_by_a_member_is_refused(client, cast, fay_account, sim, htmx):
    before = len(sim.requests("fay"))
    client.force_login(cast["bob"])
    response = client.post(check_url(fay_account), **(HTMX if htmx else {}))
    assert response.status_code == 403
    if htmx:
        assert toast_of(response)["message"] == "Only team admins can test connections."
    else:
        assert "Only team admins can test connections." in response.content.decode()
    assert len(sim.requests("fay")) == before  # the provider was never called


def test_test_connection_is_post_only(client, cast, fay_account):
    client.force_login(cast["alice"])
    assert client.get(check_url(fay_account)).status_code == 405


# --- Quotas and webhooks of an account --------------------------------------------------------


def account_post(account, **changes):
    return {
        "action": "edit",
        "account": account.pk,
        "kind": account.kind,
        "name": account.name,
        "base_url": account.base_url,
        "api_key": "",
        "options": "",
        **changes,
    }


def test_changing_the_base_url_requires_the_key_again(client, cast, acme, fay_account):
    """The stored key belongs to the host it was entered for: it is never sent elsewhere."""
    client.force_login(cast["alice"])
    response = client.post(
        accounts_url(acme), account_post(fay_account, base_url="https://evil.example/api"), **HTMX
    )
    assert "type the key again" in response.content.decode()
    account = ProviderAccount.objects.get(pk=fay_account.pk)
    assert account.base_url == fay_account.base_url
    response = client.post(
        accounts_url(acme),
        account_post(fay_account, base_url="https://fay.example/api/v1", api_key="sim-new-key"),
        **HTMX,
    )
    assert toast_of(response)["level"] == "success"
    account.refresh_from_db()
    assert (account.base_url, account.api_key) == ("https://fay.example/api/v1", "sim-new-key")


def test_an_admin_picks_a_documented_tier_or_custom_numbers(client, cast, acme, fay_account):
    client.force_login(cast["alice"])
    client.post(accounts_url(acme), account_post(fay_account, quota_tier="free"), **HTMX)
    fay_account.refresh_from_db()
    assert fay_account.limits == {
        "create": 10,
        "status": 100,
        "output": 50,
        "stop": 20,
        "month": 100,
    }
    page = client.get(accounts_url(acme)).content.decode()
    assert "10 launches, 100 status reads, 50 output reads and 20 stop calls an hour" in page
    assert "100 calls a month" in page
    client.post(
        accounts_url(acme),
        account_post(fay_account, quota_tier="custom", quota_status="500", quota_stop="40"),
        **HTMX,
    )
    fay_account.refresh_from_db()
    assert fay_account.limits == {"status": 500, "stop": 40}
    empty = client.post(accounts_url(acme), account_post(fay_account, quota_tier="custom"), **HTMX)
    assert "at least one number" in empty.content.decode()


def test_only_fay_has_documented_tiers_and_webhooks(client, cast, acme, sim):
    from tests.conftest import sim_account

    dify = sim_account(acme, sim, "dify")
    client.force_login(cast["alice"])
    response = client.post(
        accounts_url(acme), account_post(dify, quota_tier="pro", webhook_secret="x"), **HTMX
    )
    html = response.content.decode()
    assert "Only Fay documents free and pro quotas" in html
    assert "Only Fay sends webhooks" in html


def test_a_fay_account_shows_its_webhook_url_and_never_its_secret(client, cast, acme, fay_account):
    client.force_login(cast["alice"])
    client.post(
        accounts_url(acme), account_post(fay_account, webhook_secret="whsec_topsecret"), **HTMX
    )
    fay_account.refresh_from_db()
    assert fay_account.webhook_secret == "whsec_topsecret"
    page = client.get(accounts_url(acme)).content.decode()
    assert f"http://testserver/hooks/fay/{fay_account.webhook_token}" in page
    assert "Receiving Fay's webhooks" in page
    assert "whsec_topsecret" not in page
    # Blank keeps it; the box forgets it.
    client.post(accounts_url(acme), account_post(fay_account), **HTMX)
    fay_account.refresh_from_db()
    assert fay_account.webhook_secret == "whsec_topsecret"
    client.post(accounts_url(acme), account_post(fay_account, forget_webhook_secret="on"), **HTMX)
    fay_account.refresh_from_db()
    assert fay_account.webhook_secret == ""
