"""nbdworker/contract/redisconn.py's `connect` against real sentinels: the sync client (the web
side) and the asyncio client (nbdworker) built from one ``redis+sentinel://`` URL reach the
primary the sentinels name, and after that primary is killed and the replica promoted, the same
clients write to the new primary; with ``rediss+sentinel://`` all of it over TLS, Celery's
kombu transport included. (The whole stack through a failover:
tests/e2e/test_redis_sentinel.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import kombu
import pytest
import redis
import redis.asyncio

from nbdworker.contract.redisconn import celery_settings, connect
from tests.support.pki import make_pki
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


def test_rediss_sentinel_uses_tls_to_the_sentinels_and_the_data_nodes(tmp_path: Path) -> None:
    """Sentinels and data nodes listening with TLS only: `connect` (sync and asyncio) and
    Celery's settings (a real kombu connection through the Sentinel transport) reach the primary
    with the REDIS_TLS_* files, and still do after a failover."""
    with sentinel_cluster(
        tmp_path / "redis", sentinels=1, tls=make_pki(tmp_path / "pki")
    ) as cluster:
        url, env = cluster.url, cluster.client_env
        assert url.startswith("rediss+sentinel://")
        with pytest.raises(redis.ConnectionError):  # what the rest relies on: no plaintext
            redis.Redis(port=cluster.sentinel_ports[0], socket_connect_timeout=1).ping()
        web = connect(redis, url, env, **OPTIONS)

        def round_trip_through_celerys_transport(payload: str) -> str:
            celery = celery_settings(url, env)
            with kombu.Connection(
                celery["broker_url"],
                transport_options=celery["broker_transport_options"],
                ssl=celery["broker_use_ssl"],
                connect_timeout=5,
            ) as connection:
                queue = connection.SimpleQueue("sentinel-tls-test")
                queue.put({"payload": payload})
                message = queue.get(timeout=10)
                message.ack()
                queue.close()
                return message.payload["payload"]

        async def asyncio_round_trip(value: str) -> str | None:
            worker = connect(redis.asyncio, url, env, **OPTIONS)
            try:
                await worker.set("from-worker", value)
                return await worker.get("from-worker")
            finally:
                await worker.aclose()

        assert web.set("from-web", "before") and web.get("from-web") == "before"
        assert asyncio.run(asyncio_round_trip("before")) == "before"
        assert round_trip_through_celerys_transport("before") == "before"

        cluster.kill_primary()
        promoted = cluster.wait_for_promotion()

        def web_writes() -> bool:
            try:
                return bool(web.set("from-web", "after"))
            except redis.ConnectionError:
                return False

        poll(web_writes, "the web client writing over TLS after the failover", timeout=30)
        assert asyncio.run(asyncio_round_trip("after")) == "after"
        assert round_trip_through_celerys_transport("after") == "after"
        assert promoted.client().mget("from-web", "from-worker") == ["after", "after"]
