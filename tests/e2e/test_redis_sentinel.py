"""Redis Sentinel, end to end: `make run`'s stack (scripts/runstack.py: gunicorn, Celery worker
and beat, nbdworker) given a ``redis+sentinel://`` REDIS_URL uses the primary the sentinels
name, and when that primary is killed and a replica promoted, every process follows: a config
change made through the web after the failover reaches nbdworker, a Celery job still runs, and
the node's heartbeat is read again. Real redis-server processes: a primary, a replica and three
sentinels (tests/support/redissentinel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdworker.contract.entries import head_key
from tests.support.livestack import running_stack
from tests.support.polling import poll
from tests.support.redissentinel import DATA_PASSWORD, SENTINEL_PASSWORD, sentinel_cluster
from tests.support.redisserver import free_port

pytestmark = pytest.mark.e2e

JOB_TIMEOUT = 90.0
FAILOVER_TIMEOUT = 60.0


def test_web_celery_and_nbdworker_follow_a_sentinel_failover(tmp_path: Path) -> None:
    with sentinel_cluster(tmp_path / "redis") as cluster:
        # A dead sentinel listed first: every client must move on to the next one.
        url = cluster.sentinel_url([free_port(), *cluster.sentinel_ports])
        with running_stack(tmp_path / "stack", env={"REDIS_URL": url}) as stack:
            log = stack.log.read_text()
            assert "private redis-server" not in log
            assert f"127.0.0.1:{cluster.sentinel_ports[0]}" in log  # "redis answers at ..."

            # Before: a create job (Celery through the sentinels) and the worker serving it.
            before = stack.api("POST", "exports/", {"name": "before", "size": "1M"})
            poll(lambda: stack.served_export("before"), "'before' served", JOB_TIMEOUT)
            assert cluster.primary.client().exists(head_key("default"))

            cluster.kill_primary()
            promoted = cluster.wait_for_promotion(FAILOVER_TIMEOUT)

            # A config change made through the web after the failover reaches nbdworker.
            stack.api("PATCH", f"exports/{before['id']}/", {"description": "after failover"})

            def described() -> bool:
                export = stack.served_export("before")
                return bool(export) and export.get("description") == "after failover"

            poll(described, "the new description served by nbdworker", JOB_TIMEOUT)
            assert promoted.client().exists(head_key("default"))

            # A Celery job still runs: broker and result backend on the promoted replica.
            after = stack.api("POST", "exports/", {"name": "after", "size": "2M"})

            def ready() -> bool:
                return stack.api("GET", f"exports/{after['id']}/")["state"] == "ready"

            poll(ready, "the create job after the failover", JOB_TIMEOUT)
            served = poll(lambda: stack.served_export("after"), "'after' served", JOB_TIMEOUT)
            assert served["export-size"] == 2 << 20

            # The web reads the worker's heartbeat from the new primary too.
            def online() -> bool:
                nodes = stack.api("GET", "nodes/")["results"]
                return any(node.get("status", {}).get("status") == "online" for node in nodes)

            poll(online, "the node shown online after the failover", JOB_TIMEOUT)

            # Every process logged its lost connections, and no password with them.
            log = stack.log.read_text()
            assert "Connection to broker lost" in log  # Celery saw the primary go
            assert DATA_PASSWORD not in log and SENTINEL_PASSWORD not in log
