"""The chaos soak's checker: a pure function from a recorded history to the broken promises.

The history (what bench/chaos.py writes as history.json) holds, once the system is quiet:
- `runs`: each run's final row — id, status, provider, the provider's ids for it (`refs`),
  the launch `marker` in its prompt, `prompt`, `output_len`, `output_incomplete`, `proof`;
- `events`: every RunEvent — `run`, `t` (epoch seconds), `kind`, `from`, `to`, `data`;
- `provider_requests`: every request a simulator received (its own log, across restarts) —
  `provider`, `t`, `method`, `path`, `body`, and `status` of its answer (None: never answered);
- `launches`: every launch attempt by a client — `marker`, `key`, `t`, `http_status`, `run`;
- `stops`: every stop a client asked for — `run`, `t`, `via` (api or bulk), `http_status`,
  `outcome` (the answer's status or bulk outcome);
- `viewers`: each live viewer — `kind` (team or run), `target`, `connected_at_end`,
  `last_connect` (epoch), `seen` {run id: [status, output end, epoch]} since that connect,
  and `max_end` {run id: the most output any frame showed};
- `faults`: what was injected — `kind`, `target`, `t`, `until`.

Each invariant is numbered as in issue 15; `check` returns one Violation per broken promise.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

TERMINAL = ("stopped", "completed", "failed")
FINISHED = ("completed", "failed")
MARKER = re.compile(r"chaos-L\d+")
CREATE_PATH = re.compile(r"(/conversations|/api/ai/chat|/chat-messages|/invoke/stream)$")
STOP_PATH = re.compile(r"/stop$")
# Behaviours under which a provider may legitimately never confirm a stop.
UNCONFIRMING = re.compile(r"sim:stop=(ignore|error|lose_first|slow)")
PROVIDER_FAULTS = ("sim_kill", "latency", "pause_sim")
USER_CHANNELS = ("api", "button", "admin")
INVARIANTS = {
    1: "every run is terminal, or Stop unconfirmed with a reason the history explains",
    2: "every requested stop reached the provider; an answered stop was not sent again",
    3: "no run was created twice at a provider",
    4: "no terminal state ever changed",
    5: "every viewer connected at the end shows each run's final status",
    6: "no streamed text was lost beyond what the page marks incomplete",
}


@dataclass(frozen=True)
class Violation:
    invariant: int
    run: int | None
    message: str

    def __str__(self) -> str:
        where = f"run {self.run}: " if self.run is not None else ""
        return f"invariant {self.invariant} ({INVARIANTS[self.invariant]}): {where}{self.message}"


def _events_by_run(history: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    by_run: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in history.get("events", []):
        by_run[event["run"]].append(event)
    for events in by_run.values():
        events.sort(key=lambda e: (e["t"], e.get("id", 0)))
    return by_run


def _requests_for(run: dict[str, Any], requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [i for i in run.get("refs", []) if i]
    return [
        r
        for r in requests
        if r["provider"] == run["provider"] and any(f"/{i}/" in r["path"] + "/" for i in ids)
    ]


def _provider_faulted(run: dict[str, Any], history: dict[str, Any], end: float) -> bool:
    start = run.get("created_t", 0.0)
    return any(
        f["kind"] in PROVIDER_FAULTS
        and f.get("target") == run["provider"]
        and f["t"] <= end
        and f.get("until", f["t"]) >= start
        for f in history.get("faults", [])
    )


def _own_refs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run with only the provider ids that are its own: an id several runs share (an
    xpander agent, a Dify user) would give one run's stop calls to all of them."""
    seen: dict[str, int] = defaultdict(int)
    for run in runs:
        for ref in set(run.get("refs", [])):
            seen[ref] += 1
    return [{**run, "refs": [i for i in run.get("refs", []) if seen[i] == 1]} for run in runs]


def check(history: dict[str, Any]) -> list[Violation]:
    runs = {r["id"]: r for r in _own_refs(history.get("runs", []))}
    events = _events_by_run(history)
    requests = history.get("provider_requests", [])
    end = max([e["t"] for e in history.get("events", [])] + [0.0])
    found: list[Violation] = []
    found += _terminal_or_explained(runs, events, history, end)
    found += _stops_reached_provider(runs, events, requests, history)
    found += _one_create_per_launch(runs, requests, history)
    found += _terminal_never_changed(runs, events)
    found += _viewers_show_final(runs, events, history)
    found += _no_text_lost(runs, history)
    return found


