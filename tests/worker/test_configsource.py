"""nbdworker/configsource.py against a real, private redis-server: start, follow, refuse,
reconnect, cache."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from nbdworker.configsource import ConfigSource
from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.nodekey import NODE_KEY_ENV, derive_node_key
from nbdworker.contract.snapshot import (
    MAX_SNAPSHOT_BYTES,
    config_channel,
    config_key,
    heartbeat_key,
    kick_channel,
    sign_snapshot,
)
from tests.support.metrics import scrape, value
from tests.support.polling import poll
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.worker import run_worker_main, start_worker

SECRET = "configsource-test-secret"
WAIT = 10.0
_names = itertools.count()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def node() -> str:
    return f"cs-{os.getpid()}-{next(_names)}"


def snapshot(node: str, generation: int, *exports: str, secret: str = SECRET) -> str:
    """The snapshot the web side with master secret `secret` publishes for `node`."""
    config = WorkerConfig.from_dict(
        {
            "version": 1,
            "generation": generation,
            "node": node,
            "exports": [{"name": e, "backend": "memory", "size": 1 << 20} for e in exports],
        }
    )
    return sign_snapshot(config, derive_node_key(secret, node))


class Recorder:
    """The `apply` and `on_rejected` callbacks: what the source applied and refused."""

    def __init__(self) -> None:
        self.applied: list[WorkerConfig] = []
        self.rejected: list[str] = []

    def apply(self, config: WorkerConfig) -> None:
        self.applied.append(config)

    def reject(self, kind: str) -> None:
        self.rejected.append(kind)


async def until(predicate, what: str) -> None:
    """Poll `predicate` up to a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def make_source(url: str, node: str, state_dir: Path, rec: Recorder) -> ConfigSource:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1.0)
    key = derive_node_key(SECRET, node)
    return ConfigSource(client, node, key, state_dir, apply=rec.apply, on_rejected=rec.reject)


def test_initial_config_comes_from_redis_and_is_cached_0600(shared_redis, node, tmp_path) -> None:
    shared_redis.client().set(config_key(node), snapshot(node, 3, "a"))

    async def main() -> WorkerConfig:
        source = make_source(shared_redis.url, node, tmp_path / "state", Recorder())
        try:
            return await source.initial()
        finally:
            await source.client.aclose()

    config = asyncio.run(main())
    assert config.generation == 3
    assert [e.name for e in config.exports] == ["a"]
    cache = tmp_path / "state" / f"config-{node}.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_redis_unreachable_at_start_uses_the_cache(shared_redis, node, tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / f"config-{node}.json").write_text(snapshot(node, 7, "cached"))
    dead_url = "redis://127.0.0.1:1/0"

    async def main() -> WorkerConfig:
        source = make_source(dead_url, node, state, Recorder())
        try:
            return await source.initial()
        finally:
            await source.client.aclose()

    config = asyncio.run(main())
    assert (config.generation, [e.name for e in config.exports]) == (7, ["cached"])


def test_no_redis_and_no_cache_starts_empty(node, tmp_path) -> None:
    async def main() -> WorkerConfig:
        source = make_source("redis://127.0.0.1:1/0", node, tmp_path / "state", Recorder())
        try:
            return await source.initial()
        finally:
            await source.client.aclose()

    config = asyncio.run(main())
    assert (config.generation, config.exports, config.node) == (0, (), node)


def test_a_tampered_cache_is_refused(node, tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    envelope = json.loads(snapshot(node, 7, "cached"))
    envelope["payload"] = envelope["payload"].replace("cached", "hacked")
    (state / f"config-{node}.json").write_text(json.dumps(envelope))
    rec = Recorder()

    async def main() -> WorkerConfig:
        source = make_source("redis://127.0.0.1:1/0", node, state, rec)
        try:
            return await source.initial()
        finally:
            await source.client.aclose()

    assert asyncio.run(main()).exports == ()
    assert rec.rejected == ["bad_signature"]


def test_an_older_snapshot_in_redis_does_not_roll_back_the_cache(
    shared_redis, node, tmp_path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / f"config-{node}.json").write_text(snapshot(node, 9, "newer"))
    shared_redis.client().set(config_key(node), snapshot(node, 4, "older"))

    async def main() -> WorkerConfig:
        source = make_source(shared_redis.url, node, state, Recorder())
        try:
            return await source.initial()
        finally:
            await source.client.aclose()

    assert asyncio.run(main()).generation == 9
    assert "newer" in (state / f"config-{node}.json").read_text()


def test_follows_notices_and_refuses_forged_older_and_foreign(shared_redis, node, tmp_path) -> None:
    r = shared_redis.client()
    r.set(config_key(node), snapshot(node, 1, "a"))
    rec = Recorder()

    def publish(envelope: str, generation: int) -> None:
        r.set(config_key(node), envelope)
        r.publish(config_channel(node), f"{node}:{generation}")

    async def main() -> None:
        source = make_source(shared_redis.url, node, tmp_path / "state", rec)
        await source.initial()
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.connected.wait(), WAIT)
            publish(snapshot(node, 2, "a", "b"), 2)
            await until(lambda: rec.applied, "generation 2")
            assert rec.applied[-1].generation == 2

            publish(snapshot(node, 3, "forged", secret="not-the-secret"), 3)
            await until(lambda: "bad_signature" in rec.rejected, "the forged refusal")
            # Another node's snapshot is signed with that node's key: not ours.
            rec.rejected.clear()
            publish(snapshot("someone-else", 4, "x"), 4)
            await until(lambda: "bad_signature" in rec.rejected, "the other key's refusal")
            # Signed with our key yet naming another node (a web-side mistake): refused too.
            other = WorkerConfig.from_dict({"version": 1, "generation": 4, "node": "else"})
            publish(sign_snapshot(other, derive_node_key(SECRET, node)), 4)
            await until(lambda: "other_node" in rec.rejected, "the other-node refusal")
            # A notice that claims a newer generation for a snapshot that is older.
            publish(snapshot(node, 1, "old"), 5)
            await until(lambda: "old_generation" in rec.rejected, "the older refusal")
            assert [c.generation for c in rec.applied] == [2]
            assert source.generation == 2

            publish(snapshot(node, 6, "c"), 6)
            await until(lambda: len(rec.applied) == 2, "generation 6")
            assert [e.name for e in rec.applied[-1].exports] == ["c"]
            cached = (tmp_path / "state" / f"config-{node}.json").read_text()
            assert json.loads(json.loads(cached)["payload"])["generation"] == 6
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await source.client.aclose()

    asyncio.run(main())


