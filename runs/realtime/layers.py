"""The one module that touches the private parts of Channels, channels-redis and asgiref.

Everything else uses their public API; what is here depends on names those packages do not
promise to keep (`_clean_expired`, `_do_receiving`, `_get_layer`, `_get_shard`, `_redis`,
`SyncToAsync.threadlocal`, `AsyncToSync.executors`, asyncio.Queue's `_queue`). pyproject.toml
pins the three packages exactly (`PINNED` below repeats the pins), and
tests/test_layer_contract.py fails on an upgrade that moves any of them, before a user would
see it.

Channel layers that never lose the *last* word, only intermediate ones.

Channels drops a group message for a channel that is full (django/channels#1683) and Redis
pub/sub loses what is published while a connection is down (channels_redis#256). Either way
a viewer could be left showing a state that is no longer true. These layers turn both into
a resync instead: a full channel's backlog is replaced by one `push.resync` message, and
after the Redis connection comes back every local channel gets one. A consumer answers
`push.resync` by sending its snapshot from the database, exactly as on (re)connect. Each
channel's backlog is bounded, so a consumer that cannot keep up (a socket that stopped
reading) costs at most `capacity` messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import AsyncToSync, SyncToAsync
from channels import layers
from channels.layers import get_channel_layer
from channels_redis import pubsub
from channels_redis.utils import _wrap_close

logger = logging.getLogger(__name__)

RESYNC = {"type": "push.resync"}

# The versions whose private names this module was written against (pyproject.toml pins them).
PINNED = {"channels": "4.3.2", "channels-redis": "4.3.0", "asgiref": "3.13.0"}


def owning_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop sync code runs for: the running one, or the one that called
    sync_to_async into this thread (asgiref records it in a thread-local)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    loop: asyncio.AbstractEventLoop | None = getattr(
        SyncToAsync.threadlocal, "main_event_loop", None
    )
    pid = getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None)
    if loop is None or pid != os.getpid() or loop.is_closed() or not loop.is_running():
        return None
    return loop


def sync_caller_waits() -> bool:
    """Whether this async code runs inside async_to_sync for a sync thread that waits for it
    (a sync middleware, Django's test client). asgiref runs its thread-sensitive calls on
    that thread, whose connection may hold the caller's transaction open."""
    return getattr(AsyncToSync.executors, "current", None) is not None


def is_local(layer: Any) -> bool:
    """Whether the layer lives in this process only (the embedded default)."""
    return isinstance(layer, layers.InMemoryChannelLayer)


async def has_members(group: str) -> bool:
    """Whether a channel in any process is in the group. In-memory: the layer's own table;
    Redis pub/sub: PUBSUB NUMSUB of the group's channel (each process with members of the
    group subscribes to it once). Unsure means yes."""
    layer: Any = get_channel_layer()
    if layer is None:
        return False
    if is_local(layer):
        return bool(layer.groups.get(group))
    try:
        loop_layer = layer._get_layer()
        channel = loop_layer._get_group_channel_name(group)
        shard = loop_layer._get_shard(channel)
        shard._ensure_redis()
        counts = await shard._redis.pubsub_numsub(channel)
        return bool(counts and counts[0][1] > 0)
    except Exception:
        return True


class ResyncQueue(asyncio.Queue[Any]):
    """A bounded queue whose overflow collapses the backlog into one resync marker."""

    def __init__(self, maxsize: int, marker: Callable[[], Any]) -> None:
        super().__init__(maxsize=maxsize)
        self._marker = marker

    def put_nowait(self, item: Any) -> None:
        if self.full():
            logger.info("channel layer: a full backlog became one resync")
            self.resync()
            return
        super().put_nowait(item)

    def offer(self, item: Any, key: tuple[Any, ...]) -> None:
        """A newer snapshot of the same thing (a run's row in a team group, a run's detail)
        replaces one not yet taken: a consumer that fell behind catches up with the latest
        state instead of replaying every state in between."""
        waiting = self._queue  # type: ignore[attr-defined]
        for i, (_expires, queued) in enumerate(waiting):
            if queued.get("snapshot_of") == key:
                waiting[i] = item
                return
        self.put_nowait(item)

    def resync(self) -> None:
        while not self.empty():
            self.get_nowait()
        super().put_nowait(self._marker())


class InMemoryChannelLayer(layers.InMemoryChannelLayer):
    """The embedded default's layer (one process), without the stock layer's quadratic cost.

    The stock layer sweeps every channel for expired messages on every `receive` and every
    `group_send` (one broadcast to N sockets: N sweeps of N channels), deep-copies the message
    and spawns a task per member (33-36 ms for 1,000 sockets, stack notes). Here the sweep runs
    at most once a second, a member gets a shallow copy put straight on its queue (consumers
    only read messages), a waiting push is replaced by a newer snapshot of the same run, and a
    full queue collapses into one resync."""

    _swept_at = 0.0

    def _sweep(self) -> None:
        now = time.time()
        if now - self._swept_at >= 1.0:
            self._swept_at = now
            self._clean_expired()

    def _queue(self, channel: str) -> ResyncQueue:
        queue = self.channels.get(channel)
        if isinstance(queue, ResyncQueue):
            return queue
        # Every queue of this layer is made here (send, receive and group_send come through).
        made = self.channels[channel] = ResyncQueue(
            self.get_capacity(channel), lambda: (time.time() + self.expiry, dict(RESYNC))
        )
        return made

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        self._queue(channel)
        await super().send(channel, message)

    async def receive(self, channel: str) -> dict[str, Any]:
        self.require_valid_channel_name(channel)
        self._sweep()
        queue = self._queue(channel)
        message: dict[str, Any]
        try:
            _expires, message = await queue.get()
        finally:
            if queue.empty():
                self.channels.pop(channel, None)
        return message

    def _clean_expired(self) -> None:
        """The stock sweep drops a member whose oldest message is older than `expiry` from
        every group, so a viewer that was merely slow (a busy tab under uvicorn, which waits
        on the socket) would silently get nothing more. A member still in a group gets a
        resync instead; a channel in no group is dropped as before."""
        now = time.time()
        members = {name for channels in self.groups.values() for name in channels}
        for channel, queue in list(self.channels.items()):
            # (asyncio.Queue's deque is private: typeshed leaves it out.)
            if queue.empty() or queue._queue[0][0] >= now:  # type: ignore[attr-defined]
                continue
            if channel in members and isinstance(queue, ResyncQueue):
                queue.resync()
            else:
                self.channels.pop(channel, None)
        timeout = int(now) - self.group_expiry
        for channels in self.groups.values():
            for name, joined in list(channels.items()):
                if joined and joined < timeout:
                    channels.pop(name, None)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        self._sweep()
        expires = time.time() + self.expiry
        key = None
        if message.get("type") == "push.html":
            key = (group, (message.get("meta") or {}).get("id"))
        for channel in list(self.groups.get(group, ())):
            item = (expires, {**message, "snapshot_of": key})
            queue = self._queue(channel)
            if key is not None:
                queue.offer(item, key)
            else:
                queue.put_nowait(item)


# channels_redis has no annotations: the methods these subclasses inherit are untyped, so the
# calls to them below carry `type: ignore[no-untyped-call]` (pyproject.toml exempts only direct
# calls into channels_redis, and mypy names an inherited method after the subclass).
class _Shard(pubsub.RedisSingleShardConnection):
    """Receives as channels_redis does, and after a lost connection comes back (redis-py
    reconnects and re-subscribes) tells every local channel to resync."""

    async def _do_receiving(self) -> None:
        lost = False
        while True:
            try:
                if self._pubsub and self._pubsub.subscribed:
                    message = await self._pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=0.1
                    )
                    if lost:
                        lost = False
                        logger.warning("channel layer: Redis is back; live viewers resync")
                        self.channel_layer.resync_all()
                    self._receive_message(message)  # type: ignore[no-untyped-call]
                else:
                    await asyncio.sleep(0.1)
            except (TimeoutError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                if not lost:
                    logger.warning("channel layer: Redis connection lost (%s); retrying", exc)
                lost = True
                await asyncio.sleep(0.5)


class _LoopLayer(pubsub.RedisPubSubLoopLayer):
    def __init__(self, *args: Any, capacity: int = 100, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.capacity = capacity
        stock: list[Any] = self.__dict__["_shards"]
        self._shards = [_Shard(shard.host, self) for shard in stock]  # type: ignore[no-untyped-call]

    async def _subscribe_to_channel(self, channel: str) -> None:
        marker = self.channel_layer.serialize(RESYNC)
        self.channels[channel] = ResyncQueue(self.capacity, lambda: marker)
        await self._get_shard(channel).subscribe(channel)  # type: ignore[no-untyped-call]

    def resync_all(self) -> None:
        for queue in list(self.channels.values()):
            queue.resync()


class RedisPubSubChannelLayer(pubsub.RedisPubSubChannelLayer):
    def _get_layer(self) -> Any:
        loop = asyncio.get_running_loop()
        if loop not in self._layers:
            self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return self._layers[loop]
