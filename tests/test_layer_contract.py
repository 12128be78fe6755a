"""The contract runs/realtime/layers.py holds with the private parts of Channels, channels-redis and
asgiref. An upgrade that renames or reshapes any of them fails here, not in production (where
a missing name would silently turn into lost pushes or a layer that never resyncs)."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import channels_redis.utils
import pytest
from asgiref.sync import SyncToAsync, async_to_sync, sync_to_async
from channels import layers as channels_layers
from channels_redis import pubsub

from runs.realtime import layers

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_versions_are_the_ones_pinned_in_pyproject_and_in_the_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for requirement in project["project"]["dependencies"]:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^,;\s]+)", requirement)
        if found:
            pins[found.group(1).lower()] = found.group(2)
    for package, version in layers.PINNED.items():
        assert pins.get(package) == version, f"pyproject.toml must pin {package}=={version}"
        assert metadata.version(package) == version, package


@pytest.mark.parametrize(
    ("owner", "names"),
    [
        (
            channels_layers.InMemoryChannelLayer,
            ["_clean_expired", "get_capacity", "require_valid_channel_name"],
        ),
        (
            pubsub.RedisPubSubLoopLayer,
            ["_get_shard", "_get_group_channel_name", "_subscribe_to_channel"],
        ),
        (pubsub.RedisSingleShardConnection, ["_do_receiving", "_receive_message", "_ensure_redis"]),
    ],
)
def test_the_private_methods_layers_py_uses_still_exist(owner: type, names: list[str]) -> None:
    for name in names:
        assert callable(getattr(owner, name, None)), f"{owner.__qualname__}.{name}"
    assert inspect.iscoroutinefunction(pubsub.RedisSingleShardConnection._do_receiving)
    assert callable(channels_redis.utils._wrap_close)


def test_the_private_state_layers_py_reads_is_still_there() -> None:
    memory = channels_layers.InMemoryChannelLayer()
    assert isinstance(memory.channels, dict)
    assert isinstance(memory.groups, dict)
    assert isinstance(memory.expiry, int | float)
    assert isinstance(memory.group_expiry, int | float)
    redis = pubsub.RedisPubSubChannelLayer(hosts=["redis://127.0.0.1:1"])
    assert redis._layers == {}
    assert isinstance(redis._args, tuple)
    assert isinstance(redis._kwargs, dict)
    shard = pubsub.RedisSingleShardConnection("redis://127.0.0.1:1", None)
    assert shard._redis is None
    assert shard._pubsub is None
    queue: asyncio.Queue[int] = asyncio.Queue()
    queue.put_nowait(1)
    assert list(queue._queue) == [1]  # type: ignore[attr-defined]


async def test_sync_code_finds_the_loop_that_called_it_through_asgirefs_thread_local() -> None:
    loop = asyncio.get_running_loop()
    found = await sync_to_async(layers.owning_loop)()
    assert found is loop
    assert SyncToAsync.threadlocal is not None
    assert layers.owning_loop() is loop


def test_async_code_knows_when_a_sync_thread_waits_for_it_through_asgirefs_executors() -> None:
    async def inside() -> bool:
        return layers.sync_caller_waits()

    assert async_to_sync(inside)() is True
    assert asyncio.run(inside()) is False


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs Redis (REDIS_URL)")
async def test_has_members_reads_redis_subscriptions_through_the_private_path() -> None:
    layer = layers.RedisPubSubChannelLayer(hosts=[os.environ["REDIS_URL"]])
    from channels.layers import channel_layers

    # (channels_redis's pubsub layer is no BaseChannelLayer, which the channels stubs ask for;
    # Channels itself takes any layer.)
    channel_layers.set("default", layer)  # type: ignore[arg-type]
    try:
        group = f"contract-{os.getpid()}"
        assert not await layers.has_members(group)
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        assert await layers.has_members(group)
        await layer.group_discard(group, channel)
        assert not await layers.has_members(group)
    finally:
        await layer.flush()
        channel_layers.backends.clear()


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs Redis (REDIS_URL)")
async def test_deployments_with_different_prefixes_share_one_redis_without_crosstalk() -> None:
    """RUNBRAKE_REDIS_PREFIX: pub/sub ignores Redis's database number, so the prefix is what
    keeps two deployments (or two test workers, whose run ids both start at 1) apart."""
    url = os.environ["REDIS_URL"]
    ours, same, theirs = (
        layers.RedisPubSubChannelLayer(hosts=[url], prefix=prefix)
        for prefix in (f"ours-{os.getpid()}", f"ours-{os.getpid()}", f"theirs-{os.getpid()}")
    )
    try:
        same_member, their_member = await same.new_channel(), await theirs.new_channel()
        await same.group_add("run-1", same_member)
        await theirs.group_add("run-1", their_member)
        await theirs.group_send("run-1", {"type": "push.html", "html": "theirs"})
        await ours.group_send("run-1", {"type": "push.html", "html": "ours"})
        async with asyncio.timeout(10):
            assert (await same.receive(same_member))["html"] == "ours"
            assert (await theirs.receive(their_member))["html"] == "theirs"
    finally:
        for layer in (ours, same, theirs):
            await layer.flush()
