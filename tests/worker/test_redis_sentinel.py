"""nbdworker/contract/redisconn.py's `connect` against real sentinels: the sync client (the web
side) and the asyncio client (nbdworker) built from one ``redis+sentinel://`` URL reach the
primary the sentinels name, and after that primary is killed and the replica promoted, the same
clients write to the new primary. (The whole stack through a failover:
tests/e2e/test_redis_sentinel.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis
import redis.asyncio

from nbdworker.contract.redisconn import connect
from tests.support.polling import poll
from tests.support.redissentinel import sentinel_cluster
from tests.support.redisserver import free_port

OPTIONS = {"socket_connect_timeout": 1.0, "socket_timeout": 3.0, "decode_responses": True}


def test_sync_and_asyncio_clients_follow_a_failover(tmp_path: Path) -> None:
    with sentinel_cluster(tmp_path) as cluster:
        # The first sentinel listed is dead: the clients ask the next one.
        url = cluster.sentinel_url([free_port(), *cluster.sentinel_ports])
        web = connect(redis, url, **OPTIONS)

        def web_writes(value: str) -> bool:
            try:
                return bool(web.set("from-web", value))
            except redis.ConnectionError:
                return False  # a pooled connection to the dead primary fails once

        async def worker_writes(worker: redis.asyncio.Redis, value: str) -> None:
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    await worker.set("from-worker", value)
                    return
                except redis.ConnectionError:
                    assert asyncio.get_running_loop().time() < deadline, "asyncio client stuck"
                    await asyncio.sleep(0.05)

        async def scenario() -> None:
            worker = connect(redis.asyncio, url, **OPTIONS)
            assert web_writes("before")
            await worker_writes(worker, "before")
            assert cluster.primary.client().mget("from-web", "from-worker") == ["before"] * 2

            cluster.kill_primary()
            promoted = await asyncio.to_thread(cluster.wait_for_promotion)

            poll(lambda: web_writes("after"), "the web client writing after failover", 30)
            await worker_writes(worker, "after")
            assert promoted.client().mget("from-web", "from-worker") == ["after"] * 2
            await worker.aclose()

        asyncio.run(scenario())