def _terminal_or_explained(
    runs: dict[int, dict[str, Any]],
    events: dict[int, list[dict[str, Any]]],
    history: dict[str, Any],
    end: float,
) -> list[Violation]:
    found = []
    for run in runs.values():
        status = run["status"]
        if status in TERMINAL:
            continue
        if status == "stop_unconfirmed":
            kinds = {e["kind"] for e in events.get(run["id"], [])}
            if (
                UNCONFIRMING.search(run.get("prompt", ""))
                or "stop_failed" in kinds
                or _provider_faulted(run, history, end)
            ):
                continue
            found.append(
                Violation(1, run["id"], "Stop unconfirmed, but no fault in the history explains it")
            )
            continue
        found.append(Violation(1, run["id"], f"still {status} once the system was quiet"))
    return found


def _stops_reached_provider(
    runs: dict[int, dict[str, Any]],
    events: dict[int, list[dict[str, Any]]],
    requests: list[dict[str, Any]],
    history: dict[str, Any],
) -> list[Violation]:
    found = []
    # A stop the API acknowledged was saved first: its run has the intent on record (or was
    # over before the stop came).
    for stop in history.get("stops", []):
        if stop.get("http_status") != 200 or stop["run"] not in runs:
            continue
        trail = events.get(stop["run"], [])
        saved = any(e["kind"] == "stop_requested" for e in trail)
        # Over before the API answered ("already stopped"): a request held up on its way
        # (a paused web process) may find the provider ended the run meanwhile.
        answered = stop.get("answered_t", stop["t"])
        over_before = any(e["to"] in TERMINAL and e["t"] <= answered for e in trail)
        if not (saved or over_before):
            found.append(
                Violation(
                    2,
                    stop["run"],
                    f"the {stop['via']} stop at {stop['t']:.3f} was acknowledged "
                    f"({stop.get('outcome')}) but no stop intent was ever saved",
                )
            )
    created = _creates(requests)
    reached = _creates(requests, answered_or_not=True)
    for run_id, trail in events.items():
        run = runs.get(run_id)
        # A person's stop (a button, the API, an admin), not Runbrake's own timeout or stall.
        if run is None or not any(
            e["kind"] == "stop_requested" and e.get("channel", "api") in USER_CHANNELS
            for e in trail
        ):
            continue
        calls = [r for r in _requests_for(run, requests) if STOP_PATH.search(r["path"])]
        ended = next((e for e in trail if e["to"] in TERMINAL), None)
        # Refused at the start: every create the provider answered was a refusal (the
        # provider's log says whether one went through).
        refused = run.get("proof") == "start_refused"
        if refused and run.get("marker") in created:
            found.append(
                Violation(
                    2,
                    run_id,
                    "stopped as refused at the start, but the provider created it",
                )
            )
        # Nothing to stop where no start call ever arrived (an id of Runbrake's own, the
        # provider down for every try).
        never_sent = (
            run.get("proof") == "never_sent"
            or refused
            or not run.get("refs")
            or run.get("marker") not in reached
        )
        finished_first = ended is not None and ended["to"] in FINISHED
        # Still owed: every call so far failed to reach a provider that was down, and Runbrake
        # keeps sending it (Stop unconfirmed says so on the page).
        owed = run["status"] == "stop_unconfirmed" and any(
            e["kind"] == "stop_failed" for e in trail
        )
        if not calls and not never_sent and not finished_first and not owed:
            found.append(
                Violation(2, run_id, "a stop was requested but never reached the provider")
            )
        confirmed = next(
            (
                e
                for e in trail
                if e["to"] == "stopped" and (e.get("data") or {}).get("proof") == "stop_answer"
            ),
            None,
        )
        if confirmed is not None:
            again = [c for c in calls if c["t"] > confirmed["t"]]
            if again:
                found.append(
                    Violation(
                        2,
                        run_id,
                        f"{len(again)} stop call(s) reached the provider after its answer "
                        "confirmed the stop",
                    )
                )
    return found


def _creates(requests: list[dict[str, Any]], *, answered_or_not: bool = False) -> dict[str, int]:
    """Successful creates at the providers, per launch marker (refusals are not creates); or,
    `answered_or_not`, every start call that reached a provider at all."""
    created: dict[str, int] = defaultdict(int)
    for r in requests:
        if r["method"] != "POST" or not CREATE_PATH.search(r["path"]):
            continue
        status = r.get("status")
        if not answered_or_not and (status is None or not 200 <= status < 300):
            continue
        for marker in set(MARKER.findall(r.get("body", ""))):
            created[marker] += 1
    return created


