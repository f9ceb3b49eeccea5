"""What the workers report through Redis (nbdworker/status.py): node status, live sessions, and
ending a session.

* a node is online while its heartbeat key exists (the worker refreshes it every 2 s, it
  expires after 6 s); the heartbeat carries the generation the worker applied, compared with
  the latest published one (`services.publishing`); a node with a change not yet published
  (a `PendingPublish` marker) is not current either;
* sessions are read from each node's hash; ending one adds its id to the node's kick set and
  notifies the node, whose worker ends it gracefully (requests in flight are answered).

Anyone who can write to Redis can write these keys too. So only records signed with the node's
key are believed (`nbdworker.contract.statusrecord`; a refused one is logged and counted in
`refused_records`), and nothing is read unbounded: a heartbeat is read up to
`MAX_RECORD_BYTES`; a node's sessions only when there are at most `MAX_SESSIONS_PER_NODE` of
them taking no more room in Redis than that many sessions take (`SESSION_ROOM` each, at most
`MAX_SESSIONS_BYTES`), else the node's sessions are refused whole, logged; a key of the wrong
type or bytes that are not UTF-8 are a refused record, not an error.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from redis.exceptions import RedisError, ResponseError

from exports_app.models import Export, PendingPublish, WorkerNode
from exports_app.services.audit import record_event
from exports_app.services.nodekeys import node_key
from exports_app.services.publishing import redis_client
from nbdworker.contract.snapshot import (
    heartbeat_key,
    kick_channel,
    kicks_key,
    published_key,
    sessions_key,
)
from nbdworker.contract.statusrecord import (
    HEARTBEAT,
    MAX_RECORD_BYTES,
    SESSION,
    RecordRefused,
    open_record,
)

__all__ = [
    "KICK_TTL",
    "MAX_SESSIONS_BYTES",
    "MAX_SESSIONS_PER_NODE",
    "StatusUnavailable",
    "end_session",
    "find_session",
    "kick_session",
    "list_sessions",
    "node_statuses",
    "offline_nodes",
    "refused_records",
]

log = logging.getLogger(__name__)

# A kick the worker has not picked up by then is moot (the worker is gone, so is the session).
KICK_TTL = 60


class StatusUnavailable(Exception):
    """Redis cannot be reached: the workers' state is unknown."""


# A node's worker reports one session per connection: far fewer than this (its connection
# limit), in far less room. Above either bound the hash is not read at all.
MAX_SESSIONS_PER_NODE = 16384
MAX_SESSIONS_BYTES = 32 << 20
# Room one session may take in Redis (a real record is under 2 KiB): a hash bigger than its
# count allows holds something no worker wrote, and is not read.
SESSION_ROOM = 4096
_GENERATION_DIGITS = 20
# Refused records, by reason, since this process started (logged too, at most once a minute
# per node and reason).
refused_records: Counter[str] = Counter()
_last_logged: dict[tuple[str, str], float] = {}


def _refused(node: str, what: str, reason: str, detail: str, count: int = 1) -> None:
    refused_records[reason] += count
    now = time.monotonic()
    if now - _last_logged.get((node, reason), -60.0) >= 60.0:
        _last_logged[(node, reason)] = now
        log.warning("node %s: %s refused (%s): %s", node, what, reason, detail)


def _record(node: str, kind: str, raw: object, what: str) -> dict[str, Any] | None:
    """The record `node`'s worker signed, or None (logged and counted)."""
    if isinstance(raw, ResponseError):  # e.g. WRONGTYPE: someone stored another type there
        _refused(node, what, "malformed", str(raw))
        return None
    if not isinstance(raw, str | bytes):
        _refused(node, what, "malformed", type(raw).__name__)
        return None
    try:
        return open_record(node_key(node), node, kind, raw)
    except RecordRefused as exc:
        _refused(node, what, exc.reason, str(exc))
        return None


def _generation(raw: object) -> int | None:
    """A stored generation: ASCII digits only (anyone may have written anything there)."""
    if (
        isinstance(raw, str)
        and 0 < len(raw) <= _GENERATION_DIGITS
        and raw.isascii()
        and raw.isdigit()
    ):
        return int(raw)
    return None


