"""Whether clients are using an export right now: the question a shrink must ask first.

The node's nbdworker publishes its live sessions to Redis (nbdworker/status.py): a hash at
`sessions_key(node)` of session id → signed JSON with the export's name, next to a heartbeat at
`heartbeat_key(node)`; both expire when the worker stops beating. They are read through
`workerstatus` (only records the node's worker signed, within bounds): anyone who can write to
Redis could otherwise block every shrink with a made-up session, or make each check read
whatever it put there.
"""

from __future__ import annotations

import logging

from exports_app.models import Export
from exports_app.services import workerstatus

__all__ = ["live_session_count"]

log = logging.getLogger(__name__)


def live_session_count(export: Export) -> int | None:
    """Live NBD sessions on `export`; None when unknown (Redis unreachable, or no heartbeat from
    the node's worker, whose sessions then cannot be seen)."""
    node = export.node.name
    try:
        if workerstatus.offline_nodes([node]):
            return None
        sessions = workerstatus.list_sessions([node])
    except workerstatus.StatusUnavailable as exc:
        log.warning("cannot read the live sessions of node %s: %s", node, exc)
        return None
    return sum(1 for session in sessions if session.get("export") == export.name)