def test_refetches_after_a_redis_restart(node, tmp_path) -> None:
    """A change made while the worker was cut off (no notice reaches it) is picked up when
    it reconnects."""
    rec = Recorder()
    with private_redis(tmp_path / "redis") as server:
        server.client().set(config_key(node), snapshot(node, 1, "a"))

        async def main() -> None:
            source = make_source(server.url, node, tmp_path / "state", rec)
            await source.initial()
            task = asyncio.create_task(source.run())
            try:
                await asyncio.wait_for(source.connected.wait(), WAIT)
                server.stop()
                await until(lambda: not source.connected.is_set(), "the disconnect")
                server.start()
                # Written with no notice at all: only the fetch after reconnecting can see it.
                server.client().set(config_key(node), snapshot(node, 2, "a", "b"))
                await until(lambda: rec.applied, "generation 2 after reconnecting")
                assert rec.applied[-1].generation == 2
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await source.client.aclose()

        asyncio.run(main())


def test_worker_without_config_or_key_refuses_to_start(tmp_path) -> None:
    unset = ("NBDWEB_CONFIG_SECRET", NODE_KEY_ENV, "NBD_LISTEN", "NBDWORKER_NODE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["NBDWEB_DATA_DIR"] = str(tmp_path)  # no node key nor config_secret file in it
    result = run_worker_main("--listen", "127.0.0.1:0", env=env)
    assert result.returncode == 2
    assert f"{NODE_KEY_ENV} is unset" in result.stderr
    assert str(tmp_path / "node_keys" / "default") in result.stderr
    assert "NBDWEB_CONFIG_SECRET is unset" in result.stderr
    assert str(tmp_path / "config_secret") in result.stderr


def test_worker_with_a_bad_sentinel_url_refuses_to_start_saying_why(tmp_path) -> None:
    env = {**os.environ, "NBDWEB_CONFIG_SECRET": SECRET, "NBDWEB_DATA_DIR": str(tmp_path)}
    env["REDIS_URL"] = "redis+sentinel://:hunter2@s1:26379,s2:port/mymaster/0"
    result = run_worker_main("--listen", "127.0.0.1:0", env=env)
    assert result.returncode == 2
    assert "REDIS_URL: bad sentinel address 's2:port'" in result.stderr
    assert "hunter2" not in result.stderr


def test_worker_with_an_unencoded_password_in_redis_url_refuses_to_start_quoting_none(
    tmp_path,
) -> None:
    env = {**os.environ, "NBDWEB_CONFIG_SECRET": SECRET, "NBDWEB_DATA_DIR": str(tmp_path)}
    env["REDIS_URL"] = "redis://:hunt/er2@127.0.0.1:6379/0"
    result = run_worker_main("--listen", "127.0.0.1:0", env=env)
    assert result.returncode == 2
    assert "REDIS_URL: malformed Redis URL" in result.stderr
    assert "hunt" not in result.stderr and "er2" not in result.stderr


# -- hostile publishers ------------------------------------------------------------------------


def follower_env(server: PrivateRedis, node: str, tmp_path: Path) -> dict[str, str]:
    return {
        "REDIS_URL": server.url,
        NODE_KEY_ENV: derive_node_key(SECRET, node),
        "NBDWORKER_NODE": node,
        "NBDWEB_DATA_DIR": str(tmp_path / "data"),
    }


# Each of these ended the follower task for good before (a Unicode digit passes
# str.isdigit() but int() refuses it; int() refuses more than 4300 digits; bytes that are not
# UTF-8 made the kick handler's decode raise).
BAD_MESSAGES = [
    (config_channel, "{node}:\u00b2"),
    (config_channel, "{node}:\u0663\u0663"),
    (config_channel, "{node}:" + "9" * 5000),
    (config_channel, b"\xff\xfe:\x80"),
    (config_channel, b"{node}:\xff"),
    (kick_channel, b"\xff\xfe\x80"),
    (kick_channel, b""),
]


def test_malformed_notices_are_counted_and_later_configs_still_apply(
    shared_redis, node, tmp_path
) -> None:
    """Hostile messages on both channels, then a real change: it is applied, every bad message
    was logged and counted, and the heartbeat says the follower is following."""
    r = shared_redis.client()
    raw = redis.Redis(port=shared_redis.port)
    r.set(config_key(node), snapshot(node, 1, "a"))
    worker = start_worker(
        None,
        workdir=tmp_path / "worker",
        storage_root=tmp_path,
        env=follower_env(shared_redis, node, tmp_path),
        args=["--metrics-listen", "127.0.0.1:0"],
    )
    try:
        worker.wait_for_log(r"following nbdweb:config-changed")
        for channel, message in BAD_MESSAGES:
            if isinstance(message, str):
                message = message.format(node=node)
            else:
                message = message.replace(b"{node}", node.encode())
            raw.publish(channel(node), message)
        r.set(config_key(node), snapshot(node, 2, "a", "b"))
        r.publish(config_channel(node), f"{node}:2")
        poll(
            lambda: value(scrape(worker), "nbdworker_config_generation") == 2,
            "generation 2 applied after the bad messages",
        )
        samples = scrape(worker)
        channels = (config_channel(node), kick_channel(node))
        rejected = {
            ch: value(samples, "nbdworker_pubsub_messages_rejected_total", channel=ch)
            for ch in channels
        }
        assert rejected == dict(zip(channels, (5, 2), strict=True)), rejected
        assert value(samples, "nbdworker_config_follower_up") == 1
        assert value(samples, "nbdworker_config_follower_restarts_total") == 0
        assert worker.log.count("ignored a malformed message on nbdweb:") == 7, worker.log
        beat = poll(
            lambda: json.loads(r.get(heartbeat_key(node)) or "{}").get("config_follower"),
            "the follower's health in the heartbeat",
        )
        assert beat["state"] == "following"
        assert beat["messages_rejected"] == 7
    finally:
        worker.stop()


def test_a_follower_that_fails_unexpectedly_is_restarted_and_counted(
    shared_redis, node, tmp_path
) -> None:
    """Whatever escapes the follower (here: a kick callback that raises once), it is restarted,
    counted, and goes on applying configs."""
    r = shared_redis.client()
    r.set(config_key(node), snapshot(node, 1, "a"))
    rec = Recorder()
    kicks = []

    def on_kick() -> None:
        kicks.append(1)
        if len(kicks) == 2:  # the first is the one after subscribing
            raise RuntimeError("a bug in the kick handler")

    async def main() -> None:
        source = make_source(shared_redis.url, node, tmp_path / "state", rec)
        source.on_kick = on_kick
        await source.initial()
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.connected.wait(), WAIT)
            r.publish(kick_channel(node), node)
            await until(lambda: source.health.restarts == 1, "the restart")
            assert "RuntimeError" in (source.health.last_error or "")
            await asyncio.wait_for(source.connected.wait(), WAIT)
            r.set(config_key(node), snapshot(node, 2, "a", "b"))
            r.publish(config_channel(node), f"{node}:2")
            await until(lambda: rec.applied, "generation 2 after the restart")
            assert source.health.state == "following"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await source.client.aclose()

    asyncio.run(main())


def test_an_oversized_snapshot_is_refused_before_it_is_read(shared_redis, node, tmp_path) -> None:
    """A value above MAX_SNAPSHOT_BYTES is refused from its length alone (STRLEN), counted."""
    r = shared_redis.client()
    r.set(config_key(node), snapshot(node, 1, "a"))
    rec = Recorder()

    async def main() -> None:
        source = make_source(shared_redis.url, node, tmp_path / "state", rec)
        await source.initial()
        reads = []
        real_getrange = source.client.getrange
        real_get = source.client.get

        async def counting_get(*args):
            reads.append(args)
            return await real_get(*args)

        async def counting_getrange(*args):
            reads.append(args)
            return await real_getrange(*args)

        source.client.get = counting_get
        source.client.getrange = counting_getrange
        try:
            # A sparse value of just over the bound: SETRANGE past the end pads with zeroes.
            await source.client.setrange(config_key(node), MAX_SNAPSHOT_BYTES, b"x")
            assert await source.fetch() is False
            assert rec.rejected == ["too_large"]
            # (The head of the entries format is looked for first: it is not there.)
            assert [args for args in reads if args[0] == config_key(node)] == []
        finally:
            await source.client.aclose()

    asyncio.run(main())