def node_statuses(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{node name: status}; with Redis unreachable every status is "unknown"."""
    names = list(names)
    if not names:
        return {}
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for name in names:
                # One byte over the bound is enough to refuse it.
                pipe.getrange(heartbeat_key(name), 0, MAX_RECORD_BYTES)
                # A generation is at most 20 digits: one more is enough to refuse it.
                pipe.getrange(published_key(name), 0, _GENERATION_DIGITS)
            replies = pipe.execute(raise_on_error=False)
        _raise_connection_errors(replies)
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
        raw = replies[2 * i]
        heartbeat = _record(name, HEARTBEAT, raw, "heartbeat") if raw != "" else None
        applied = heartbeat.get("generation") if heartbeat else None
        if isinstance(applied, bool) or not isinstance(applied, int):
            applied = None
        latest = _generation(replies[2 * i + 1])
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


# A node's sessions hash when it holds at most ARGV[1] fields in at most min(ARGV[2], ARGV[3] per
# field + 16) bytes: {"ok", fields and values}; else {"too_many", count} or {"too_large", count,
# bytes}, the hash unread. WRONGTYPE is the script's error.
_BOUNDED_SESSIONS = """
local count = redis.call('HLEN', KEYS[1])
if count > tonumber(ARGV[1]) then return {'too_many', count} end
local size = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0') or 0
if size > math.min(tonumber(ARGV[2]), tonumber(ARGV[3]) * (count + 16)) then
  return {'too_large', count, size}
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""


def list_sessions(nodes: Iterable[str], client=None) -> list[dict[str, Any]]:
    """Every live session on `nodes`, oldest first (read with `client`, default the web side's
    own). Raises StatusUnavailable."""
    names = list(nodes)
    if not names:
        return []
    client = client or redis_client()
    try:
        # How many, and how big, and only then the hash itself: in one script per node, so
        # nothing can grow the hash between the check and the read.
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.eval(
                    _BOUNDED_SESSIONS,
                    1,
                    sessions_key(name),
                    MAX_SESSIONS_PER_NODE,
                    MAX_SESSIONS_BYTES,
                    SESSION_ROOM,
                )
            results = pipe.execute(raise_on_error=False)
        _raise_connection_errors(results)
    except RedisError as exc:
        raise StatusUnavailable(str(exc)) from exc
    readable, replies = [], []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, ResponseError):
            _refused(name, "sessions", "malformed", str(result))
            continue
        verdict = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if verdict == "too_many":
            count = int(result[1])
            _refused(
                name,
                "sessions",
                "too_many",
                f"{count} sessions, over {MAX_SESSIONS_PER_NODE}: none read",
                count,
            )
        elif verdict == "too_large":
            count, size = int(result[1]), int(result[2])
            _refused(
                name,
                "sessions",
                "too_large",
                f"{count} sessions in {size} bytes, more than sessions take: none read",
                count,
            )
        else:
            flat = result[1]
            readable.append(name)
            replies.append(dict(zip(flat[::2], flat[1::2], strict=True)))
    sessions = []
    for name, fields in zip(readable, replies, strict=True):
        if not isinstance(fields, dict):
            _refused(name, "sessions", "malformed", str(fields))
            continue
        for session_id, raw in fields.items():
            session = _record(name, SESSION, raw, "a session record")
            if session is None:
                continue
            if session.get("id") != session_id:
                _refused(name, "a session record", "malformed", "its id is not its field's")
                continue
            session["node"] = name
            sessions.append(session)
    sessions.sort(key=lambda s: (str(s.get("connected_since", "")), str(s["id"])))
    return sessions


def _raise_connection_errors(replies: list[Any]) -> None:
    """A pipeline run with raise_on_error=False: a reply that is an error about a key (a
    hostile value: WRONGTYPE) is that key's problem; any other error is Redis's."""
    for reply in replies:
        if isinstance(reply, RedisError) and not isinstance(reply, ResponseError):
            raise reply


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


# One field of a hash, unless it is longer than ARGV[2] bytes: then its length (a number), so a
# giant value someone put there is measured, not sent. One script: nothing can grow it between.
_BOUNDED_HGET = """
local length = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if length > tonumber(ARGV[2]) then return length end
return redis.call('HGET', KEYS[1], ARGV[1])
"""


def find_session(session_id: str, nodes: Iterable[str]) -> dict[str, Any] | None:
    """The live session with this id on one of `nodes`. Raises StatusUnavailable."""
    names = list(nodes)
    try:
        with redis_client().pipeline(transaction=False) as pipe:
            for name in names:
                pipe.eval(_BOUNDED_HGET, 1, sessions_key(name), session_id, MAX_RECORD_BYTES)
            replies = pipe.execute(raise_on_error=False)
        _raise_connection_errors(replies)
    except RedisError as exc:
        raise StatusUnavailable(str(exc)) from exc
    for name, raw in zip(names, replies, strict=True):
        if raw is None:
            continue
        if isinstance(raw, int):
            _refused(name, "a session record", "too_large", f"{raw} bytes: not read")
            continue
        session = _record(name, SESSION, raw, "a session record")
        if session is not None and session.get("id") == session_id:
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
