"""nbdworker/status.py against a real worker and a private Redis: what anyone who can write to
Redis puts in the kick set (ids that are not UTF-8, giant ones, a key of another type) neither
stops the heartbeat nor is read without bound."""

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


def _env(redis_server: PrivateRedis, node: str, tmp_path) -> dict[str, str]:
    return {
        "REDIS_URL": redis_server.url,
        "NBDWEB_CONFIG_SECRET": SECRET,
        "NBDWORKER_NODE": node,
        "NBDWEB_DATA_DIR": str(tmp_path / "data"),
    }


def test_giant_kick_ids_are_dropped_in_redis_not_read(redis_server, tmp_path) -> None:
    """Eight 8 MiB members in the kick set: the worker popped all 64 MiB before."""
    node = f"status-{os.getpid()}"
    raw = redis.Redis(port=redis_server.port)
    env = _env(redis_server, node, tmp_path)
    with run_worker(None, workdir=tmp_path / "w", storage_root=tmp_path, env=env) as worker:
        worker.wait_for_log(r"following nbdweb:config-changed")
        raw.sadd(kicks_key(node), *(bytes([65 + i]) * (8 << 20) for i in range(8)))
        before = int(raw.info("stats")["total_net_output_bytes"])
        raw.publish(kick_channel(node), node)
        worker.wait_for_log(r"kick set: ignored 8 malformed session id\(s\)")
        assert raw.scard(kicks_key(node)) == 0
        assert int(raw.info("stats")["total_net_output_bytes"]) - before < 1 << 20


def test_a_kick_key_of_another_type_does_not_stop_the_heartbeat(redis_server, tmp_path) -> None:
    """SET nbdweb:kicks:<node> made every beat fail on WRONGTYPE before: the node offline."""
    node = f"status-{os.getpid()}"
    raw = redis.Redis(port=redis_server.port)
    env = _env(redis_server, node, tmp_path)
    with run_worker(None, workdir=tmp_path / "w", storage_root=tmp_path, env=env) as worker:
        worker.wait_for_log(r"following nbdweb:config-changed")
        raw.set(kicks_key(node), "not a set")
        raw.delete(heartbeat_key(node))
        raw.publish(kick_channel(node), node)
        worker.wait_for_log(r"kick set: .*WRONGTYPE")
        poll(
            lambda: raw.exists(heartbeat_key(node)), "a heartbeat after the kick key's type changed"
        )
