"""The chaos soak's checker (bench/chaos_check.py) on synthetic histories: a clean one holds
every invariant, and a history that breaks one invariant is reported as breaking that one."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

# bench/ is a folder of scripts that import each other by name, as the checker is imported here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from chaos_check import check, summary

RUN = 7
STOP_PATH = "/sim/fay/api/v1/conversation/req-7/stop"


def event(t: float, kind: str, frm: str, to: str, **data: Any) -> dict[str, Any]:
    return {"run": RUN, "t": t, "kind": kind, "from": frm, "to": to, "data": data}


def clean() -> dict[str, Any]:
    """One run launched, streamed to a viewer, stopped by a client and confirmed by the
    provider's stop answer; one create and one stop call at the provider."""
    return {
        "runs": [
            {
                "id": RUN,
                "team": 1,
                "status": "stopped",
                "provider": "fay",
                "refs": ["req-7"],
                "marker": "chaos-L1",
                "prompt": "Soak run chaos-L1. sim:duration=5",
                "output_len": 120,
                "output_incomplete": False,
                "proof": "stop_answer",
                "created_t": 100.0,
            }
        ],
        "events": [
            event(100.0, "created", "", "pending"),
            event(100.5, "accepted", "pending", "pending"),
            event(101.0, "running", "pending", "running"),
            event(103.0, "stop_requested", "running", "stopping"),
            event(103.4, "stop_answer", "stopping", "stopping"),
            event(103.4, "stopped", "stopping", "stopped", proof="stop_answer"),
            event(104.0, "late_result", "stopped", "stopped"),
        ],
        "provider_requests": [
            {
                "provider": "fay",
                "t": 100.2,
                "method": "POST",
                "path": "/sim/fay/api/v1/conversations",
                "body": '{"prompt": "Soak run chaos-L1. sim:duration=5"}',
                "status": 200,
            },
            {
                "provider": "fay",
                "t": 103.1,
                "method": "POST",
                "path": STOP_PATH,
                "body": "{}",
                "status": 200,
            },
        ],
        "launches": [{"marker": "chaos-L1", "key": "k1", "t": 100.0, "http_status": 201}],
        "stops": [{"run": RUN, "t": 103.0, "via": "api", "http_status": 200, "outcome": "stopped"}],
        "viewers": [
            {
                "name": "run-viewer-7",
                "kind": "run",
                "target": RUN,
                "connected_at_end": True,
                "last_connect": 100.1,
                "seen": {str(RUN): ["stopped", 120, 103.5]},
                "max_end": {str(RUN): 120},
            },
            {
                "name": "team-viewer-0",
                "kind": "team",
                "target": 1,
                "connected_at_end": True,
                "last_connect": 99.0,
                "seen": {str(RUN): ["stopped", -1, 103.5]},
                "max_end": {},
            },
        ],
        "faults": [{"kind": "redis_restart", "target": "redis", "t": 102.0, "until": 103.0}],
    }


def broken(history: dict[str, Any]) -> set[int]:
    return {v.invariant for v in check(history)}


def test_it_finds_nothing_wrong_in_a_clean_history() -> None:
    history = clean()
    assert check(history) == []
    numbers = summary(history, [])
    assert (numbers["runs"], numbers["stops"], numbers["faults"]) == (1, 1, {"redis_restart": 1})
    assert all(numbers["invariants"].values())


@pytest.mark.parametrize("status", ["pending", "running", "stopping"])
def test_it_reports_a_run_left_in_flight(status: str) -> None:
    history = clean()
    history["runs"][0]["status"] = status
    assert 1 in broken(history)


def test_it_accepts_stop_unconfirmed_only_with_a_cause_in_the_history() -> None:
    history = clean()
    history["runs"][0]["status"] = "stop_unconfirmed"
    history["events"] = [
        *history["events"][:4],
        event(118.0, "stop_unconfirmed", "stopping", "stop_unconfirmed"),
    ]
    for viewer in history["viewers"]:
        viewer["seen"] = {str(RUN): ["stop_unconfirmed", -1, 118.5]}
    assert broken(history) == {1}

    with_fault = copy.deepcopy(history)
    with_fault["faults"].append({"kind": "sim_kill", "target": "fay", "t": 102.5, "until": 104})
    assert 1 not in broken(with_fault)

    ignoring = copy.deepcopy(history)
    ignoring["runs"][0]["prompt"] += " sim:stop=ignore"
    assert 1 not in broken(ignoring)

    failed_call = copy.deepcopy(history)
    failed_call["events"].insert(4, event(108.0, "stop_failed", "stopping", "stopping"))
    assert 1 not in broken(failed_call)


