"""The team dashboard: counts per provider and status inside the period only, stop latency
percentiles, how stops were confirmed, time saved against the usual run length, who may look,
and the period switch."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from runs.models import ProviderAccount, Run, Status
from runs.web.dashboard import parse_period, percentile

NOWHERE = "http://127.0.0.1:9/unused"  # nothing is sent: no watcher runs in these tests


@pytest.fixture
def fay(acme):
    return ProviderAccount.objects.create(
        team=acme, kind="fay", name="Fay", base_url=NOWHERE, api_key="sim-acme-fay"
    )


@pytest.fixture
def dify(acme):
    return ProviderAccount.objects.create(
        team=acme, kind="dify", name="Dify", base_url=NOWHERE, api_key="sim-acme-dify"
    )


@pytest.fixture
def as_bob(client, bob):
    client.force_login(bob)
    return client


@pytest.fixture
def now():
    return timezone.now()


@pytest.fixture
def make_run(bob):
    """A launched run whose status and timestamps are then set directly, as history."""

    def _make(account, **fields) -> Run:
        run = Run.objects.launch(
            account=account, user=bob, prompt="A question", options={}, timeout_seconds=600
        )
        Run.objects.filter(pk=run.pk).update(**fields)
        return Run.objects.get(pk=run.pk)

    return _make


def completed(make_run, account, created, seconds):
    return make_run(
        account,
        status=Status.COMPLETED,
        created_at=created,
        started_at=created,
        finished_at=created + dt.timedelta(seconds=seconds),
    )


def stopped(make_run, account, requested, latency_ms, proof="stop_answer", **extra):
    fields = {
        "status": Status.STOPPED,
        "created_at": requested - dt.timedelta(seconds=5),
        "started_at": requested - dt.timedelta(seconds=5),
        "stop_requested_at": requested,
        "stop_confirmed_at": requested + dt.timedelta(milliseconds=latency_ms),
        "finished_at": requested + dt.timedelta(milliseconds=latency_ms),
        "proof": proof,
        **extra,
    }
    return make_run(account, **fields)


def dashboard(client, team, period=None):
    url = reverse("runs:dashboard", args=[team.pk])
    return client.get(url, {"period": period} if period else {})


def counts_of(response) -> dict[str, dict[str, int]]:
    statuses = [s for s, _ in response.context["statuses"]]
    return {
        row.provider: {s: n for s, n in zip(statuses, row.counts, strict=True) if n}
        for row in response.context["status_rows"]
    }


# --- Runs by status and provider --------------------------------------------------------------


def test_it_counts_runs_per_provider_and_status_inside_the_period_only(
    as_bob, acme, fay, dify, make_run, now
):
    hour_ago, two_days_ago, eight_days_ago = (now - dt.timedelta(hours=h) for h in (1, 48, 192))
    completed(make_run, fay, hour_ago, 60)
    completed(make_run, fay, hour_ago, 90)
    stopped(make_run, fay, hour_ago, 400)
    make_run(dify, status=Status.FAILED, created_at=hour_ago)
    make_run(dify, status=Status.RUNNING, created_at=hour_ago)
    completed(make_run, fay, two_days_ago, 60)  # in the week only
    completed(make_run, dify, eight_days_ago, 60)  # in neither

    day = dashboard(as_bob, acme)
    week = dashboard(as_bob, acme, "week")

    assert day.status_code == 200
    assert counts_of(day) == {
        "fay": {"completed": 2, "stopped": 1},
        "dify": {"running": 1, "failed": 1},
    }
    assert day.context["total_runs"] == 5
    assert counts_of(week) == {
        "fay": {"completed": 3, "stopped": 1},
        "dify": {"running": 1, "failed": 1},
    }
    html = day.content.decode()
    # The chart is inline SVG with one segment per status and provider; nothing remote.
    assert '<svg class="chart"' in html
    assert "<title>Fay: 2 completed</title>" in html
    assert "<title>Dify: 1 failed</title>" in html
    assert "<script" not in html.split("</head>")[1]
    assert "https://" not in html


def test_it_never_counts_another_teams_runs(as_bob, acme, globex, fay, make_run, now, mallory):
    theirs = ProviderAccount.objects.create(
        team=globex, kind="fay", name="Fay", base_url=NOWHERE, api_key="sim-globex-fay"
    )
    completed(make_run, fay, now - dt.timedelta(hours=1), 60)
    stopped(make_run, theirs, now - dt.timedelta(hours=1), 900)

    response = dashboard(as_bob, acme)

    assert counts_of(response) == {"fay": {"completed": 1}}
    assert response.context["total_stops"] == 0


# --- Stop latency and confirmation ------------------------------------------------------------


def test_it_computes_stop_latency_p50_and_p95_per_provider(as_bob, acme, fay, dify, make_run, now):
    requested = now - dt.timedelta(hours=2)
    for ms in range(100, 2001, 100):  # 20 stops: 100 ms, 200 ms, … 2000 ms
        stopped(make_run, fay, requested, ms)
    stopped(make_run, dify, requested, 300, "stream_end")
    # Asked to stop but never confirmed: no latency to count.
    make_run(fay, status=Status.STOP_UNCONFIRMED, stop_requested_at=requested)

    response = dashboard(as_bob, acme)

    rows = {row.provider: row for row in response.context["latency_rows"]}
    assert list(rows) == ["fay", "dify"]
    assert rows["fay"].stops == 20
    # Linear interpolation between ranks: p50 between 1000 and 1100, p95 at 1900 + 5% of 100.
    assert rows["fay"].p50_ms == pytest.approx(1050)
    assert rows["fay"].p95_ms == pytest.approx(1905)
    assert (rows["dify"].p50_ms, rows["dify"].p95_ms) == (pytest.approx(300), pytest.approx(300))
    html = response.content.decode()
    assert "<title>Fay: p50 1.05 s</title>" in html
    assert "<title>Dify: p95 300 ms</title>" in html


def test_it_groups_stops_by_how_they_were_confirmed(as_bob, acme, fay, dify, make_run, now):
    requested = now - dt.timedelta(hours=3)
    stopped(make_run, fay, requested, 200)
    stopped(make_run, fay, requested, 400)
    stopped(make_run, dify, requested, 900, "stream_end")
    # Force-marks carry the admin's reason in their sentence; their proof is one group.
    stopped(make_run, fay, requested, 20_000, "admin_force", stop_confirmation="force (stuck)")
    stopped(make_run, fay, requested, 40_000, "admin_force", stop_confirmation="force (gone)")
    make_run(fay, status=Status.STOPPING, created_at=requested, stop_requested_at=requested)

    response = dashboard(as_bob, acme)

    groups = [(r.label, r.stops, r.p50_ms) for r in response.context["confirmation_rows"]]
    assert groups == [
        ("an admin's force-mark, not the provider", 2, pytest.approx(30_000)),
        ("the provider's answer to the stop call", 2, pytest.approx(300)),
        ("the provider's stream ending after the stop", 1, pytest.approx(900)),
    ]
    assert response.context["total_stops"] == 5
    assert "An admin&#x27;s force-mark, not the provider" in response.content.decode()


# --- Time saved -------------------------------------------------------------------------------


def test_it_measures_time_saved_against_the_providers_median_completed_run(
    as_bob, acme, fay, dify, make_run, now
):
    base = now - dt.timedelta(hours=5)
    for seconds in (60, 100, 120):  # Fay's usual run: the median, 100 s
        completed(make_run, fay, base, seconds)
    completed(make_run, fay, now - dt.timedelta(days=8), 5000)  # outside: not the usual length
    # Stopped 30 s in: 70 s saved.
    make_run(
        fay,
        status=Status.STOPPED,
        created_at=base - dt.timedelta(seconds=2),
        started_at=base,
        stop_requested_at=base + dt.timedelta(seconds=29),
        stop_confirmed_at=base + dt.timedelta(seconds=30),
        stop_confirmation="Fay's stop answer",
    )
    # Never started, no confirmation time: measured from launch to the stop request (150 s),
    # past the usual length, so it saved nothing rather than negative time.
    make_run(
        fay,
        status=Status.STOPPED,
        created_at=base,
        stop_requested_at=base + dt.timedelta(seconds=150),
        stop_confirmation="never having been sent to the provider",
    )
    # Dify has stops but no completed run to compare with.
    stopped(make_run, dify, base, 500, "stream_end")

    response = dashboard(as_bob, acme)

    rows = {row.provider: row for row in response.context["saved_rows"]}
    assert rows["fay"].usual_s == pytest.approx(100)
    assert rows["fay"].completed == 3
    assert rows["fay"].median_elapsed_s == pytest.approx(90)
    assert rows["fay"].saved_s == pytest.approx(70)
    assert rows["dify"].usual_s is None
    assert rows["dify"].saved_s is None
    assert response.context["saved_total_s"] == pytest.approx(70)
    html = response.content.decode()
    assert 'data-figure="saved">1 min 10 s<' in html
    assert "not enough completed runs" in html


def test_it_adds_the_spend_saved_where_the_provider_reports_a_price(
    as_bob, acme, fay, dify, make_run, now
):
    base = now - dt.timedelta(hours=2)
    usd = lambda price: {"total_tokens": 100, "price": price, "currency": "USD"}  # noqa: E731
    for seconds, price in ((60, "0.0030"), (90, "0.0050"), (120, "0.0090")):
        run = completed(make_run, dify, base, seconds)
        Run.objects.filter(pk=run.pk).update(usage=usd(price))
    # Two stops that cost less than the usual 0.0050, one that cost more (saved nothing).
    stopped(make_run, dify, base, 300, "stream_end", usage=usd("0.0010"))
    stopped(make_run, dify, base, 300, "stream_end", usage=usd("0.0020"))
    stopped(make_run, dify, base, 300, "stream_end", usage=usd("0.0070"))
    # Fay reports no price: no spend, and nothing made up.
    completed(make_run, fay, base, 60)
    stopped(make_run, fay, base, 300)

    response = dashboard(as_bob, acme)

    rows = {row.provider: row for row in response.context["saved_rows"]}
    assert rows["dify"].usual_spend == Decimal("0.0050")
    assert rows["dify"].spent == Decimal("0.0100")
    assert rows["dify"].saved_spend == Decimal("0.0070")
    assert rows["dify"].saved_money == "0.007 USD"
    assert rows["fay"].saved_spend is None
    html = response.content.decode()
    assert "0.007 USD" in html
    assert "not reported" in html


def test_it_never_adds_prices_in_different_currencies(as_bob, acme, dify, make_run, now):
    base = now - dt.timedelta(hours=2)
    run = completed(make_run, dify, base, 60)
    Run.objects.filter(pk=run.pk).update(usage={"price": "1.00", "currency": "EUR"})
    stopped(make_run, dify, base, 300, "stream_end", usage={"price": "0.10", "currency": "USD"})

    rows = {row.provider: row for row in dashboard(as_bob, acme).context["saved_rows"]}
    assert rows["dify"].saved_spend is None
    assert rows["dify"].spent is None


def test_it_says_there_are_not_enough_completed_runs_when_no_provider_has_any(
    as_bob, acme, fay, make_run, now
):
    stopped(make_run, fay, now - dt.timedelta(hours=1), 500)

    response = dashboard(as_bob, acme)

    assert response.context["saved_total_s"] is None
    assert "Not enough completed runs to compare with" in response.content.decode()


def test_it_shows_a_friendly_empty_state(as_bob, acme, fay, make_run, now):
    completed(make_run, fay, now - dt.timedelta(days=3), 60)  # only in the week

    response = dashboard(as_bob, acme)

    html = response.content.decode()
    assert response.status_code == 200
    assert "No runs in the last 24 hours" in html
    assert 'href="?period=week"' in html
    assert '<svg class="chart"' not in html
    assert response.context["status_chart"] is None


# --- Access and the period switch -------------------------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_it_shows_the_dashboard_to_every_member_of_the_team(client, acme, alice, bob, carol, who):
    client.force_login({"alice": alice, "bob": bob, "carol": carol}[who])

    response = dashboard(client, acme)

    assert response.status_code == 200
    assert response.context["section"] == "dashboard"
    assert response.context["membership"].user.username == who
    dashboard_link = f'href="{reverse("runs:dashboard", args=[acme.pk])}" aria-current="page"'
    assert dashboard_link in response.content.decode()


def test_another_teams_dashboard_is_a_404(client, acme, mallory):
    client.force_login(mallory)
    assert dashboard(client, acme).status_code == 404


def test_it_redirects_anonymous_users_to_login(client, acme):
    response = dashboard(client, acme)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


@pytest.mark.parametrize(
    ("given", "period"),
    [(None, "day"), ("", "day"), ("day", "day"), ("week", "week"), ("month", "day")],
)
def test_it_parses_the_period_falling_back_to_a_day(given, period):
    assert parse_period(given) == period


@pytest.mark.parametrize(
    ("given", "period", "label"), [("week", "week", "last 7 days"), ("x", "day", "last 24 hours")]
)
def test_the_page_follows_the_period_and_marks_it_current(as_bob, acme, given, period, label):
    response = dashboard(as_bob, acme, given)

    assert response.status_code == 200
    assert response.context["period"] == period
    assert f'href="?period={period}" aria-current="true"' in response.content.decode()
    assert f"Runs launched in the {label}" in response.content.decode()


def test_percentiles_interpolate_between_ranks():
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert percentile([10.0, 20.0, 30.0, 40.0, 50.0], 0.95) == pytest.approx(48)
