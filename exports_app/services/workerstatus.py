"""What the workers report through Redis (nbdworker/status.py): node status, live sessions, and
ending a session.

* a node is online while its heartbeat key exists (the worker refreshes it every 2 s, it
  expires after 6 s); the heartbeat carries the generation the worker applied, compared with
  the latest published one (`services.publishing`); a node with a change not yet published
  (a `PendingPublish` marker) is not current either;
* sessions are read from each node's hash; ending one adds its id to the node's kick set and
  notifies the node, whose worker ends it gracefully (requests in flight are answered).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError

from exports_app.models import Export, PendingPublish, WorkerNode
from exports_app.services.audit import record_event
from exports_app.services.publishing import redis_client
from nbdworker.contract.snapshot import (
    heartbeat_key,
    kick_channel,
    kicks_key,
    published_key,
    sessions_key,
)

__all__ = [
    "KICK_TTL",
    "StatusUnavailable",
    "end_session",
    "find_session",
    "kick_session",
    "list_sessions",
    "node_statuses",
    "offline_nodes",
]

log = logging.getLogger(__name__)

# A kick the worker has not picked up by then is moot (the worker is gone, so is the session).
KICK_TTL = 60


class StatusUnavailable(Exception):
    """Redis cannot be reached: the workers' state is unknown."""


def _json(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def node_statuses(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{node name: status}; with Redis unreachable every status is "unknown"."""
    names = list(names)
    if not names:
        return {}
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(heartbeat_key(name))
                pipe.get(published_key(name))
            replies = pipe.execute()
    except RedisError as exc:
        log.warning("cannot read the workers' status: %s", exc)
        return {
            name: {
                "status": "unknown",
                "generation_applied": None,
                "generation_published": None,
                "current": None,
                "heartbeat": None,
            }
            for name in names
        }
    pending = set(
        PendingPublish.objects.filter(node__name__in=names)
        .values_list("node__name", flat=True)
        .distinct()
    )
    result = {}
    for i, name in enumerate(names):
        heartbeat = _json(replies[2 * i])
        published = replies[2 * i + 1]
        applied = heartbeat.get("generation") if heartbeat else None
        latest = int(published) if published is not None else None
        result[name] = {
            "status": "online" if heartbeat else "offline",
            "generation_applied": applied,
            "generation_published": latest,
            # Nothing published yet is current too: the worker serves the empty config.
            "current": None
            if applied is None
            else (name not in pending and (latest is None or applied >= latest)),
            "heartbeat": heartbeat,
        }
    return result


def list_sessions(nodes: Iterable[str]) -> list[dict[str, Any]]:
    """Every live session on `nodes`, oldest first. Raises StatusUnavailable."""
    names = list(nodes)
    if not names:
        return []
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hvals(sessions_key(name))
            replies = pipe.execute()
    except RedisError as exc:
        raise StatusUnavailable(str(exc)) from exc
    sessions = []
    for name, values in zip(names, replies, strict=True):
        for raw in values:
            session = _json(raw)
            if session is not None and "id" in session:
                session["node"] = name
                sessions.append(session)
    sessions.sort(key=lambda s: (str(s.get("connected_since", "")), str(s["id"])))
    return sessions


def offline_nodes(nodes: Iterable[str]) -> list[str]:
    """Those of `nodes` whose worker sends no heartbeat: their sessions are unknown (what Redis
    still holds for them may be stale). Raises StatusUnavailable."""
    names = list(nodes)
    if not names:
        return []
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(heartbeat_key(name))
            replies = pipe.execute()
    except RedisError as exc:
        raise StatusUnavailable(str(exc)) from exc
    return [name for name, alive in zip(names, replies, strict=True) if not alive]


def find_session(session_id: str, nodes: Iterable[str]) -> dict[str, Any] | None:
    """The live session with this id on one of `nodes`. Raises StatusUnavailable."""
    names = list(nodes)
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(sessions_key(name), session_id)
            replies = pipe.execute()
    except RedisError as exc:
        raise StatusUnavailable(str(exc)) from exc
    for name, raw in zip(names, replies, strict=True):
        session = _json(raw)
        if session is not None:
            session["node"] = name
            return session
    return None


def kick_session(node: str, session_id: str) -> None:
    """Ask `node`'s worker to end the session. Raises StatusUnavailable."""
    try:
        with redis_client().pipeline(transaction=True) as pipe:
            pipe.sadd(kicks_key(node), session_id)
            pipe.expire(kicks_key(node), KICK_TTL)
            pipe.publish(kick_channel(node), node)
            pipe.execute()
    except RedisError as exc:
        raise StatusUnavailable(str(exc)) from exc
    log.info("node %s: session %s asked to end", node, session_id)


def end_session(session: dict[str, Any], user: Any) -> None:
    """Ask the worker to end a live session (as found by `find_session`) for `user`, and record
    it in the audit trail on the export (the node, when the export is gone). Raises
    StatusUnavailable."""
    kick_session(session["node"], session["id"])
    target = (
        Export.objects.filter(node__name=session["node"], name=session.get("export", "")).first()
        or WorkerNode.objects.filter(name=session["node"]).first()
    )
    if target is not None:
        record_event(
            user,
            target,
            f"Ended session {session['id']} of client {session.get('client', '?')} on export "
            f"{session.get('export', '?')!r} (node {session['node']}).",
        )
