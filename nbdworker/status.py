"""What the worker tells the web side through Redis: a heartbeat, its live sessions, and the
sessions the web side asked it to end.

Every `interval` seconds, in one MULTI:

* ``nbdweb:worker:<node>`` = JSON {version, node, generation, started, uptime, pid, host,
  sessions, time, storage, config_follower: {state, restarts, last_error, messages_rejected}},
  expiring after `ttl`: the web side calls the node offline once it is gone; `storage` is a
  list of {root, total, used, free} (bytes, from statvfs) per storage root;
* ``nbdweb:sessions:<node>`` = hash session id → JSON {id, node, client, export, tls,
  client_identity, reads, bytes_read, writes, bytes_written, requests, connected_since}
  (`SessionRecord.public_view`, nbdworker/session.py), expiring after `ttl`. Written
  incrementally: HSET of the sessions that appeared or changed since the last beat, HDEL of those
  that ended. The whole hash is rewritten (DEL + HSET) at the first beat, after a failed one,
  every `FULL_RESYNC_BEATS` beats, and at once when the hash's length after a beat is not the
  number of live sessions (it expired or Redis lost it, e.g. a restart without persistence).

Each record is signed with the node's key (`nbdworker.contract.statusrecord`): the web side
keeps only what this worker wrote, not what anyone else who can write to Redis puts there.

Kicks: the web side adds session ids to the set ``nbdweb:kicks:<node>`` and publishes the node's
name on ``nbdweb:session-kick:<node>``. The worker drains the set on each notice and on every
beat (a notice sent while it was disconnected is not lost) and ends those sessions gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from importlib import metadata
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from nbdworker.contract.snapshot import heartbeat_key, kicks_key, sessions_key
from nbdworker.contract.statusrecord import HEARTBEAT, SESSION, sign_record
from nbdworker.worker import Worker

__all__ = ["StatusPublisher", "storage_usage", "worker_version"]

log = logging.getLogger("nbdworker.status")

HEARTBEAT_INTERVAL = 2.0
# Three missed beats and the node shows offline.
HEARTBEAT_TTL = 3 * HEARTBEAT_INTERVAL
# The most kicks handled per drain (the rest wait for the next one).
MAX_KICKS = 1000
# Longer members of the kick set are dropped inside Redis, never sent (a session id is 32 hex
# digits; the API takes at most 64).
MAX_KICK_ID_BYTES = 64
# Pops up to ARGV[1] kicks; returns {members dropped for length, members kept}.
_POP_KICKS = """
local kept, dropped = {}, 0
for _, id in ipairs(redis.call('SPOP', KEYS[1], ARGV[1])) do
  if #id <= tonumber(ARGV[2]) then kept[#kept + 1] = id else dropped = dropped + 1 end
