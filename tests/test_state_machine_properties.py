"""Random interleavings of provider news, stops, stop answers, retries and admin actions never
break the state machine's invariants (hypothesis stateful testing, on the real models)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from runs.models import (
    ACTIVE,
    STOP_IN_PROGRESS,
    TERMINAL,
    Channel,
    Run,
    RunAlreadyFinished,
    Status,
)
from runs.providers.base import StopResult
from runs.providers.errors import ProviderError

# Every edge the state machine may take; anything else is a bug.
EDGES = {
    ("", "pending"),
    ("pending", "running"),
    ("pending", "stopping"),
    ("running", "stopping"),
    ("pending", "completed"),
    ("running", "completed"),
    ("stopping", "completed"),
    ("stop_unconfirmed", "completed"),
    ("pending", "failed"),
    ("running", "failed"),
    ("stopping", "failed"),
    ("stop_unconfirmed", "failed"),
    ("stopping", "stop_unconfirmed"),
    ("pending", "stopped"),
    ("running", "stopped"),
    ("stopping", "stopped"),
    ("stop_unconfirmed", "stopped"),
}


def make_machine(launch, user):
    class RunLifecycle(RuleBasedStateMachine):
        @initialize()
        def launch_a_run(self):
            self.run = launch("property")
            self.first_terminal: str | None = None
            self.stop_requests = 0

        def fresh(self) -> Run:
            return Run.objects.get(pk=self.run.pk)

        @rule(with_id=st.booleans())
        def provider_names_it(self, with_id):
            if with_id:
                self.fresh().record_external_id("ext-1")

        @rule()
        def provider_says_running(self):
            self.fresh().mark_running("PROCESSING")

        @rule()
        def user_presses_stop(self):
            run = self.fresh()
            try:
                if run.request_stop(actor=user, channel=Channel.BUTTON, reason="why not"):
                    self.stop_requests += 1
            except RunAlreadyFinished:
                assert run.status in (Status.COMPLETED, Status.FAILED)

        @rule()
        def a_stop_call_is_claimed(self):
            self.fresh().claim_stop_attempt()

        @rule(terminal=st.sampled_from(["stopped", "completed", "failed", None]))
        def provider_answers_the_stop(self, terminal):
            run = self.fresh()
            if run.status in STOP_IN_PROGRESS:
                run.record_stop_answer(
                    StopResult(terminal, "X", "answer", {}), provider_label="Sim"
                )

        @rule()
        def the_stop_call_fails(self):
            run = self.fresh()
            if run.status in STOP_IN_PROGRESS:
                run.record_stop_failure(ProviderError("HTTP_500", "boom", retryable=True))

        @rule()
        def the_deadline_passes(self):
            self.fresh().mark_stop_unconfirmed()

        @rule()
        def provider_says_stopped(self):
            self.fresh().mark_stopped(proof="status_read", confirmation="the provider's status")

        @rule()
        def provider_says_completed(self):
            self.fresh().mark_completed(
                proof="status_read", output="late or not", provider_status="COMPLETED"
            )

        @rule()
        def provider_says_failed(self):
            self.fresh().mark_failed(proof="status_read", error="boom", provider_status="FAILED")

        @rule()
        def admin_force_marks(self):
            self.fresh().force_mark_stopped(actor=user, reason="stuck")

        @invariant()
        def terminal_is_final(self):
            status = self.fresh().status
            if self.first_terminal is None and status in TERMINAL:
                self.first_terminal = status
            if self.first_terminal is not None:
                assert status == self.first_terminal

        @invariant()
        def every_step_is_an_allowed_edge_with_a_rising_version(self):
            events = list(
                self.run.events.order_by("at", "id").values_list("from_status", "to_status")
            )
            for edge in events:
                if edge[0] != edge[1]:  # non-transition events keep the status
                    assert edge in EDGES, edge

        @invariant()
        def one_stop_request_at_most(self):
            assert self.run.events.filter(kind="stop_requested").count() <= 1
            assert self.stop_requests <= 1

        @invariant()
        def a_stop_in_progress_always_has_its_intent_saved(self):
            run = self.fresh()
            if run.status in STOP_IN_PROGRESS:
                assert run.stop_requested_at is not None
                assert run.stop_requested_by == user

        @invariant()
        def stopped_means_confirmed(self):
            run = self.fresh()
            if run.status == Status.STOPPED:
                assert run.stop_confirmed_at is not None
                assert run.stop_confirmation

        def teardown(self):
            # Whatever happened, a provider that settles brings every run to a terminal state.
            run = self.fresh()
            if run.status in ACTIVE:
                run.mark_stopped(proof="status_read", confirmation="the provider settling")
            assert self.fresh().status in TERMINAL

    return RunLifecycle


@pytest.mark.django_db
def test_no_interleaving_breaks_the_state_machine(launch, bob):
    machine = make_machine(launch, bob)
    machine.TestCase.settings = settings(
        max_examples=60,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