def _one_create_per_launch(
    runs: dict[int, dict[str, Any]], requests: list[dict[str, Any]], history: dict[str, Any]
) -> list[Violation]:
    found = []
    for marker, n in _creates(requests).items():
        if n > 1:
            found.append(Violation(3, None, f"launch {marker} was created {n} times at a provider"))
    per_marker: dict[str, list[int]] = defaultdict(list)
    for run in runs.values():
        if run.get("marker"):
            per_marker[run["marker"]].append(run["id"])
    for marker, ids in per_marker.items():
        if len(ids) > 1:
            found.append(Violation(3, None, f"launch {marker} made {len(ids)} runs: {ids}"))
    return found


def _terminal_never_changed(
    runs: dict[int, dict[str, Any]], events: dict[int, list[dict[str, Any]]]
) -> list[Violation]:
    found = []
    for run_id, trail in events.items():
        terminal: str | None = None
        for e in trail:
            if terminal is None:
                if e["to"] in TERMINAL and e["from"] != e["to"]:
                    terminal = e["to"]
                continue
            if e["to"] != terminal or (e["from"] and e["from"] != terminal):
                found.append(
                    Violation(4, run_id, f"{terminal} became {e['to']} ({e['kind']} event)")
                )
                break
        run = runs.get(run_id)
        if terminal is not None and run is not None and run["status"] != terminal:
            found.append(Violation(4, run_id, f"{terminal} in its events, {run['status']} now"))
    return found


def _viewers_show_final(
    runs: dict[int, dict[str, Any]],
    events: dict[int, list[dict[str, Any]]],
    history: dict[str, Any],
) -> list[Violation]:
    found = []
    for viewer in history.get("viewers", []):
        if not viewer.get("connected_at_end"):
            continue
        seen = {int(k): v for k, v in viewer.get("seen", {}).items()}
        if viewer["kind"] == "run":
            expected = [viewer["target"]]
        else:
            # Rows it saw since its last connect, and every run of its team that changed
            # since then (a push it must have had).
            changed = {
                run_id
                for run_id, trail in events.items()
                if runs.get(run_id, {}).get("team") == viewer["target"]
                and any(e["from"] != e["to"] and e["t"] > viewer["last_connect"] for e in trail)
            }
            expected = sorted(set(seen) | changed)
        for run_id in expected:
            run = runs.get(run_id)
            if run is None:
                continue
            shown = seen.get(run_id, [None])[0]
            if shown != run["status"]:
                found.append(
                    Violation(
                        5,
                        run_id,
                        f"{viewer['name']} shows {shown or 'nothing'}, the run is {run['status']}",
                    )
                )
    return found


def _no_text_lost(runs: dict[int, dict[str, Any]], history: dict[str, Any]) -> list[Violation]:
    found = []
    most: dict[int, int] = defaultdict(int)
    for viewer in history.get("viewers", []):
        for run_id, end in viewer.get("max_end", {}).items():
            most[int(run_id)] = max(most[int(run_id)], end)
    for run_id, end in most.items():
        run = runs.get(run_id)
        if run is None or run.get("output_incomplete"):
            continue
        if end > run["output_len"]:
            found.append(
                Violation(
                    6,
                    run_id,
                    f"viewers saw {end} characters streamed, the run keeps "
                    f"{run['output_len']} and does not say it is incomplete",
                )
            )
    return found


def summary(history: dict[str, Any], violations: list[Violation]) -> dict[str, Any]:
    """The numbers the report table shows."""
    faults: dict[str, int] = defaultdict(int)
    for f in history.get("faults", []):
        faults[f["kind"]] += 1
    statuses: dict[str, int] = defaultdict(int)
    for run in history.get("runs", []):
        statuses[run["status"]] += 1
    broken = {v.invariant for v in violations}
    return {
        "runs": len(history.get("runs", [])),
        "launch_attempts": len(history.get("launches", [])),
        "stops": sum(1 for s in history.get("stops", []) if s.get("http_status") == 200),
        "stop_attempts": len(history.get("stops", [])),
        "provider_requests": len(history.get("provider_requests", [])),
        "viewers": len(history.get("viewers", [])),
        "faults": dict(sorted(faults.items())),
        "statuses": dict(sorted(statuses.items())),
        "invariants": {n: n not in broken for n in INVARIANTS},
        "violations": len(violations),
    }
