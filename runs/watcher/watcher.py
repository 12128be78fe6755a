"""The watcher: an asyncio supervisor that owns every live provider session.

It starts pending runs, follows them (polling or streaming, the provider module decides),
applies what it learns through the model verbs, carries out stops that are due (including
stops recorded before the provider gave us an id, and retries of failed stop calls), moves
overdue stops to STOP_UNCONFIRMED, and stops runs past their timeout through the same path.

The database is the source of truth: every tick re-reads which runs need what, so a restart
(or a nudge lost on the way) costs at most one tick.

Several watchers can run at once (`manage.py runwatcher`, or one per web process in the
embedded default). Each tick a watcher renews the leases on the runs it holds and claims free
or orphaned ones (`RunQuerySet.claim_watch`), so every active run has exactly one watcher and a
dead watcher's runs move to a live one within a lease. Stop calls do not depend on who holds
the stream: the web process that records a stop makes the first call itself, and the holding
watcher retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Q
from django.utils import timezone

from runs import dbthreads
from runs.models import (
    ACTIVE,
    STOP_IN_PROGRESS,
    Channel,
    Proof,
    Run,
    RunEvent,
    Status,
)
from runs.providers import ProviderError
from runs.providers.base import (
    Event,
    Finished,
    OutputDelta,
    Provider,
    QuotaWait,
    Running,
    Started,
    StartRetry,
    StreamEnded,
    Waiting,
    proves_nothing_started,
)
from runs.providers.errors import QuotaExhausted
from runs.realtime import live

logger = logging.getLogger(__name__)

_current: Watcher | None = None
# The embedded watcher while it shuts down (a second Ctrl-C hurries it).
_shutting_down: Watcher | None = None
_current_lock = threading.Lock()


def new_identity() -> str:
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"


class Watcher:
    def __init__(self, *, tick: float | None = None, capacity: int | None = None) -> None:
        self.identity = new_identity()
        self.tick_seconds = tick if tick is not None else settings.RUNBRAKE_WATCHER_TICK
        self.capacity = capacity if capacity is not None else settings.RUNBRAKE_WATCHER_CAPACITY
        self.sessions: dict[int, asyncio.Task[None]] = {}
        # The sessions following a provider now, by run: a page that missed output asks them.
        self.live_sessions: dict[int, Session] = {}
        # Runs whose start call is in flight: a graceful shutdown waits for their ids, since a
        # start cut off before its id is saved can never be followed or safely re-sent.
        self.starting: dict[int, asyncio.Event] = {}
        # Runs streaming from a provider that aborts them if the stream's connection closes.
        self.connection_bound: set[int] = set()
        # Runs whose session crashed: the next one marks their kept text unsure first.
        self.crashed: set[int] = set()
        self.side_tasks: set[asyncio.Task[Any]] = set()
        self.writer: OutputWriter | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        # Set by a second Ctrl-C: stop waiting for connection-bound runs to finish.
        self._hurry = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.main_task: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # --- Lifecycle ----------------------------------------------------------------------------

    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        logger.info("watcher %s started", self.identity)
        live.serve_watcher(self.on_message)
        listener = asyncio.create_task(live.listen_as_watcher(self.on_message, self.tick_seconds))
        self._start_heartbeat()
        try:
            while not self._stopping:
                try:
                    await self.tick()
                except Exception:
                    logger.exception("watcher tick failed; retrying next tick")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=self.tick_seconds)
                self._wakeup.clear()
        finally:
            live.unserve_watcher(self.on_message)
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._keep_leases())

    async def _keep_leases(self) -> None:
        """Renew the leases on a timer of their own, a third of a lease apart, on a thread of
        their own: a tick slowed down by a busy database must not let another watcher take
        runs this one is following perfectly well."""
        every = settings.RUNBRAKE_WATCHER_LEASE_SECONDS / 3
        while True:
            try:
                await _claim(self.identity, 0)  # renews what it holds; room for 0 claims none
            except Exception:
                logger.warning("watcher %s could not renew leases", self.identity, exc_info=True)
            await asyncio.sleep(every)

    def on_message(self, message: dict[str, Any]) -> None:
        """Thread-safe: a launch (wake up now) or a page's want of a run's text (live.py)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_message, message)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == live.NUDGE:
            self._wakeup.set()
        elif kind == live.WANT and isinstance(run_id := message.get("run"), int):
            session = self.live_sessions.get(run_id)
            if session is not None:
                session.want_text()

    def hurry(self) -> None:
        """Thread- and signal-handler safe: a shutdown under way stops waiting for
        connection-bound runs (whose provider then ends them when the stream closes)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._hurry.set)

    def request_shutdown(self) -> None:
        """Signal-handler safe: ask run_forever to end (then call shutdown()); asked again (a
        second Ctrl-C), stop waiting for connection-bound runs."""
        if self._stopping:
            self.hurry()
        self._stopping = True
        self._wakeup.set()

    async def shutdown(self) -> None:
        """Hand the runs back, keeping their leases until then:

        1. let the tick under way finish (it starts nothing more once stopping);
        2. wait (bounded by the provider timeout) for start calls to get their provider ids;
        3. let connection-bound streams (IntelligenceBox) finish, bounded;
        4. stop following the rest and save their last output;
        5. let stop calls in flight finish, bounded;
        6. release the leases, so another watcher takes the runs on its next tick.
        """
        self._stopping = True
        self._wakeup.set()
        # From here on launches and wants are for the other watchers.
        live.unserve_watcher(self.on_message)
        self._start_heartbeat()
        current = asyncio.current_task()
        if self.main_task is not None and self.main_task is not current:
            await asyncio.wait([self.main_task], timeout=settings.RUNBRAKE_PROVIDER_TIMEOUT)
        if self.starting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.RUNBRAKE_PROVIDER_TIMEOUT + 1):
                    await asyncio.gather(*(done.wait() for done in self.starting.values()))
        await self._drain_connection_bound()
        sessions = list(self.sessions.values())
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await self._close_writer()
        if self.side_tasks:
            _done, late = await asyncio.wait(
                list(self.side_tasks), timeout=settings.RUNBRAKE_STOP_CALL_TIMEOUT + 1
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        try:
            released = await Run.objects.arelease_watch(self.identity)
        except Exception:
            logger.exception("could not hand runs back; they move when the leases lapse")
        else:
            if released:
                logger.info("watcher %s handed back %d runs", self.identity, released)
                await sync_to_async(live.nudge_watchers)()

    async def _drain_connection_bound(self) -> None:
        """Closing an IntelligenceBox stream ends the chat, so those sessions are given up to
        RUNBRAKE_WATCHER_DRAIN_SECONDS to finish while this watcher keeps their leases."""
        bound = [self.sessions[pk] for pk in self.connection_bound if pk in self.sessions]
        if not bound:
            return
        logger.info(
            "watcher %s lets %d connection-bound runs finish (up to %g s)",
            self.identity,
            len(bound),
            settings.RUNBRAKE_WATCHER_DRAIN_SECONDS,
        )
        finished = asyncio.ensure_future(
            asyncio.wait(bound, timeout=settings.RUNBRAKE_WATCHER_DRAIN_SECONDS)
        )
        hurried = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait([finished, hurried], return_when=asyncio.FIRST_COMPLETED)
        for waiter in (finished, hurried):
            waiter.cancel()
        await asyncio.gather(finished, hurried, return_exceptions=True)
        if self._hurry.is_set():
            logger.info("watcher %s stops waiting for them", self.identity)

    async def _close_writer(self) -> None:
        if self._writer_task is not None:
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
            self._writer_task = None
        if self.writer is not None:
            try:
                await self.writer.close()
            except Exception:
                logger.exception("could not save the last output before shutting down")

    async def drain(self, *, sessions: bool = True) -> None:
        """Wait for the side tasks (stop calls) and, unless told not to, the sessions."""
        while pending := [*(self.sessions.values() if sessions else ()), *self.side_tasks]:
            await asyncio.gather(*pending, return_exceptions=True)

    # --- One pass over the database -----------------------------------------------------------

    async def tick(self) -> None:
        # The sessions' ORM calls share one thread where no request ever ends, so nothing else
        # would close its connection: one the database dropped (a restart) would fail every
        # session for good. Closed here each tick (CONN_MAX_AGE=0: back to the pool), the
        # next call takes a live one.
        await sync_to_async(close_old_connections)()
        held = set(await _claim(self.identity, self.capacity))
        for pk in held:
            if pk not in self.sessions:
                self._start_session(pk)
        await self._drop_lost_sessions(held)

        now = timezone.now()
        # Deadlines and retries for this watcher's runs and for any no watcher holds (all
        # watchers full, or one just died): each step is a conditional update or a leased
        # call, so two watchers reaching the same run cannot both act.
        mine = Run.objects.filter(
            Q(watched_by=self.identity) | Q(watched_by="") | Q(watch_lease_until__lt=now)
        )
        async for run in mine.stop_due(now):
            self._spawn(run.asend_stop())
        await self._cut_start_backoffs()

        async for run in mine.stop_overdue(now):
            await dbthreads.call(run.pk, run.mark_stop_unconfirmed)

        # Text whose reader never vouched for it (it died): any watcher marks it, once.
        await sync_to_async(Run.objects.mark_unconfirmed_text)(now)

        async for run in mine.past_timeout(now):
            self._spawn(
                run.astop(
                    actor=None,
                    channel=Channel.TIMEOUT,
                    reason=f"Timed out after {run.timeout_seconds} s (the run's own limit).",
                )
            )

        async for run in mine.stalled(now):
            self._spawn(
                run.astop(
                    actor=None,
                    channel=Channel.STALL,
                    reason=(
                        f"No progress for {_minutes(run.no_progress_seconds)}: no new output "
                        "and no change in the provider's status."
                    ),
                )
            )

    async def _drop_lost_sessions(self, held: set[int]) -> None:
        """Stop following runs this watcher no longer holds: another watcher took them (this
        one missed its renewals, say after a long database stall), so no run is followed twice
        for long; or they ended without the session (a webhook, a stop answer), so a polling
        session spends no more of the provider's quota on them."""
        others = [pk for pk in self.sessions if pk not in held]
        if not others:
            return
        still_mine = Run.objects.active().filter(pk__in=others, watched_by=self.identity)
        keep = {pk async for pk in still_mine.values_list("pk", flat=True)}
        for pk in others:
            task = self.sessions.get(pk)
            # Once: a session letting go saves what it showed (Session.consume), and a
            # second cancel would cut that short.
            if pk in keep or task is None or task.cancelling():
                continue
            logger.info("watcher %s stops following run %s (ended or taken)", self.identity, pk)
            task.cancel()

    async def _cut_start_backoffs(self) -> None:
        """A stop came while a session of this watcher waits to send a refused start call
        again: nothing is out at the provider, so the wait (a Retry-After may be long) is cut
        short; the next session finds the run stopped before it started
        (`_follow_or_start`)."""
        waiting = {pk for pk, s in self.live_sessions.items() if s.start_backing_off}
        if not waiting:
            return
        stopped = Run.objects.filter(pk__in=waiting, status__in=STOP_IN_PROGRESS)
        cut = []
        async for pk in stopped.values_list("pk", flat=True):
            session, task = self.live_sessions.get(pk), self.sessions.get(pk)
            if session is not None and session.start_backing_off and task is not None:
                session.start_backing_off = False
                task.cancel()
                cut.append((pk, task))
        for pk, task in cut:
            await asyncio.gather(task, return_exceptions=True)
            self._start_session(pk)  # now, not a tick later: the page waits for it

    def _start_session(self, pk: int) -> None:
        if self._stopping:
            return
        task = asyncio.create_task(self.watch(pk), name=f"run-{pk}")
        self.sessions[pk] = task
        # Only its own entry: a session started anew for the run may already be there.
        task.add_done_callback(
            lambda done: self.sessions.pop(pk) if self.sessions.get(pk) is done else None
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)

    # --- One run's session --------------------------------------------------------------------

    async def watch(self, pk: int) -> None:
        try:
            await self._watch(pk)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("session for run %s crashed; it is retried next tick", pk)
            self.crashed.add(pk)

    async def _watch(self, pk: int) -> None:
        if pk in self.crashed:
            crashed = await dbthreads.call(pk, Run.objects.get, pk=pk)
            await dbthreads.call(pk, crashed.mark_text_unsure, "The session reading it crashed")
            self.crashed.discard(pk)
        run = await dbthreads.call(pk, Run.objects.select_related("provider_account").get, pk=pk)
        if run.status not in ACTIVE:
            return
        try:
            await self._follow_or_start(run)
        finally:
            self._started(pk)
            self.connection_bound.discard(pk)
            self.live_sessions.pop(pk, None)

    async def _follow_or_start(self, run: Run) -> None:
        pk = run.pk
        provider = run.provider_account.provider()
        while True:
            if run.external_id:
                events = provider.follow(run.external_id, run.provider_refs)
            else:
                self.starting[pk] = asyncio.Event()
                if not await dbthreads.call(run.pk, run.claim_start):
                    await self._start_claimed_elsewhere(run)
                    return
                if run.status in STOP_IN_PROGRESS:
                    await self._never_sent(run)
                    return
                events = provider.run(run.prompt, run.options)
            session = Session(
                run,
                provider,
                writer=self._output_writer(),
                on_started=lambda: self._started(pk),
                may_start_again=lambda: self._may_start_again(pk),
                reader=self.identity,
            )
            self.live_sessions[pk] = session
            if provider.disconnect_aborts:
                self.connection_bound.add(pk)
            try:
                await session.consume(events)
                return
            except QuotaExhausted as exc:
                if run.external_id:
                    raise  # a followed run's clients wait for their quota themselves
                # The create call is over the account's quota: nothing was sent. The run is
                # queued, cancellable at no cost, and launched when the budget allows.
                self._started(pk)
                await dbthreads.call(run.pk, run.queue_for_quota, exc)
                if not await self._wait_queued(run, exc.retry_after or 0.0):
                    return
            except ProviderError as exc:
                await session.flush()
                await self._provider_failed(run, exc)
                return

    async def _never_sent(self, run: Run) -> None:
        # Stopped before the provider started it: nothing to call, nothing billed.
        await dbthreads.call(run.pk, run.mark_stopped_unstarted)

    async def _wait_queued(self, run: Run, seconds: float) -> bool:
        """Wait for a queued launch's turn, a tick at a time so a stop pressed meanwhile ends
        it at once. True when it is time to send it; False when it ended or this watcher is
        shutting down (the run stays queued for whoever holds it next)."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._stopping:
            await dbthreads.call(run.pk, run.refresh_from_db)
            if run.status in STOP_IN_PROGRESS:
                await self._never_sent(run)
                return False
            if run.status != Status.PENDING or run.external_id:
                return False
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                # Not once a shutdown began meanwhile (during the read above): it waits only
                # for the start calls it saw out, so this one could be cut off mid-flight.
                return not self._stopping
            await asyncio.sleep(min(left, self.tick_seconds))
        return False

    async def _start_claimed_elsewhere(self, run: Run) -> None:
        """Another process sent this run's start call and has not recorded the provider's id.
        While that call may still be answered, wait (the next tick looks again). After that,
        the process died with the call out: sending it again could start a second, billed
        run, so say so instead."""
        started = run.start_attempted_at
        patience = settings.RUNBRAKE_PROVIDER_TIMEOUT + settings.RUNBRAKE_WATCHER_LEASE_SECONDS
        if started is not None and (timezone.now() - started).total_seconds() < patience:
            return
        await dbthreads.call(
            run.pk,
            run.mark_failed,
            error="Runbrake restarted while this run was being started, so its "
            "provider id is unknown. Check the provider's dashboard, then run it again.",
            proof=Proof.RUNBRAKE,
        )

    def _output_writer(self) -> OutputWriter:
        if self.writer is None:
            self.writer = OutputWriter(
                settings.RUNBRAKE_OUTPUT_FLUSH_SECONDS, settings.RUNBRAKE_OUTPUT_PUSH_SECONDS
            )
            self._writer_task = asyncio.create_task(self.writer.run_forever())
        return self.writer

    def _started(self, pk: int) -> None:
        done = self.starting.pop(pk, None)
        if done is not None:
            done.set()

    def _may_start_again(self, pk: int) -> bool:
        """A session holding a run's start claim is about to resend a refused start call.
        Not while shutting down: the run is handed back unsent (a call cut off mid-flight
        could lose the provider's id). Else the call is out again, and a shutdown waits for
        its provider id as for the first call's."""
        if self._stopping:
            return False
        self.starting[pk] = asyncio.Event()
        return True

    async def _provider_failed(self, run: Run, exc: ProviderError) -> None:
        await dbthreads.call(run.pk, run.refresh_from_db)
        if run.is_terminal:
            return
        if run.status in STOP_IN_PROGRESS and not run.external_id and proves_nothing_started(exc):
            # The provider refused the start call for good (or it gave up trying): stopped
            # before it started.
            await dbthreads.call(run.pk, run.mark_stopped_unstarted, refused=True)
            return
        if (
            run.status in STOP_IN_PROGRESS
            and exc.code == "NOT_FOUND"
            and await dbthreads.call(run.pk, run.never_answered_for)
        ):
            # An id of our own (IntelligenceBox) that the provider never answered for: its
            # start call was refused or never sent, and the provider says no such run exists.
            await dbthreads.call(
                run.pk,
                run.mark_stopped,
                confirmation="the provider's status not knowing the run, which it never "
                "answered for: nothing runs there",
                proof=Proof.STATUS_READ,
            )
            return
        if run.status in STOP_IN_PROGRESS:
            # Following failed but a stop is under way: keep the stop path in charge.
            await dbthreads.call(
                run.pk,
                run.record_event,
                RunEvent.Kind.PROVIDER_ERROR,
                exc.message,
                data=exc.as_dict(),
            )
            return
        # A refusal with an HTTP status is the provider's own answer; anything else (a run it
        # no longer knows, a lost connection that cannot be followed) is Runbrake's finding.
        await dbthreads.call(
            run.pk,
            run.mark_failed,
            error=exc.message,
            proof=Proof.PROVIDER_REFUSAL if exc.http_status else Proof.RUNBRAKE,
        )


@sync_to_async(thread_sensitive=False)
def _claim(identity: str, capacity: int) -> list[int]:
    """The heartbeat runs on its own thread and connection: queued behind the sessions'
    writes on the shared ORM thread, it could miss its lease under load and let another
    watcher take runs this one is following perfectly well."""
    try:
        return Run.objects.claim_watch(
            identity, lease_seconds=settings.RUNBRAKE_WATCHER_LEASE_SECONDS, limit=capacity
        )
    finally:
        connection.close()


class OutputWriter:
    """Sends and saves the output of every session of one watcher.

    Every `push_interval` the new text of each run is sent to the pages that show it, as
    appends (live.py, "Output deltas"); every `interval` all runs with new text are saved in
    one thread hop and one transaction. A thousand runs streaming cost one statement batch
    a second instead of a thousand UPDATEs, renders and pushes.

    Batches are written one after another, so a run's saved text never goes backwards, and a
    session that needs its text saved now (before a status change) waits for the next batch.
    """

    def __init__(self, interval: float, push_interval: float = 0.05) -> None:
        self.interval = interval
        self.push_interval = push_interval
        self.pending: dict[int, Session] = {}
        self.unsent: dict[int, Session] = {}
        self.in_flight: set[int] = set()
        self.waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()

    def mark(self, session: Session) -> None:
        self.pending[session.run.pk] = session
        self.unsent[session.run.pk] = session

    def mark_unsent(self, session: Session) -> None:
        self.unsent[session.run.pk] = session

    async def flush_now(self, session: Session) -> None:
        """Return once the session's latest text is saved (batches run in order, so waiting
        for the next one also waits for one already under way with older text)."""
        if session.dirty:
            self.mark(session)
        elif session.run.pk not in self.in_flight:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(done)
        self._wake.set()
        await done

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        save_at = loop.time() + self.interval
        while True:
            wait = min(self.push_interval, max(0.0, save_at - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
            await self.send_frames()
            if self.waiters or loop.time() >= save_at:
                await self.write_batch()
                save_at = loop.time() + self.interval

    async def send_frames(self) -> None:
        if self.unsent:
            batch, self.unsent = self.unsent, {}
            await live.send_frames(batch.values())

    async def write_batch(self) -> None:
        batch, self.pending = self.pending, {}
        waiters, self.waiters = self.waiters, []
        texts = {pk: session.take_text() for pk, session in batch.items()}
        self.in_flight = set(texts)
        try:
            # Many runs in one transaction: in no run's lane (each session waits for the batch
            # holding its text before it changes its run's status, so none overtakes it).
            stopping = await dbthreads.call(
                None,
                Run.objects.record_outputs,
                {pk: (text, batch[pk].run.no_progress_seconds) for pk, text in texts.items()},
            )
        except Exception as exc:
            logger.exception("saving the output of %d runs failed; retrying", len(batch))
            for pk, session in batch.items():
                session.dirty = True
                self.pending.setdefault(pk, session)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        finally:
            self.in_flight = set()
        for pk, text in texts.items():
            batch[pk].run.output = text
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        for pk in stopping:
            await batch[pk]._check_output_after_stop()

    async def close(self) -> None:
        """Send and write what is still pending (shutdown)."""
        await self.send_frames()
        while self.pending or self.waiters:
            await self.write_batch()


class Session:
    """One run's live connection to its provider: applies events, batches output."""

    def __init__(
        self,
        run: Run,
        provider: Provider,
        *,
        writer: OutputWriter,
        on_started: Callable[[], None] | None = None,
        # Asked before a refused start call is resent: False hands the run back unsent.
        may_start_again: Callable[[], bool] | None = None,
        reader: str = "",
    ) -> None:
        self.run = run
        # The watcher this session reads for (who vouches for its text: keep_text_after_end).
        self.reader = reader
        self.provider = provider
        self.on_started = on_started
        self.may_start_again = may_start_again
        self.writer = writer
        self.text = run.output
        # Set when the stream was lost and the provider cannot give the text since: what is
        # kept is marked incomplete until the provider's own final text replaces it.
        self.incomplete = run.output_incomplete
        self.dirty = False
        # How much of the text the pages were sent, and whether they need all of it again
        # (the provider replaced it, or a page missed some).
        self.sent = len(self.text)
        self.resend = False
        self.reported_output_after_stop = False
        self.progress_marker: str | None = None
        # Waiting to send a refused start call again: nothing is out at the provider, so a
        # stop may cut the wait short (Watcher.tick).
        self.start_backing_off = False

    async def consume(self, events: AsyncGenerator[Event]) -> None:
        # Reading the stream never waits for the database: deltas land in memory and the
        # watcher's writer saves them every RUNBRAKE_OUTPUT_FLUSH_SECONDS (all of its runs in
        # one transaction). When writes are slow, saves coalesce instead of a backlog building
        # up in the socket.
        try:
            await self._consume(events)
        finally:
            try:
                await self.flush()
            finally:
                if self._may_owe_text():
                    # Saves skip a run that ended without this session (a stop answer, a
                    # webhook): what it showed the pages since its last save is kept here.
                    await dbthreads.call(
                        self.run.pk,
                        self.run.keep_text_after_end,
                        self.text,
                        self.incomplete,
                        reader=self.reader,
                    )

    def _may_owe_text(self) -> bool:
        """Whether the run may have ended without this session's text, or waits for it to
        vouch for that text. Not when the session ended the run itself with its own text
        (the usual end: no read of the run for nothing)."""
        run = self.run
        if not run.is_terminal:
            return True  # it may have ended elsewhere since this copy was read
        unconfirmed_by = (run.stop_answer or {}).get("text_unconfirmed_by")
        return run.output != self.text or (bool(self.reader) and unconfirmed_by == self.reader)

    @property
    def run_id(self) -> int:
        return self.run.pk

    def take_frame(self) -> str | None:
        """What the pages have not been sent yet, as one frame (live.py, "Output deltas")."""
        pk, end = self.run.pk, len(self.text)
        if self.resend or end - self.sent > live.OUTPUT_SHOWN_CHARS:
            self.resend, self.sent = False, end
            return live.tail_frame(pk, self.text)
        if end > self.sent:
            at, self.sent = self.sent, end
            return live.output_frame(live.APPEND, pk, at, end, self.text[at:])
        return None

    def skip_frame(self) -> None:
        """Nobody watches: a page that opens later starts from the saved text (and asks for
        the rest when its first frame does not follow on)."""
        self.resend, self.sent = False, len(self.text)

    def want_text(self) -> None:
        """A page missed some output: send the whole text (its shown tail) next."""
        self.resend = True
        self.writer.mark_unsent(self)

    def take_text(self) -> str:
        """The writer takes the latest text to save; new deltas mark the session dirty again."""
        self.dirty = False
        return self.text

    async def _consume(self, events: AsyncGenerator[Event]) -> None:
        source: AsyncGenerator[Event] | None = events
        while source is not None:
            following = None
            try:
                async for event in source:
                    outcome = await self.apply(event)
                    if outcome == FOLLOW:
                        following = self.provider.follow(
                            self.run.external_id, self.run.provider_refs
                        )
                        break
                    if outcome == LET_GO or self.run.is_terminal:
                        break
            finally:
                await source.aclose()
            source = following

    async def flush(self) -> None:
        await self.writer.flush_now(self)

    async def apply(self, event: Any) -> str | None:
        run = self.run
        if not isinstance(event, OutputDelta):
            await self.flush()
        if run.quota_endpoint in SESSION_CALLS and not isinstance(
            event, QuotaWait | Waiting | StartRetry
        ):
            # The call that waited went out: the run no longer waits for the quota.
            await dbthreads.call(run.pk, run.clear_quota_wait, *SESSION_CALLS)
        match event:
            case Started(external_id=external_id, refs=refs, acknowledged=acknowledged):
                await dbthreads.call(
                    run.pk, run.record_external_id, external_id, refs, acknowledged=acknowledged
                )
                if self.on_started is not None:
                    self.on_started()
                if run.status in STOP_IN_PROGRESS:
                    # The user pressed Stop before the provider told us the id: send it now.
                    await run.asend_stop()
            case Running(provider_status=provider_status, progress=progress):
                await dbthreads.call(run.pk, run.refresh_from_db)
                if run.status == Status.PENDING:
                    await dbthreads.call(run.pk, run.mark_running, provider_status)
                elif run.status == Status.RUNNING and (
                    progress is None
                    or progress != self.progress_marker
                    or provider_status != run.provider_status
                ):
                    await dbthreads.call(run.pk, run.record_progress, provider_status)
                self.progress_marker = progress
            case OutputDelta(text=text, replace=replace):
                self.text = text if replace else self.text + text
                self.resend = self.resend or replace
                self.writer.mark_unsent(self)
                if replace and self.incomplete:
                    # The provider's own whole text: nothing is missing any more.
                    self.incomplete = False
                    await dbthreads.call(run.pk, run.record_output_complete)
                if not self.dirty:
                    self.dirty = True
                    self.writer.mark(self)
            case Waiting(reason=reason, seconds=seconds, announce=announce):
                if not run.external_id:
                    # Only a start call is refused before the provider named the run.
                    return await self._start_refused(reason, seconds, announce=announce)
                if announce:
                    await dbthreads.call(
                        run.pk,
                        run.record_event,
                        RunEvent.Kind.BACKOFF,
                        f"{reason} Waiting {seconds:.1f} s.",
                        data={"seconds": seconds},
                    )
            case StartRetry():
                return await self._start_again()
            case QuotaWait(endpoint=endpoint, seconds=seconds, message=message):
                await dbthreads.call(run.pk, run.record_quota_wait, endpoint, seconds, message)
            case Finished() as finished:
                await self._finished(finished)
            case StreamEnded():
                return await self._stream_ended()
        return None

    async def _start_refused(self, reason: str, seconds: float, *, announce: bool) -> str | None:
        """The start call was refused, so nothing is out at the provider while the session
        waits to send it again. A stop already pressed ends the run here, with nothing more
        sent (this session still holds the start's claim: no other start is out either).
        Otherwise the claim is released with the refusal on the timeline, in one update: a
        watcher taking the run over need not wait out a call that may be lost."""
        run = self.run
        await dbthreads.call(run.pk, run.refresh_from_db)
        if run.status in STOP_IN_PROGRESS:
            await dbthreads.call(run.pk, run.mark_stopped_unstarted, refused=True)
            return LET_GO
        await dbthreads.call(
            run.pk,
            run.record_start_refused,
            f"{reason} Waiting {seconds:.1f} s.",
            seconds,
            announce=announce,
        )
        self.start_backing_off = True
        if self.on_started is not None:
            self.on_started()  # no start call is out: a shutdown need not wait for one
        return None

    async def _start_again(self) -> str | None:
        """The refused start call is about to go out again: only under this session's claim
        (one start call at a time, ever; another watcher may have taken the run meanwhile),
        and not if the run was stopped meanwhile, nor while the watcher shuts down (then the
        run is handed back with nothing out, for the next holder to start)."""
        run = self.run
        self.start_backing_off = False
        if run.external_id:
            # An id of our own (IntelligenceBox): there is no start claim to take, and the
            # resend goes out even during a shutdown, which lets such streams finish (a box
            # never sent its chat would fail it for the next holder as unknown).
            await dbthreads.call(run.pk, run.refresh_from_db)
        elif not await dbthreads.call(run.pk, run.claim_start):
            return LET_GO
        if run.status in STOP_IN_PROGRESS:
            await dbthreads.call(run.pk, run.mark_stopped_unstarted, refused=True)
            return LET_GO
        if not run.external_id and self.may_start_again is not None and not self.may_start_again():
            await dbthreads.call(run.pk, run.release_start)
            return LET_GO
        return None

    async def _check_output_after_stop(self) -> None:
        """A provider that accepted the stop but keeps producing output is reported (and the
        stop is re-sent when its recheck time comes), never taken as stopped."""
        run = self.run
        await dbthreads.call(
            run.pk, run.refresh_from_db, fields=["status", "stop_sent_at", "stop_answer"]
        )
        if (
            self.reported_output_after_stop
            or run.status not in STOP_IN_PROGRESS
            or not run.stop_answer
            or run.stop_sent_at is None
        ):
            return
        seconds = (timezone.now() - run.stop_sent_at).total_seconds()
        if seconds < LATE_OUTPUT_GRACE:
            return
        self.reported_output_after_stop = True
        await dbthreads.call(
            run.pk,
            run.record_event,
            RunEvent.Kind.OUTPUT_AFTER_STOP,
            f"{self.provider.label} is still producing output {seconds:.1f} s after it accepted "
            "the stop. Runbrake sends the stop again and does not count the run as stopped.",
        )

    async def _provider_has_the_stop(self) -> bool:
        """Whether the provider answered a stop call for this run: for a provider that ends a
        stopped reply exactly like a finished one (Dify), only then is a normal end the stop
        landing rather than the run completing first. The answer and the stream's end race
        (two connections, often two processes), so a call still out is waited for, never
        longer than its lease."""
        run = self.run
        while True:
            await dbthreads.call(
                run.pk, run.refresh_from_db, fields=["status", "stop_sent_at", "stop_answer"]
            )
            if not run.stop_call_unanswered or run.status not in STOP_IN_PROGRESS:
                return bool(run.stop_answer)
            await asyncio.sleep(STOP_ANSWER_POLL)

    async def _finished(self, finished: Finished) -> None:
        run = self.run
        await self.flush()
        await dbthreads.call(run.pk, run.refresh_from_db)
        if finished.output is not None:
            # The provider's whole final text: it replaces what streamed, and completes it.
            self.text, self.incomplete = finished.output, False
        label = self.provider.label
        if (
            finished.status == "completed"
            and self.provider.normal_end_confirms_stop
            and (
                run.status == Status.STOPPING
                # Past the deadline a normal end may be the run finishing despite the stop,
                # unless it ended with no text at all: stopped before its first word.
                or (run.status == Status.STOP_UNCONFIRMED and not self.text)
            )
            and await self._provider_has_the_stop()
        ):
            # Dify ends a stopped reply exactly like a finished one (its stream's message_end,
            # or its history's saved answer).
            stream = finished.via == "stream"
            await dbthreads.call(run.pk, run.keep_text, self.text, self.incomplete)
            await dbthreads.call(
                run.pk,
                run.mark_stopped,
                confirmation=f"{label}'s stream ending after the stop"
                if stream
                else f"{label}'s record of the message, settled after the stop",
                proof=Proof.STREAM_END if stream else Proof.HISTORY,
                data={"provider_status": finished.provider_status},
                usage=finished.usage.as_dict() if finished.usage else None,
            )
            return
        await dbthreads.call(
            run.pk,
            run.settle,
            finished,
            output=self.text,
            label=label,
            output_incomplete=self.incomplete,
        )

    async def _stream_ended(self) -> str | None:
        """The stream closed with no terminal event: after a stop that is the stop landing;
        otherwise the connection was lost and the run is followed through its status."""
        run = self.run
        await dbthreads.call(run.pk, run.refresh_from_db)
        if run.is_terminal:
            return None
        label = self.provider.label
        stopping = run.status in STOP_IN_PROGRESS and run.stop_sent_at is not None
        if (
            stopping
            and self.provider.normal_end_confirms_stop
            and await self._provider_has_the_stop()
        ):
            await dbthreads.call(run.pk, run.keep_text, self.text, self.incomplete)
            await dbthreads.call(
                run.pk,
                run.mark_stopped,
                confirmation=f"{label}'s stream ending after the stop",
                proof=Proof.STREAM_END,
            )
            return None
        if stopping:
            try:
                result = await self.provider.status(run.external_id, run.provider_refs)
            except ProviderError:
                result = None
            if result is not None and result.terminal is not None:
                await self._finished(
                    Finished(
                        result.terminal, result.provider_status, error=result.error, via="status"
                    )
                )
                return None
        # What streams from here on cannot be fetched from most providers' status: the text
        # is kept and marked incomplete until the provider's own final text arrives.
        self.incomplete = True
        await dbthreads.call(
            run.pk,
            run.record_event,
            RunEvent.Kind.STREAM_LOST,
            f"The connection to {label}'s stream ended early after {len(self.text):,} "
            f"characters; following the run through {label}'s status instead.",
            output_incomplete=True,
        )
        return FOLLOW


FOLLOW = "follow"
# The session stops reading its events: another process has the run's start now.
LET_GO = "let go"
# The calls a session makes (a stop's quota wait is the stop path's to clear).
SESSION_CALLS = ("create", "status", "output")


def _minutes(seconds: int) -> str:
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


# How long after a stop was accepted output may still trickle in before it is reported.
LATE_OUTPUT_GRACE = 2.0
# How often a session looks for the stop call's answer it waits for (_provider_has_the_stop).
STOP_ANSWER_POLL = 0.1


# --- The embedded watcher (one per web process in the default setup) --------------------------


def start_embedded() -> Watcher | None:
    """Start the watcher on the running loop, once per process."""
    global _current
    if not settings.RUNBRAKE_EMBEDDED_WATCHER:
        return None
    with _current_lock:
        if _current is None:
            _current = Watcher()
            _current.main_task = asyncio.get_running_loop().create_task(_current.run_forever())
        return _current


def hurry_embedded() -> None:
    """A second Ctrl-C: the embedded watcher's shutdown stops waiting for streams."""
    for watcher in (_current, _shutting_down):
        if watcher is not None:
            watcher.hurry()


async def stop_embedded() -> None:
    global _current, _shutting_down
    with _current_lock:
        current, _current = _current, None
        _shutting_down = current or _shutting_down
    if current is not None:
        await current.shutdown()
        if current.main_task is not None:
            await asyncio.gather(current.main_task, return_exceptions=True)