end
return {dropped, kept}
"""
# A whole rewrite of the sessions hash this often (in beats) even when nothing drifted: a
# bounded repair for anything the length check cannot see (a value changed by someone else).
FULL_RESYNC_BEATS = 15


def worker_version() -> str:
    try:
        return metadata.version("nbdweb")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def storage_usage(root: str) -> dict[str, Any]:
    """{root, total, used, free} in bytes (free: what an unprivileged writer may still use);
    a root that cannot be read reports its error instead."""
    try:
        st = os.statvfs(root)
    except OSError as exc:
        return {"root": root, "error": exc.strerror or str(exc)}
    total = st.f_blocks * st.f_frsize
    return {
        "root": root,
        "total": total,
        "used": total - st.f_bfree * st.f_frsize,
        "free": st.f_bavail * st.f_frsize,
    }


class StatusPublisher:
    def __init__(
        self,
        client: aioredis.Redis,
        source: Worker,
        node: str,
        interval: float = HEARTBEAT_INTERVAL,
        ttl: float = HEARTBEAT_TTL,
        storage_roots: tuple[str, ...] = (),
        key: str = "",
    ) -> None:
        self.client = client
        self.key = key  # the node's key: signs every record
        self.source = source
        self.node = node
        self.interval = interval
        self.ttl = ttl
        self.storage_roots = storage_roots
        self._wake = asyncio.Event()
        self._failing = False
        # What the sessions hash holds, as far as this publisher knows (None: unknown, the next
        # beat rewrites it whole), and the beats since the last whole rewrite.
        self._written: dict[str, str] | None = None
        self._beats_since_full = 0

    def wake(self) -> None:
        """Beat now (a kick notice arrived, or a new config was applied)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.beat()
                if self._failing:
                    log.info("heartbeat: Redis reachable again")
                self._failing = False
            except (RedisError, OSError) as exc:
                self._written = None  # what reached Redis is unknown: rewrite it whole
                if not self._failing:
                    log.warning("heartbeat: Redis unavailable: %s", exc)
                self._failing = True
            except Exception:
                self._written = None
                # Whatever else goes wrong in one beat, the next one is tried: a heartbeat
                # that stops shows a serving node as offline.
                log.exception("heartbeat failed; trying again at the next beat")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def beat(self) -> None:
        await self.drain_kicks()
        stats = self.source.stats
        report = await self.source.session_report(self.node)
        sessions = {
            sid: sign_record(self.key, self.node, SESSION, info) for sid, info in report.items()
        }
        now = time.time()
        heartbeat = {
            "version": worker_version(),
            "node": self.node,
            "generation": stats.generation,
            "started": _iso(stats.started),
            "uptime": round(now - stats.started, 1),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "sessions": len(sessions),
            "time": _iso(now),
            "storage": [storage_usage(root) for root in self.storage_roots],
        }
        if stats.follower is not None:
            heartbeat["config_follower"] = stats.follower.to_dict()
        self._beats_since_full += 1
        full = self._written is None or self._beats_since_full >= FULL_RESYNC_BEATS
        record = sign_record(self.key, self.node, HEARTBEAT, heartbeat)
        length = await self._write(record, sessions, full)
        if not full and length != len(sessions):
            # The hash is not what was written (it expired, or Redis lost it): rewrite it.
            await self._write(None, sessions, full=True)

    async def _write(self, heartbeat: str | None, sessions: dict[str, str], full: bool) -> int:
        """One MULTI: the heartbeat (unless None) and the sessions hash, whole or the changes
        since the last write. Returns the hash's length afterwards."""
        ttl_ms = int(self.ttl * 1000)
        key = sessions_key(self.node)
        written = {} if full or self._written is None else self._written
        changed = {sid: value for sid, value in sessions.items() if written.get(sid) != value}
        ended = [sid for sid in written if sid not in sessions]
        async with self.client.pipeline(transaction=True) as pipe:
            if heartbeat is not None:
                pipe.set(heartbeat_key(self.node), heartbeat, px=ttl_ms)
            if full:
                pipe.delete(key)
            if ended:
                pipe.hdel(key, *ended)
            if changed:
                pipe.hset(key, mapping=changed)
            pipe.pexpire(key, ttl_ms)
            pipe.hlen(key)
            replies = await pipe.execute()
        self._written = sessions
        if full:
            self._beats_since_full = 0
        return int(replies[-1])

    async def drain_kicks(self) -> None:
        try:
            dropped, ids = await self.client.eval(
                _POP_KICKS, 1, kicks_key(self.node), MAX_KICKS, MAX_KICK_ID_BYTES
            )
        except ResponseError as exc:
            # Not a set (WRONGTYPE): someone else wrote it. Raised, it would fail every beat and
            # show the node offline; the key is this worker's to drain, so it goes.
            log.warning("kick set: %s: deleted", exc)
            await self.client.delete(kicks_key(self.node))
            return
        # Anyone who can write to Redis can add anything to the set: an id that is not UTF-8,
        # or longer than any session id, names no session of ours.
        wanted: set[str] = set()
        malformed = int(dropped)
        for raw in ids:
            try:
                wanted.add(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
            except UnicodeDecodeError:
                malformed += 1
        if malformed:
            log.warning("kick set: ignored %d malformed session id(s)", malformed)
        if wanted:
            await self.source.end_sessions(wanted)

    async def clear(self) -> None:
        """At a clean stop: the node is offline at once instead of after the expiry."""
        with contextlib.suppress(RedisError, OSError):
            await self.client.delete(heartbeat_key(self.node), sessions_key(self.node))