def test_it_reports_an_acknowledged_stop_whose_intent_was_never_saved() -> None:
    history = clean()
    history["runs"][0]["status"] = "completed"
    history["events"] = [e for e in history["events"] if e["kind"] in ("created", "running")] + [
        event(110.0, "completed", "running", "completed", proof="status_read")
    ]
    history["provider_requests"] = history["provider_requests"][:1]
    history["viewers"][0]["seen"] = {str(RUN): ["completed", 120, 110.5]}
    history["viewers"][1]["seen"] = {str(RUN): ["completed", -1, 110.5]}
    assert broken(history) == {2}


def test_a_stop_answered_after_the_provider_had_stopped_the_run_needs_no_intent() -> None:
    """The 30-minute soak's run 925: the stop was sent, the provider ended the run on its own
    (its stream aborted) while the request waited on a paused web process, and the API then
    answered "already stopped". Sent before the end, answered after it: nothing to save."""
    history = clean()
    history["events"] = [e for e in history["events"] if e["kind"] in ("created", "running")] + [
        event(104.0, "stopped", "running", "stopped", proof="status_read")
    ]
    history["provider_requests"] = history["provider_requests"][:1]
    history["stops"] = [
        {"run": RUN, "t": 103.0, "answered_t": 105.0, "via": "api", "http_status": 200}
    ]
    history["stops"][0]["outcome"] = "stopped"
    assert check(history) == []
    del history["stops"][0]["answered_t"]  # an older history: judged by the send time
    assert broken(history) == {2}


def test_a_run_whose_start_never_reached_the_provider_needs_no_stop_call() -> None:
    """The 30-minute soak's runs 303, 783, 1586 (IntelligenceBox: the chat id is Runbrake's
    own): the box was down for every start call, so there was nothing to stop there."""
    history = clean()
    history["runs"][0].update(proof="status_read")
    history["provider_requests"] = []
    assert check(history) == []


def test_it_reports_a_requested_stop_that_never_reached_the_provider() -> None:
    history = clean()
    history["provider_requests"] = history["provider_requests"][:1]
    assert broken(history) == {2}


def test_a_run_the_provider_finished_before_the_stop_went_out_needs_no_stop_call() -> None:
    history = clean()
    history["runs"][0].update(status="completed", proof="status_read")
    history["events"][4:] = [event(103.2, "completed", "stopping", "completed")]
    history["provider_requests"] = history["provider_requests"][:1]
    history["viewers"][0]["seen"] = {str(RUN): ["completed", 120, 103.5]}
    history["viewers"][1]["seen"] = {str(RUN): ["completed", -1, 103.5]}
    assert check(history) == []


def test_it_reports_a_second_stop_call_after_the_first_was_answered() -> None:
    history = clean()
    again = dict(history["provider_requests"][1], t=105.0)
    history["provider_requests"].append(again)
    assert broken(history) == {2}


def test_a_retry_after_an_unanswered_stop_call_is_fine() -> None:
    history = clean()
    history["provider_requests"].insert(
        1, dict(history["provider_requests"][1], t=103.05, status=None)
    )
    assert check(history) == []


def refused_at_the_start() -> dict[str, Any]:
    """The clean run, stopped while its refused create waited to be sent again: no stop call
    (nothing started), Stopped on the refusals' word."""
    history = clean()
    history["runs"][0].update(proof="start_refused", refs=[])
    history["events"][1:] = [
        event(100.3, "backoff", "pending", "pending"),
        event(100.6, "stop_requested", "pending", "stopping"),
        event(100.7, "stopped", "stopping", "stopped", proof="start_refused"),
    ]
    history["provider_requests"] = [dict(history["provider_requests"][0], status=429)]
    return history


def test_a_run_stopped_while_its_refused_start_waited_needs_no_stop_call() -> None:
    assert check(refused_at_the_start()) == []


def test_it_reports_a_run_stopped_as_refused_at_the_start_that_the_provider_created() -> None:
    history = refused_at_the_start()
    history["provider_requests"].append(dict(history["provider_requests"][0], status=200))
    assert broken(history) == {2}


