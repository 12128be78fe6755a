"""The embedded default's channel layer: every group member gets each message, in order; a
full member loses only its own copy; members that left get nothing."""

from __future__ import annotations

from runs.realtime.layers import InMemoryChannelLayer as LocalChannelLayer


async def test_it_delivers_each_message_to_every_member_in_order() -> None:
    layer = LocalChannelLayer()
    channels = [await layer.new_channel() for _ in range(3)]
    for channel in channels:
        await layer.group_add("team-1", channel)
    await layer.group_send("team-1", {"type": "push.html", "html": "one", "meta": {"id": 1}})
    await layer.group_send("team-1", {"type": "push.html", "html": "two", "meta": {"id": 2}})
    for channel in channels:
        assert (await layer.receive(channel))["html"] == "one"
        assert (await layer.receive(channel))["html"] == "two"


async def test_a_full_member_resyncs_and_the_others_still_get_it() -> None:
    layer = LocalChannelLayer(capacity=1)
    full, free = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("team-1", full)
    await layer.group_send("team-1", {"type": "push.html", "html": "first", "meta": {"id": 1}})
    await layer.group_add("team-1", free)
    await layer.group_send("team-1", {"type": "push.html", "html": "second", "meta": {"id": 2}})
    assert (await layer.receive(full))["type"] == "push.resync"
    assert (await layer.receive(free))["html"] == "second"


async def test_members_that_left_get_nothing() -> None:
    layer = LocalChannelLayer()
    gone, stays = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("run-2", gone)
    await layer.group_add("run-2", stays)
    await layer.group_discard("run-2", gone)
    await layer.group_send("run-2", {"type": "push.html", "html": "hello"})
    assert (await layer.receive(stays))["html"] == "hello"
    assert gone not in layer.channels


async def test_a_slow_member_with_expired_messages_resyncs_instead_of_being_dropped() -> None:
    layer = LocalChannelLayer()
    slow = await layer.new_channel()
    await layer.group_add("run-3", slow)
    await layer.group_send("run-3", {"type": "push.html", "html": "old"})
    backlog = layer.channels[slow]._queue  # type: ignore[attr-defined]
    backlog[0] = (0.0, backlog[0][1])  # as if it had waited past the layer's expiry
    layer._clean_expired()
    assert slow in layer.groups["run-3"]
    assert (await layer.receive(slow))["type"] == "push.resync"
    await layer.group_send("run-3", {"type": "push.html", "html": "new"})
    assert (await layer.receive(slow))["html"] == "new"


async def test_a_newer_snapshot_of_a_run_replaces_one_not_yet_taken() -> None:
    layer = LocalChannelLayer()
    behind = await layer.new_channel()
    await layer.group_add("team-3", behind)
    for html, run in (("run 7 stopping", 7), ("run 8 running", 8), ("run 7 stopped", 7)):
        await layer.group_send("team-3", {"type": "push.html", "html": html, "meta": {"id": run}})
    # The reader fell behind: it gets run 7's latest state in its place, and run 8's too.
    assert (await layer.receive(behind))["html"] == "run 7 stopped"
    assert (await layer.receive(behind))["html"] == "run 8 running"
    await layer.group_send(
        "team-3", {"type": "push.html", "html": "run 7 again", "meta": {"id": 7}}
    )
    assert (await layer.receive(behind))["html"] == "run 7 again"


async def test_a_push_to_many_sockets_lets_the_rest_of_the_process_run_between_batches() -> None:
    """The hub hands a message to its sockets in batches of FANOUT_BATCH, turning the event
    loop between them: a push to 1,000 sockets must not hold every request, handshake and
    stream of the process until the last socket has it."""
    import asyncio
    from typing import Any

    from runs.realtime import live

    order: list[str] = []
    first_delivered, all_delivered = asyncio.Event(), asyncio.Event()

    class Socket:
        def __init__(self, name: str) -> None:
            self.name = name

        def deliver(self, message: dict[str, Any], cuts: dict[Any, str]) -> None:
            order.append(self.name)
            first_delivered.set()
            if sum(name != "meanwhile" for name in order) == len(sockets):
                all_delivered.set()

    async def meanwhile() -> None:
        await first_delivered.wait()
        order.append("meanwhile")

    hub = live.Hub(LocalChannelLayer())
    sockets = [Socket(f"socket-{i}") for i in range(live.FANOUT_BATCH * 3)]
    for socket in sockets:
        await hub.join("run-1", socket)
    other = asyncio.create_task(meanwhile())
    await hub.layer.group_send("run-1", {"type": "push.html", "html": "x", "meta": None})
    await asyncio.wait_for(asyncio.gather(other, all_delivered.wait()), timeout=5)
    assert sorted(name for name in order if name != "meanwhile") == sorted(s.name for s in sockets)
    assert order.index("meanwhile") <= live.FANOUT_BATCH
    for socket in sockets:
        hub.leave("run-1", socket)
