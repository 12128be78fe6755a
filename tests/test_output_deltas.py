"""The output delta protocol (runs/realtime/live.py, "Output deltas") end to end: a real watcher
streaming from the IntelligenceBox simulator over HTTP, run pages on the real ASGI stack, and
a model of what static/js/app.js does with the frames. Offsets must line up, a page that
missed text must be made whole by asking, and what the database keeps must match what pages
were shown when the watcher goes away."""

from __future__ import annotations

import asyncio
import html
import json
import re
from contextlib import AsyncExitStack
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from runs.models import Run, Status
from runs.realtime import consumers, layers, live
from runs.watcher.watcher import Watcher
from tests.conftest import sim_account
from tests.livekit import eventually
from tests.sockets import websocket
from tests.test_streaming import launch_on

pytestmark = pytest.mark.django_db(transaction=True)

LIVE_TEXT = re.compile(r"<div [^>]*data-output-live[^>]*>(.*?)</div>", re.S)
OUTPUT_END = re.compile(r'id="run-output-\d+"[^>]*data-output-end="(\d+)"')


def still_listed(layer: Any, group: str) -> bool:
    """Whether the in-memory layer still lists a channel in the group (Redis: not checked)."""
    return bool(layers.is_local(layer) and layer.groups.get(group))


class PageText:
    """A run page's output as static/js/app.js keeps it."""

    def __init__(self) -> None:
        self.text = ""
        self.end = 0
        self.wants = 0
        self.appends: list[dict[str, Any]] = []
        self.finished = False

    def take(self, message: str) -> bool:
        """Apply one socket message; True when the page would ask for the text again."""
        if message.startswith("{"):
            frame = json.loads(message)
            if frame["type"] == live.TEXT:
                self.text, self.end = frame["text"], frame["end"]
                return False
            assert frame["type"] == live.APPEND, frame
            self.appends.append(frame)
            if frame["end"] <= self.end:
                return False
            if frame["at"] > self.end:
                return True
            self.text += frame["text"][self.end - frame["at"] :]
            self.end = frame["end"]
            return False
        if 'data-status="completed"' in message:
            self.finished = True
        section = OUTPUT_END.search(message)
        shown = LIVE_TEXT.search(message)
        if section and shown and int(section.group(1)) >= self.end:
            self.text, self.end = html.unescape(shown.group(1)), int(section.group(1))
        return False


