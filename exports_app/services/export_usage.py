"""Whether clients are using an export right now: the question a shrink must ask first.

The node's nbdworker publishes its live sessions to Redis (nbdworker/status.py): a hash at
`sessions_key(node)` of session id → JSON with the export's name, next to a heartbeat at
`heartbeat_key(node)`; both expire when the worker stops beating.
"""

from __future__ import annotations

import json
import logging

from redis.exceptions import RedisError

from exports_app.models import Export
from exports_app.services.publishing import redis_client
from nbdworker.contract.snapshot import heartbeat_key, sessions_key

__all__ = ["live_session_count"]

log = logging.getLogger(__name__)


def live_session_count(export: Export) -> int | None:
    """Live NBD sessions on `export`; None when unknown (Redis unreachable, or no heartbeat from
    the node's worker, whose sessions then cannot be seen)."""
    node = export.node.name
    try:
        client = redis_client()
        with client.pipeline(transaction=False) as pipe:
            pipe.exists(heartbeat_key(node))
            pipe.hvals(sessions_key(node))
            alive, sessions = pipe.execute()
    except RedisError as exc:
        log.warning("cannot read the live sessions of node %s: %s", node, exc)
        return None
    if not alive:
        return None
    count = 0
    for raw in sessions:
        try:
            if json.loads(raw).get("export") == export.name:
                count += 1
        except (ValueError, AttributeError):
            log.warning("node %s published a malformed session entry", node)
    return count
