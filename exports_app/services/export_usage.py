"""Whether clients are using an export right now: the one question a shrink must ask first.

The live sessions are what the node's nbdworker publishes to Redis (issue 6). Until that reader
exists here, `live_session_count` answers None ("unknown"); callers then allow the operation the
user forced and log that it could not be checked. Point `_read_sessions` at the status reader
when it lands; nothing else changes.
"""

from __future__ import annotations

import logging

from exports_app.models import Export

__all__ = ["live_session_count"]

log = logging.getLogger(__name__)


def _read_sessions(node_name: str) -> list[dict] | None:
    """The node's live sessions as published by its worker, or None when they cannot be read."""
    try:
        from exports_app.services import sessions  # issue 6's reader, once it exists
    except ImportError:
        return None
    reader = getattr(sessions, "node_sessions", None)
    if reader is None:
        return None
    try:
        return list(reader(node_name))
    except Exception as exc:  # Redis down: unknown, not "no sessions"
        log.warning("cannot read live sessions of node %s: %s", node_name, exc)
        return None


def live_session_count(export: Export) -> int | None:
    """Live NBD sessions on `export`, or None when the worker's status cannot be read."""
    sessions = _read_sessions(export.node.name)
    if sessions is None:
        return None
    return sum(1 for s in sessions if s.get("export") == export.name)
