"""The team dashboard: what the team's runs did over the last day or week.

Counts are grouped in the database. Percentiles and medians are computed here, over at most
MAX_SAMPLES rows of timestamps per question: SQLite has no percentile function and the
window is small, so reading the values is both portable and cheap. The charts are inline SVG
drawn from geometry computed below, so the page needs no JavaScript and nothing remote.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from runs.access import membership_for
from runs.models import Proof, ProviderKind, Run, Status, Team
from runs.web.answers import HtmxHttpRequest

PERIODS: dict[str, tuple[dt.timedelta, str]] = {
    "day": (dt.timedelta(days=1), "last 24 hours"),
    "week": (dt.timedelta(days=7), "last 7 days"),
}
DEFAULT_PERIOD = "day"
# Enough for a team's busiest week; beyond it the newest rows stand for the whole window.
MAX_SAMPLES = 5000
NOT_ENOUGH_COMPLETED = "not enough completed runs"

# Chart geometry, in SVG user units. The SVG scales to its card's width, so each chart's
# width is close to the pixels it gets on a desktop and its text stays near its CSS size.
ROW_HEIGHT = 36
BAR_HEIGHT = 20
TOP = 8
AXIS_HEIGHT = 24


def parse_period(value: str | None) -> str:
    """`?period=day|week`; anything else is the default rather than an error page."""
    return value if value in PERIODS else DEFAULT_PERIOD


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th quantile (0..1) with linear interpolation between closest ranks (numpy's
    default, and `statistics.median` at q=0.5). None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def short_provider(kind: str) -> str:
    """ "Fay (deep research)" → "Fay": chart labels have little room."""
    try:
        label = str(ProviderKind(kind).label)
    except ValueError:
        return kind
    return label.split(" (")[0]


def format_ms(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 10_000:
        return f"{ms / 1000:.2f} s"
    return format_seconds(ms / 1000)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if minutes else f"{hours} h"


def nice_scale(top_value: float, *, integer: bool = False, ticks: int = 4) -> list[float]:
    """Round tick values from 0 to a little above top_value (1, 2, 2.5 or 5 times 10^k)."""
    if top_value <= 0:
        return [0.0, 1.0]
    raw = top_value / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = magnitude * 10
    for multiple in (1, 2, 2.5, 5, 10):
        if multiple * magnitude * ticks >= top_value:
            step = multiple * magnitude
            break
    if integer:
        step = max(1.0, math.ceil(step))
    count = math.ceil(top_value / step - 1e-9)
    return [step * i for i in range(count + 1)]


# --- What the template draws ------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    width: int  # of the whole SVG
    label: int  # the provider names, right-aligned, left of the bars
    plot: int  # the bars; what remains right of them holds each row's figure

    def scale(self, value: float, top: float) -> float:
        return round(self.plot * value / top, 1) if top else 0.0


STATUS_FRAME = Frame(width=1100, label=160, plot=860)  # a full-width card
LATENCY_FRAME = Frame(width=520, label=140, plot=260)  # a half-width card


@dataclass
class Tick:
    x: float
    label: str


@dataclass
class Segment:
    status: str
    label: str
    count: int
    x: float
    width: float

    @property
    def shows_count(self) -> bool:
        # A number only fits in a segment wide enough for it.
        return self.width >= 10 + 8 * len(str(self.count))

    @property
    def mid(self) -> float:
        return round(self.x + self.width / 2, 1)


@dataclass
class StatusRow:
    provider: str
    label: str
    total: int
    counts: list[int]  # in the order of the dashboard's `statuses`
    segments: list[Segment] = field(default_factory=list)
    y: float = 0.0
    end: float = 0.0

    @property
    def text_y(self) -> float:
        return self.y + BAR_HEIGHT / 2 + 5

    @property
    def bar_y(self) -> float:
        return self.y


@dataclass
class LatencyRow:
    provider: str
    label: str
    stops: int
    p50_ms: float
    p95_ms: float
    y: float = 0.0
    p50_width: float = 0.0
    p95_width: float = 0.0

    @property
    def p50(self) -> str:
        return format_ms(self.p50_ms)

    @property
    def p95(self) -> str:
        return format_ms(self.p95_ms)

    @property
    def text_y(self) -> float:
        return self.y + BAR_HEIGHT / 2 + 5

    @property
    def inner_y(self) -> float:
        return self.y + BAR_HEIGHT / 4

    end: float = 0.0


@dataclass
class ConfirmationRow:
    label: str
    stops: int
    share: float  # percent of the window's stops
    p50_ms: float | None

    @property
    def p50(self) -> str:
        return format_ms(self.p50_ms)

    @property
    def display(self) -> str:
        """Sentence case, except a provider's own spelling ("xpander.ai's stream …")."""
        if any(self.label.startswith(short_provider(k)) for k in ProviderKind):
            return self.label
        return self.label[:1].upper() + self.label[1:]


