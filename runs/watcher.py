"""The watcher: an asyncio supervisor that owns every live provider session.

It starts pending runs, follows them (polling or streaming, the provider module decides),
applies what it learns through the model verbs, carries out stops that are due (including
stops recorded before the provider gave us an id, and retries of failed stop calls), moves
overdue stops to STOP_UNCONFIRMED, and stops runs past their timeout through the same path.

The database is the source of truth: every tick re-reads which runs need what, so a restart
(or a nudge lost on the way) costs at most one tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from .models import ACTIVE, Channel, Run, RunEvent, Status
from .providers import ProviderError
from .providers.base import Finished, OutputDelta, Running, Started, Waiting

logger = logging.getLogger(__name__)

_current: Watcher | None = None
_current_lock = threading.Lock()


class Watcher:
    def __init__(self, *, tick: float | None = None) -> None:
        self.tick_seconds = tick if tick is not None else settings.RUNBRAKE_WATCHER_TICK
        self.sessions: dict[int, asyncio.Task[None]] = {}
        self.side_tasks: set[asyncio.Task[Any]] = set()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.main_task: asyncio.Task[None] | None = None

    # --- Lifecycle ----------------------------------------------------------------------------

    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        logger.info("watcher started")
        while not self._stopping:
            try:
                await self.tick()
            except Exception:
                logger.exception("watcher tick failed; retrying next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.tick_seconds)
            self._wakeup.clear()

    async def shutdown(self) -> None:
        """Stop following runs at once; let stop calls already in flight finish (bounded).

        Sessions need no hand-over: the next watcher re-reads every active run and follows it.
        """
        self._stopping = True
        self._wakeup.set()
        sessions = list(self.sessions.values())
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        if self.side_tasks:
            _done, late = await asyncio.wait(
                list(self.side_tasks), timeout=settings.RUNBRAKE_STOP_CALL_TIMEOUT + 1
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def drain(self, *, sessions: bool = True) -> None:
        """Wait for the side tasks (stop calls) and, unless told not to, the sessions."""
        while pending := [*(self.sessions.values() if sessions else ()), *self.side_tasks]:
            await asyncio.gather(*pending, return_exceptions=True)

    def nudge(self) -> None:
        """Thread-safe: wake the loop now (a run was launched or a stop recorded)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # --- One pass over the database -----------------------------------------------------------

    async def tick(self) -> None:
        now = timezone.now()
        active_ids = [pk async for pk in Run.objects.active().values_list("pk", flat=True)]
        for pk in active_ids:
            if pk not in self.sessions:
                self._start_session(pk)

        async for run in Run.objects.stop_due(now):
            self._spawn(run.asend_stop())

        async for run in Run.objects.stop_overdue(now):
            await sync_to_async(run.mark_stop_unconfirmed)()

        async for run in Run.objects.past_timeout(now):
            self._spawn(
                run.astop(
                    actor=None,
                    channel=Channel.TIMEOUT,
                    reason=f"Timed out after {run.timeout_seconds} s (the run's own limit).",
                )
            )

    def _start_session(self, pk: int) -> None:
        task = asyncio.create_task(self.watch(pk), name=f"run-{pk}")
        self.sessions[pk] = task
        task.add_done_callback(lambda _t: self.sessions.pop(pk, None))

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

    async def _watch(self, pk: int) -> None:
        run = await Run.objects.select_related("provider_account").aget(pk=pk)
        if run.status not in ACTIVE:
            return
        provider = run.provider_account.provider()
        if run.external_id:
            events = provider.follow(run.external_id)
        else:
            if not await sync_to_async(run.claim_start)():
                # The start call was sent by a process that died before recording the id:
                # sending it again could start a second, billed run. Say so instead.
                await sync_to_async(run.mark_failed)(
                    error="Runbrake restarted while this run was being started, so its "
                    "provider id is unknown. Check the provider's dashboard, then run it again."
                )
                return
            if run.status == Status.STOPPING:
                # Stopped before it was ever sent: nothing to call, nothing billed.
                await sync_to_async(run.mark_stopped)(
                    confirmation="never having been sent to the provider"
                )
                return
            events = provider.run(run.prompt, run.options)
        try:
            async for event in events:
                await self.apply(run, event)
                if run.is_terminal:
                    break
        except ProviderError as exc:
            await self._provider_failed(run, exc)
        finally:
            await events.aclose()

    async def _provider_failed(self, run: Run, exc: ProviderError) -> None:
        await run.arefresh_from_db()
        if run.is_terminal:
            return
        if run.status in (Status.STOPPING, Status.STOP_UNCONFIRMED):
            # Following failed but a stop is under way: keep the stop path in charge.
            await sync_to_async(run.record_event)(
                RunEvent.Kind.PROVIDER_ERROR, exc.message, data=exc.as_dict()
            )
            return
        await sync_to_async(run.mark_failed)(error=exc.message)

    async def apply(self, run: Run, event: Any) -> None:
        match event:
            case Started(external_id=external_id):
                await sync_to_async(run.record_external_id)(external_id)
                if run.status in (Status.STOPPING, Status.STOP_UNCONFIRMED):
                    # The user pressed Stop before the provider told us the id: send it now.
                    await run.asend_stop()
            case Running(provider_status=provider_status):
                await run.arefresh_from_db()
                if run.status == Status.PENDING:
                    await sync_to_async(run.mark_running)(provider_status)
            case Waiting(reason=reason, seconds=seconds):
                await sync_to_async(run.record_event)(
                    RunEvent.Kind.BACKOFF,
                    f"{reason} Waiting {seconds:.1f} s.",
                    data={"seconds": seconds},
                )
            case OutputDelta():
                pass
            case Finished(status="completed") as finished:
                await run.arefresh_from_db()
                await sync_to_async(run.mark_completed)(
                    output=finished.output or "",
                    structured_output=finished.structured_output,
                    provider_status=finished.provider_status,
                )
            case Finished(status="failed") as finished:
                await run.arefresh_from_db()
                await sync_to_async(run.mark_failed)(
                    error=finished.error or "The provider reported the run as failed.",
                    provider_status=finished.provider_status,
                )
            case Finished(status="stopped") as finished:
                await run.arefresh_from_db()
                await sync_to_async(run.mark_stopped)(
                    confirmation="the provider's status",
                    data={"provider_status": finished.provider_status},
                )


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


def nudge() -> None:
    if _current is not None:
        _current.nudge()


async def stop_embedded() -> None:
    global _current
    with _current_lock:
        current, _current = _current, None
    if current is not None:
        await current.shutdown()
        if current.main_task is not None:
            await asyncio.gather(current.main_task, return_exceptions=True)
