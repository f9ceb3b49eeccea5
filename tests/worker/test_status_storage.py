"""The heartbeat's storage report: statvfs of each storage root, for the console's node cards."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from nbdworker.contract.snapshot import heartbeat_key
from nbdworker.status import StatusPublisher, storage_usage
from tests.support.redisserver import PrivateRedis, private_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_storage_usage_reports_statvfs_in_bytes(tmp_path) -> None:
    usage = storage_usage(str(tmp_path))
    st = os.statvfs(tmp_path)
    assert usage["root"] == str(tmp_path)
    assert usage["total"] == st.f_blocks * st.f_frsize
    assert 0 <= usage["free"] <= usage["total"]
    assert 0 <= usage["used"] <= usage["total"]


def test_a_root_that_cannot_be_read_reports_its_error(tmp_path) -> None:
    usage = storage_usage(str(tmp_path / "missing"))
    assert usage == {"root": str(tmp_path / "missing"), "error": "No such file or directory"}


class Source:
    stats = SimpleNamespace(generation=7, started=time.time() - 10, follower=None)

    async def session_report(self, node: str) -> dict:
        return {}

    async def end_sessions(self, ids: set[str]) -> None:
        pass


def test_heartbeat_carries_each_storage_root(redis_server, tmp_path) -> None:
    async def beat() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            publisher = StatusPublisher(
                client, Source(), "n1", storage_roots=(str(tmp_path), str(tmp_path / "gone"))
            )
            await publisher.beat()
        finally:
            await client.aclose()

    asyncio.run(beat())
    heartbeat = json.loads(redis_server.client().get(heartbeat_key("n1")))
    assert [s["root"] for s in heartbeat["storage"]] == [str(tmp_path), str(tmp_path / "gone")]
    assert heartbeat["storage"][0]["total"] > 0
    assert "error" in heartbeat["storage"][1]