@dataclass
class SavedRow:
    provider: str
    label: str
    stops: int
    completed: int
    median_elapsed_s: float | None
    usual_s: float | None
    saved_s: float | None
    # Spend, where the provider reports a price (Dify's message_end): what the stopped runs
    # cost, what a completed one usually costs, and the difference over the stops.
    currency: str = ""
    spent: Decimal | None = None
    usual_spend: Decimal | None = None
    saved_spend: Decimal | None = None

    @property
    def median_elapsed(self) -> str:
        return format_seconds(self.median_elapsed_s)

    @property
    def usual(self) -> str:
        return format_seconds(self.usual_s) if self.usual_s is not None else NOT_ENOUGH_COMPLETED

    @property
    def saved(self) -> str:
        return format_seconds(self.saved_s) if self.saved_s is not None else "—"

    @property
    def saved_money(self) -> str:
        if self.saved_spend is None:
            return ""
        return f"{format_money(self.saved_spend)} {self.currency}"


def format_money(amount: Decimal) -> str:
    """Enough digits to tell small token prices apart, no float rounding on the way."""
    if amount == 0:
        return "0"
    if abs(amount) >= 1:
        return f"{amount:,.2f}"
    return f"{amount.normalize():f}"


def price_of(usage: Any) -> tuple[Decimal, str] | None:
    """(price, currency) from a run's usage, if the provider gave a readable one."""
    if not isinstance(usage, dict) or not isinstance(usage.get("price"), str):
        return None
    try:
        price = Decimal(usage["price"])
    except InvalidOperation:
        return None
    if not price.is_finite() or price < 0:
        return None
    return price, str(usage.get("currency") or "")


@dataclass
class Chart:
    frame: Frame
    rows: list[Any]
    ticks: list[Tick]
    height: float
    axis_y: float
    bar_height: int = BAR_HEIGHT

    @property
    def width(self) -> int:
        return self.frame.width

    @property
    def label_x(self) -> int:
        return self.frame.label - 10

    @property
    def plot_x(self) -> int:
        return self.frame.label

    @property
    def tick_y(self) -> float:
        return self.axis_y + 16


def _chart(frame: Frame, rows: list[Any], ticks: list[Tick]) -> Chart:
    for i, row in enumerate(rows):
        row.y = TOP + i * ROW_HEIGHT
    axis_y = TOP + len(rows) * ROW_HEIGHT
    return Chart(frame, rows=rows, ticks=ticks, height=axis_y + AXIS_HEIGHT, axis_y=axis_y)


# --- The questions ----------------------------------------------------------------------------


def _provider_order(kinds: Iterable[str]) -> list[str]:
    known = [k.value for k in ProviderKind]
    return sorted(set(kinds), key=lambda k: (known.index(k) if k in known else len(known), k))


def runs_by_status(runs: Any) -> tuple[list[tuple[str, str]], list[StatusRow], Chart | None]:
    """Counts per provider and status (one GROUP BY), and the stacked bar chart of them."""
    grouped = runs.values("provider", "status").annotate(n=Count("pk")).order_by()
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for row in grouped:
        counts[row["provider"]][row["status"]] = row["n"]
    present = {s for per in counts.values() for s in per}
    statuses = [(s.value, str(s.label)) for s in Status if s.value in present]
    rows = [
        StatusRow(
            provider=kind,
            label=short_provider(kind),
            total=sum(counts[kind].values()),
            counts=[counts[kind].get(s, 0) for s, _ in statuses],
        )
        for kind in _provider_order(counts)
    ]
    if not rows:
        return statuses, rows, None
    frame = STATUS_FRAME
    ticks = nice_scale(max(r.total for r in rows), integer=True)
    top = ticks[-1]
    for row in rows:
        x = float(frame.label)
        for (status, label), n in zip(statuses, row.counts, strict=True):
            if n:
                width = frame.scale(n, top)
                row.segments.append(Segment(status, label, n, round(x, 1), width))
                x += width
        row.end = round(x + 8, 1)
    chart = _chart(frame, rows, [Tick(frame.label + frame.scale(t, top), f"{t:g}") for t in ticks])
    return statuses, rows, chart