async def follow(page: Any, text: PageText, until: Any, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not until():
            if text.take(await page.receive_from(timeout=timeout)):
                text.wants += 1
                await page.send_to(text_data=json.dumps({"type": live.WANT}))


@pytest.fixture
async def ib_run(acme, sim, bob):
    async def make(prompt: str) -> Run:
        return await launch_on(
            "intelligencebox", lambda kind: sim_account(acme, sim, kind), bob, prompt
        )

    return make


async def test_a_page_open_from_the_start_gets_every_character_once_in_order(bob, ib_run):
    run = await ib_run("deltas sim:duration=1.5 sim:chunks=15")
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
        assert connected
        text = PageText()
        text.take(await page.receive_from(timeout=5))
        watching = asyncio.create_task(Watcher().watch(run.pk))
        try:
            await follow(page, text, lambda: text.finished)
        finally:
            await watching
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert text.wants == 0
    assert text.text == run.output
    # Appends follow on from each other: each starts where the one before ended.
    assert len(text.appends) >= 3
    ends = [0] + [frame["end"] for frame in text.appends]
    assert [frame["at"] for frame in text.appends] == ends[:-1]


async def test_a_page_that_opens_mid_stream_asks_once_and_is_made_whole(bob, ib_run, settings):
    # Nothing is saved while the run streams, so the page's first snapshot is behind what
    # the watcher holds, and the first append it sees leaves a gap.
    settings.RUNBRAKE_OUTPUT_FLUSH_SECONDS = 60
    run = await ib_run("gap sim:duration=2.5 sim:chunks=25")
    watcher = Watcher()
    watcher._loop = asyncio.get_running_loop()
    live.serve_watcher(watcher.on_message)
    watching = asyncio.create_task(watcher.watch(run.pk))
    try:

        def sent_unwatched() -> bool:
            session = watcher.live_sessions.get(run.pk)
            return session is not None and session.sent > 0

        await eventually(sent_unwatched, "output sent while nobody watched", timeout=15)
        async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
            assert connected
            text = PageText()
            await follow(page, text, lambda: text.finished)
    finally:
        await watching
        live.unserve_watcher(watcher.on_message)
    await run.arefresh_from_db()
    assert run.status == Status.COMPLETED
    assert text.wants == 1
    assert text.text == run.output


async def test_what_pages_were_shown_is_saved_when_the_watcher_shuts_down(bob, ib_run, settings):
    settings.RUNBRAKE_OUTPUT_FLUSH_SECONDS = 60
    run = await ib_run("restart sim:duration=20 sim:chunks=200")
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
        assert connected
        text = PageText()
        text.take(await page.receive_from(timeout=5))
        watcher = Watcher()
        watcher._start_session(run.pk)
        await follow(page, text, lambda: text.end > 20)
        # A second Ctrl-C: IntelligenceBox streams are not waited for.
        watcher._hurry.set()
        await watcher.shutdown()
        # The last frames are on their way; then the page holds exactly what was saved.
        await run.arefresh_from_db()
        saved = run.output
        await follow(page, text, lambda: text.end >= len(saved), timeout=5)
    assert len(saved) > 20
    assert text.text == saved


async def test_sockets_of_one_process_share_one_subscription_per_group(bob, alice, launch):
    run = await sync_to_async(launch)("shared")
    layer: Any = get_channel_layer()
    group = live.run_group(run.pk)
    pages = []
    async with AsyncExitStack() as sockets:
        for user in (bob, alice, bob):
            page, connected = await sockets.enter_async_context(
                websocket(f"/ws/runs/{run.pk}/", user)
            )
            assert connected
            await page.receive_from(timeout=5)
            pages.append(page)
        hub = live.hub()
        assert len(hub.members[group]) == 3
        assert group in hub.readers
        if layers.is_local(layer):
            assert len(layer.groups[group]) == 1  # one channel in the layer, not three
        await sync_to_async(run.mark_running)("PROCESSING")
        for page in pages:
            assert f'id="run-status-{run.pk}"' in await page.receive_from(timeout=5)
        for page in pages:
            await page.disconnect()
    await eventually(
        lambda: group not in hub.readers and not still_listed(layer, group),
        "the group left once nobody watches",
    )


async def test_a_want_is_answered_with_the_saved_output_at_most_once_a_second(bob, launch):
    run = await sync_to_async(launch)("wanted")
    await sync_to_async(run.mark_running)("PROCESSING")
    await sync_to_async(Run.objects.record_outputs)({run.pk: ("saved so far", 0)})
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
        assert connected
        await page.receive_from(timeout=5)
        for _ in range(3):
            await page.send_to(text_data=json.dumps({"type": live.WANT}))
        answer = await page.receive_from(timeout=5)
        assert answer.lstrip().startswith(f'<section id="run-output-{run.pk}"')
        assert 'data-output-end="12"' in answer
        assert "saved so far" in answer
        assert await page.receive_nothing(timeout=0.3)


@pytest.mark.parametrize(
    "sent",
    ['{"type": "output.text"}', "want", '["output.want"]', '{"type": "output.want"' + " " * 300],
)
async def test_anything_but_a_want_closes_the_run_socket(bob, launch, sent):
    run = await sync_to_async(launch)("hostile")
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
        assert connected
        await page.receive_from(timeout=5)
        await page.send_to(text_data=sent)
        closed = await page.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 4400}


async def test_a_socket_that_cannot_keep_up_gets_a_snapshot_instead_of_a_backlog(
    bob, launch, monkeypatch
):
    """A client that stopped reading holds its socket's sends; what piles up meanwhile is
    bounded and replaced by one fresh snapshot once it reads again."""
    run = await sync_to_async(launch)("slow")
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
        assert connected
        await page.receive_from(timeout=5)
        consumer = next(c for c in consumers._open if c.group == live.run_group(run.pk))
        reading = asyncio.Event()
        sent: list[str] = []
        send = consumer.send

        async def slow_send(text_data: str | None = None, **kwargs: Any) -> None:
            await reading.wait()
            sent.append(text_data or "")
            await send(text_data=text_data, **kwargs)

        monkeypatch.setattr(consumer, "send", slow_send)
        for n in range(consumers.BACKLOG + 10):
            consumer.write(live.output_frame(live.APPEND, run.pk, n, n + 1, "x"))
        assert consumer._backlog is not None
        assert len(consumer._backlog) <= consumers.BACKLOG
        reading.set()
        await eventually(
            lambda: len(sent) >= 2 and f'id="run-status-{run.pk}"' in sent[-1],
            "a snapshot after the backlog",
        )
        # The first frame (already being sent), then the snapshot: not the 70 frames behind it.
        assert len(sent) == 2
        assert json.loads(sent[0])["at"] == 0


async def test_a_change_committed_while_a_page_reads_its_snapshot_still_reaches_it(
    bob, launch, monkeypatch
):
    """Seen in an independent load run: the Running push fell between the snapshot read and
    the subscription, and the page showed Pending for the whole run."""
    run = await sync_to_async(launch)("racing")
    read_snapshot = consumers._run_snapshot

    async def snapshot_then_change(user: Any, run_id: int) -> Any:
        found = await read_snapshot(user, run_id)
        await sync_to_async(run.mark_running)("PROCESSING")
        await live.drain()
        return found

    monkeypatch.setattr(consumers, "_run_snapshot", snapshot_then_change)
    async with websocket(f"/ws/runs/{run.pk}/", bob) as (page, connected):
        assert connected
        first = await page.receive_from(timeout=5)
        assert 'data-status="pending"' in first
        second = await page.receive_from(timeout=5)
        assert 'data-status="running"' in second
