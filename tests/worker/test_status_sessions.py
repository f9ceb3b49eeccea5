"""The heartbeat writes the sessions hash incrementally (issue 19): only the sessions that
appeared, changed or ended since the last beat, with a whole rewrite when the hash drifted
(lost, expired) and every FULL_RESYNC_BEATS beats. Against a private Redis; the worker side is
a stand-in that reports the sessions the test sets (the publisher's own edge)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from nbdworker import status
from nbdworker.contract.snapshot import sessions_key
from nbdworker.status import FULL_RESYNC_BEATS, StatusPublisher
from tests.support.redisserver import PrivateRedis, private_redis

MARK = json.dumps({"id": "a", "marked": "by the test"})


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


class Source:
    def __init__(self) -> None:
        self.stats = SimpleNamespace(generation=1, started=time.time(), follower=None)
        self.sessions: dict[str, dict] = {}

    async def session_report(self, node: str) -> dict:
        return {sid: dict(info) for sid, info in self.sessions.items()}

    async def end_sessions(self, ids: set[str]) -> None:
        pass


def session(sid: str, reads: int = 0) -> dict:
    return {"id": sid, "export": "disk", "reads": reads}


def unsigned(record: dict) -> dict:
    """A record as written, without its signature (nbdworker/contract/statusrecord.py)."""
    return {k: v for k, v in record.items() if k != "sig"}


class Beats:
    """A StatusPublisher driven beat by beat on its own event loop."""

    def __init__(self, server: PrivateRedis, node: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = aioredis.Redis.from_url(server.url)
        self.source = Source()
        self.publisher = StatusPublisher(self.client, self.source, node)
        self.raw = redis.Redis(port=server.port, decode_responses=True)
        self.key = sessions_key(node)

    def beat(self) -> dict[str, dict]:
        self.loop.run_until_complete(self.publisher.beat())
        return {sid: json.loads(value) for sid, value in self.raw.hgetall(self.key).items()}

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture
def beats(redis_server: PrivateRedis, request) -> Iterator[Beats]:
    driver = Beats(redis_server, f"sessions-{request.node.name}"[:60])
    yield driver
    driver.close()


def test_a_beat_writes_only_the_sessions_that_appeared_changed_or_ended(beats: Beats) -> None:
    beats.source.sessions = {"a": session("a"), "b": session("b"), "c": session("c")}
    assert set(beats.beat()) == {"a", "b", "c"}
    # Left as the test put it unless the worker writes "a" again.
    beats.raw.hset(beats.key, "a", MARK)
    beats.source.sessions["b"] = session("b", reads=5)
    del beats.source.sessions["c"]
    beats.source.sessions["d"] = session("d")
    hash_now = beats.beat()
    assert set(hash_now) == {"a", "b", "d"}
    assert hash_now["a"] == json.loads(MARK)  # unchanged: not written
    assert hash_now["b"]["reads"] == 5
    assert beats.raw.pttl(beats.key) > 0  # still expires if the worker dies


def test_a_lost_sessions_hash_is_rewritten_whole_at_the_next_beat(beats: Beats) -> None:
    beats.source.sessions = {"a": session("a"), "b": session("b")}
    beats.beat()
    beats.raw.delete(beats.key)  # a Redis restart without persistence, or an expiry
    assert set(beats.beat()) == {"a", "b"}
    beats.raw.hdel(beats.key, "b")
    assert set(beats.beat()) == {"a", "b"}


def test_the_hash_is_rewritten_whole_every_few_beats(beats: Beats) -> None:
    beats.source.sessions = {"a": session("a")}
    beats.beat()
    beats.raw.hset(beats.key, "a", MARK)
    seen = [beats.beat()["a"] for _ in range(FULL_RESYNC_BEATS)]
    assert seen[0] == json.loads(MARK)
    assert unsigned(seen[-1]) == session("a")


def test_a_failed_beat_makes_the_next_one_rewrite_the_hash(
    redis_server: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No periodic rewrite in this test: only the failure may cause one.
    monkeypatch.setattr(status, "FULL_RESYNC_BEATS", 10**6)
    node = "sessions-failed-beat"
    raw = redis.Redis(port=redis_server.port, decode_responses=True)
    key = sessions_key(node)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        source = Source()
        source.sessions = {"a": session("a"), "b": session("b")}
        publisher = StatusPublisher(client, source, node, interval=0.02)
        task = asyncio.create_task(publisher.run())
        try:
            await until(lambda: raw.hlen(key) == 2, "the first beat")
            raw.hset(key, "a", MARK)
            await until(lambda: publisher._beats_since_full >= 2, "two incremental beats")
            assert raw.hget(key, "a") == MARK
            report = source.session_report

            async def failing(node: str) -> dict:
                source.session_report = report  # once
                raise redis.ConnectionError("Redis went away mid-beat")

            source.session_report = failing
            await until(lambda: raw.hget(key, "a") != MARK, "the hash rewritten after a failure")
            assert unsigned(json.loads(raw.hget(key, "a"))) == session("a")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()

    asyncio.run(scenario())


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_no_sessions_leave_no_hash(beats: Beats) -> None:
    beats.source.sessions = {"a": session("a")}
    beats.beat()
    beats.source.sessions = {}
    assert beats.beat() == {}
    assert not beats.raw.exists(beats.key)