def test_it_reports_a_launch_created_twice_at_the_provider() -> None:
    history = clean()
    history["provider_requests"].append(dict(history["provider_requests"][0], t=101.0))
    assert broken(history) == {3}


def test_refused_create_attempts_are_not_creates() -> None:
    history = clean()
    for status in (429, 500, None):
        history["provider_requests"].append(
            dict(history["provider_requests"][0], t=99.0, status=status)
        )
    assert check(history) == []


def test_it_reports_a_launch_that_made_two_runs() -> None:
    history = clean()
    history["runs"].append(dict(history["runs"][0], id=8, refs=[]))
    assert 3 in broken(history)


def test_it_reports_a_terminal_state_that_changed() -> None:
    history = clean()
    history["events"].append(event(106.0, "completed", "stopped", "completed"))
    history["runs"][0]["status"] = "completed"
    history["viewers"][0]["seen"] = {str(RUN): ["completed", 120, 106.5]}
    history["viewers"][1]["seen"] = {str(RUN): ["completed", -1, 106.5]}
    assert broken(history) == {4}


def test_it_reports_an_event_claiming_a_status_after_the_terminal_one() -> None:
    history = clean()
    history["events"].append(event(106.0, "stop_answer", "stopping", "stopping"))
    assert broken(history) == {4}


def test_it_reports_a_viewer_that_still_shows_an_old_status() -> None:
    history = clean()
    history["viewers"][0]["seen"] = {str(RUN): ["stopping", 80, 103.1]}
    assert broken(history) == {5}


def test_it_reports_a_team_viewer_that_missed_a_change_after_it_connected() -> None:
    history = clean()
    history["viewers"][1]["seen"] = {}
    assert broken(history) == {5}


def test_a_viewer_gone_at_the_end_is_not_held_to_the_final_status() -> None:
    history = clean()
    history["viewers"][0].update(connected_at_end=False, seen={str(RUN): ["running", 50, 102]})
    assert check(history) == []


def test_it_reports_streamed_text_the_run_no_longer_keeps() -> None:
    history = clean()
    history["runs"][0]["output_len"] = 73
    assert broken(history) == {6}
    history["runs"][0]["output_incomplete"] = True
    assert check(history) == []


def test_a_stop_still_owed_to_a_provider_that_was_down_is_explained() -> None:
    history = clean()
    history["runs"][0]["status"] = "stop_unconfirmed"
    history["events"] = [
        *history["events"][:4],
        event(104.0, "stop_failed", "stopping", "stopping"),
        event(118.0, "stop_unconfirmed", "stopping", "stop_unconfirmed"),
    ]
    history["provider_requests"] = history["provider_requests"][:1]
    for viewer in history["viewers"]:
        viewer["seen"] = {str(RUN): ["stop_unconfirmed", -1, 118.5]}
    assert check(history) == []


def test_runbrakes_own_timeout_stop_is_not_held_to_reaching_the_provider() -> None:
    history = clean()
    history["events"][3]["channel"] = "timeout"
    history["provider_requests"] = history["provider_requests"][:1]
    history["stops"] = []
    assert check(history) == []


def test_an_id_several_runs_share_does_not_lend_one_runs_stop_call_to_another() -> None:
    history = clean()
    history["runs"][0]["refs"] = ["req-7", "chaos-agent"]
    other = dict(history["runs"][0], id=8, marker="chaos-L2", refs=["req-8", "chaos-agent"])
    history["runs"].append(other)
    history["events"].append({**event(100.0, "created", "", "pending"), "run": 8})
    history["events"].append({**event(101.0, "stop_requested", "pending", "stopping"), "run": 8})
    history["events"].append({**event(102.0, "stopped", "stopping", "stopped"), "run": 8})
    history["provider_requests"][1]["path"] = "/sim/fay/api/v1/chaos-agent/req-7/stop"
    # Run 8 reached the provider too (its create), so its stop owes a call of its own.
    history["provider_requests"].append(
        dict(history["provider_requests"][0], t=100.3, body='{"prompt": "Soak run chaos-L2."}')
    )
    history["viewers"][1]["seen"]["8"] = ["stopped", -1, 102.5]
    found = check(history)
    assert [(v.invariant, v.run) for v in found] == [(2, 8)]