def _proof_label(proof: str) -> str:
    """What proved a stop, as the dashboard groups it (the run's `proof` field)."""
    if proof not in Proof.values:
        return "not recorded"
    return str(Proof(proof).label)


def _seconds(later: dt.datetime | None, earlier: dt.datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def _add_spend(
    row: SavedRow, at_stop: list[tuple[Decimal, str]], completed: list[tuple[Decimal, str]]
) -> None:
    """Spend saved, only where every price is in one currency (never mixed, never guessed):
    each priced stop against the median price of a completed run."""
    currencies = {c for _, c in at_stop + completed}
    if not at_stop or len(currencies) != 1:
        return
    row.currency = currencies.pop()
    row.spent = sum((p for p, _ in at_stop), Decimal(0))
    if completed:
        ordered = sorted(p for p, _ in completed)
        row.usual_spend = ordered[(len(ordered) - 1) // 2]
        row.saved_spend = sum(
            (max(Decimal(0), row.usual_spend - p) for p, _ in at_stop), Decimal(0)
        )


@dataclass
class StopSamples:
    """What the sampled stopped runs say, per provider: stop latency (from the stop being
    requested to the provider confirming it, in ms), the same per kind of proof, how long
    runs had run when stopped, and their price where the provider reported one."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    latencies_by_confirmation: dict[str, list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    elapsed_at_stop: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    spent_at_stop: dict[str, list[tuple[Decimal, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    @classmethod
    def of(cls, stops: Iterable[tuple[Any, ...]]) -> StopSamples:
        samples = cls()
        for provider, proof, requested, confirmed, started, created, usage in stops:
            if (price := price_of(usage)) is not None:
                samples.spent_at_stop[provider].append(price)
            latency = _seconds(confirmed, requested)
            if latency is not None:
                samples.latencies[provider].append(latency * 1000)
                samples.latencies_by_confirmation[_proof_label(proof)].append(latency * 1000)
            elapsed = _seconds(confirmed or requested, started or created)
            if elapsed is not None:
                samples.elapsed_at_stop[provider].append(max(0.0, elapsed))
        return samples


def _latency_section(latencies: dict[str, list[float]]) -> tuple[list[LatencyRow], Any]:
    latency_rows = [
        LatencyRow(
            provider=kind,
            label=short_provider(kind),
            stops=len(latencies[kind]),
            p50_ms=percentile(latencies[kind], 0.5) or 0.0,
            p95_ms=percentile(latencies[kind], 0.95) or 0.0,
        )
        for kind in _provider_order(k for k, v in latencies.items() if v)
    ]
    latency_chart = None
    if latency_rows:
        frame = LATENCY_FRAME
        ticks_ms = nice_scale(max(r.p95_ms for r in latency_rows))
        top_ms = ticks_ms[-1]
        for lrow in latency_rows:
            lrow.p50_width = frame.scale(lrow.p50_ms, top_ms)
            lrow.p95_width = frame.scale(lrow.p95_ms, top_ms)
            lrow.end = frame.label + max(lrow.p50_width, lrow.p95_width) + 6
        latency_chart = _chart(
            frame,
            latency_rows,
            [Tick(frame.label + frame.scale(t, top_ms), format_ms(t)) for t in ticks_ms],
        )
    return latency_rows, latency_chart


def _confirmation_rows(
    stopped: Any, latencies_by_confirmation: dict[str, list[float]]
) -> list[ConfirmationRow]:
    """How each stop was proven: counted in the database by the run's proof."""
    by_confirmation: dict[str, int] = defaultdict(int)
    for row in stopped.values("proof").annotate(n=Count("pk")).order_by():
        by_confirmation[_proof_label(row["proof"])] += row["n"]
    total_stops = sum(by_confirmation.values())
    return sorted(
        (
            ConfirmationRow(
                label=label,
                stops=n,
                share=round(100 * n / total_stops, 1),
                p50_ms=percentile(latencies_by_confirmation.get(label, []), 0.5),
            )
            for label, n in by_confirmation.items()
        ),
        key=lambda r: (-r.stops, r.label),
    )


def _saved_rows(samples: StopSamples, completed: Iterable[tuple[Any, ...]]) -> list[SavedRow]:
    """Time saved: each stop against the provider's usual (median completed) run length."""
    durations: dict[str, list[float]] = defaultdict(list)
    prices: dict[str, list[tuple[Decimal, str]]] = defaultdict(list)
    for provider, finished, started, created, usage in completed:
        if (price := price_of(usage)) is not None:
            prices[provider].append(price)
        seconds = _seconds(finished, started or created)
        if seconds is not None:
            durations[provider].append(max(0.0, seconds))
    saved_rows = []
    for kind in _provider_order(samples.elapsed_at_stop):
        usual = percentile(durations.get(kind, []), 0.5)
        at_stop = samples.elapsed_at_stop[kind]
        saved_row = SavedRow(
            provider=kind,
            label=short_provider(kind),
            stops=len(at_stop),
            completed=len(durations.get(kind, [])),
            median_elapsed_s=percentile(at_stop, 0.5),
            usual_s=usual,
            # A stop after the usual length saved nothing, rather than negative time.
            saved_s=None if usual is None else sum(max(0.0, usual - e) for e in at_stop),
        )
        _add_spend(saved_row, samples.spent_at_stop.get(kind, []), prices.get(kind, []))
        saved_rows.append(saved_row)
    return saved_rows


def build_dashboard(team: Team, period: str, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or timezone.now()
    span, period_label = PERIODS[period]
    since = now - span
    # The window is the runs *launched* in the period: every figure is about the same runs.
    runs = Run.objects.for_team(team).filter(created_at__gte=since, created_at__lte=now)

    statuses, status_rows, status_chart = runs_by_status(runs)
    total_runs = sum(r.total for r in status_rows)

    stopped = runs.filter(status=Status.STOPPED)
    stops = list(
        stopped.order_by("-created_at").values_list(
            "provider",
            "proof",
            "stop_requested_at",
            "stop_confirmed_at",
            "started_at",
            "created_at",
            "usage",
        )[:MAX_SAMPLES]
    )
    completed = list(
        runs.filter(status=Status.COMPLETED, finished_at__isnull=False)
        .order_by("-created_at")
        .values_list("provider", "finished_at", "started_at", "created_at", "usage")[:MAX_SAMPLES]
    )

    samples = StopSamples.of(stops)
    latencies = samples.latencies
    latency_rows, latency_chart = _latency_section(latencies)
    all_latencies = [v for values in latencies.values() for v in values]

    confirmation_rows = _confirmation_rows(stopped, samples.latencies_by_confirmation)
    total_stops = sum(r.stops for r in confirmation_rows)

    saved_rows = _saved_rows(samples, completed)
    with_baseline = [r.saved_s for r in saved_rows if r.saved_s is not None]

    return {
        "period": period,
        "period_label": period_label,
        "periods": [(key, label) for key, (_, label) in PERIODS.items()],
        "since": since,
        "now": now,
        "total_runs": total_runs,
        "total_stops": total_stops,
        "stopped_share": round(100 * total_stops / total_runs) if total_runs else 0,
        "statuses": statuses,
        "status_rows": status_rows,
        "status_chart": status_chart,
        "latency_rows": latency_rows,
        "latency_chart": latency_chart,
        "latency_p50": format_ms(percentile(all_latencies, 0.5)),
        "latency_p95": format_ms(percentile(all_latencies, 0.95)),
        "confirmation_rows": confirmation_rows,
        "saved_rows": saved_rows,
        "saved_total_s": sum(with_baseline) if with_baseline else None,
        "saved_total": format_seconds(sum(with_baseline)) if with_baseline else None,
        "not_enough_completed": NOT_ENOUGH_COMPLETED,
        "sampled": len(stops) >= MAX_SAMPLES or len(completed) >= MAX_SAMPLES,
        "max_samples": MAX_SAMPLES,
    }


@require_GET
@login_required
def team_dashboard(request: HtmxHttpRequest, team_id: int) -> HttpResponse:
    """Any member of the team may look, viewers included; another team's is a 404."""
    membership = membership_for(request.user, team_id)
    period = parse_period(request.GET.get("period"))
    context = {
        "team": membership.team,
        "membership": membership,
        "section": "dashboard",
        **build_dashboard(membership.team, period),
    }
    return render(request, "runs/dashboard.html", context)
