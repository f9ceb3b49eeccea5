"""nbdworker/status.py against a real worker and a private Redis: what anyone who can write to
Redis puts in the kick set cannot stop the heartbeat."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import redis

from nbdworker.contract.snapshot import heartbeat_key, kick_channel, kicks_key
from tests.support.polling import poll
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.worker import run_worker

SECRET = "status-test-secret"


@pytest.fixture
def redis_server(tmp_path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path / "redis") as server:
        yield server


def test_a_malformed_kick_id_does_not_stop_the_heartbeat(redis_server, tmp_path) -> None:
    """A session id that is not UTF-8 in the kick set ended the status task for good before:
    no heartbeat, the node shown offline."""
    node = f"status-{os.getpid()}"
    env = {
        "REDIS_URL": redis_server.url,
        "NBDWEB_CONFIG_SECRET": SECRET,
        "NBDWORKER_NODE": node,
        "NBDWEB_DATA_DIR": str(tmp_path / "data"),
    }
    raw = redis.Redis(port=redis_server.port)
    with run_worker(None, workdir=tmp_path / "w", storage_root=tmp_path, env=env) as worker:
        worker.wait_for_log(r"following nbdweb:config-changed")
        raw.sadd(kicks_key(node), b"\xff\xfe", b"ok-looking-id")
        raw.publish(kick_channel(node), node)
        worker.wait_for_log(r"kick set: ignored 1 malformed session id\(s\)")
        first = json.loads(raw.get(heartbeat_key(node)) or "{}").get("uptime", 0.0)

        def uptime() -> float:
            return json.loads(raw.get(heartbeat_key(node)) or "{}").get("uptime", 0.0)

        # Two beats later: the heartbeat is still refreshed.
        poll(lambda: uptime() >= first + 4.0, "two heartbeats after the malformed kick")
        assert raw.scard(kicks_key(node)) == 0
