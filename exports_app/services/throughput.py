"""Throughput over the last hour, per node and per export, for the console's charts.

Every `SAMPLE_SECONDS` one sampler (whichever process takes the Redis lock first: each Celery
worker runs one, see nbdweb/celery.py) reads the byte counters of every live session from the
workers' session hashes (`workerstatus.list_sessions`: only records the node's worker signed,
read within bounds; anyone can write to Redis), turns the growth since the previous sample into
bytes per second, and appends [time, read/s, written/s] to bounded ring buffers in Redis (one
list per node and per export with traffic, `HISTORY` points each, expiring when unused).

A session seen for the first time counts from zero when it connected after the previous sample
(else its earlier bytes are not this interval's); a session that ended between two samples loses
at most its last interval's bytes.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from exports_app.services import workerstatus
from exports_app.services.publishing import redis_client
from exports_app.services.workerstatus import MAX_SESSIONS_PER_NODE

__all__ = [
    "HISTORY",
    "SAMPLE_SECONDS",
    "export_key",
    "node_key",
    "sample_once",
    "series",
    "start_sampler",
]

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 10
HISTORY = 3600 // SAMPLE_SECONDS  # one hour
# Samples further apart than this (the sampler stopped) give no rate for the gap.
MAX_GAP = 3 * SAMPLE_SECONDS
LOCK_KEY = "nbdweb:throughput:lock"
LAST_KEY = "nbdweb:throughput:last"  # hash "<node> <session id>" -> [export, read, written]
LAST_TIME_KEY = "nbdweb:throughput:last-time"
EXPIRY = 2 * 3600


def node_key(node: str) -> str:
    return f"nbdweb:throughput:node:{node}"


def export_key(node: str, export: str) -> str:
    return f"nbdweb:throughput:export:{node}:{export}"


def _since(session: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(
            str(session["connected_since"]).replace("Z", "+00:00")
        ).timestamp()
    except (KeyError, ValueError):
        return None


# The sampler's last counters: at most this many entries, each in about this much room.
LAST_ENTRY_ROOM = 1024
# A hash's fields and values when it holds at most ARGV[1] fields in ARGV[2] bytes; else nil.
_BOUNDED_HGETALL = """
if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[1]) then return false end
local size = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0')
if size and size > tonumber(ARGV[2]) then return false end
return redis.call('HGETALL', KEYS[1])
"""


def _timestamp(raw: object) -> float | None:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _last_counters(raw: object) -> dict[str, list]:
    """The previous sample's [export, read, written] per "<node> <session id>"; what does not
    parse as that (a hash of another type, too big, garbage) is no previous sample."""
    if not isinstance(raw, list):
        return {}
    last: dict[str, list] = {}
    for key, value in zip(raw[::2], raw[1::2], strict=False):
        try:
            export, read, written = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(read, int) and isinstance(written, int):
            last[key.decode() if isinstance(key, bytes) else str(key)] = [export, read, written]
    return last


def sample_once(nodes: list[str], now: float | None = None, client=None) -> bool:
    """Take one sample of `nodes` unless another process took this interval's; True if taken."""
    now = time.time() if now is None else now
    client = client or redis_client()
    if not client.set(LOCK_KEY, "1", nx=True, px=int(SAMPLE_SECONDS * 900)):
        return False
    # The sampler's own state: read within bounds, and believed only where it parses (whoever
    # can write to Redis can put anything there).
    max_entries = MAX_SESSIONS_PER_NODE * max(1, len(nodes))
    with client.pipeline(transaction=False) as pipe:
        pipe.getrange(LAST_TIME_KEY, 0, 63)
        pipe.eval(_BOUNDED_HGETALL, 1, LAST_KEY, max_entries, LAST_ENTRY_ROOM * (max_entries + 16))
        last_time_raw, last_raw = pipe.execute(raise_on_error=False)
    last_time = _timestamp(last_time_raw)
    last = _last_counters(last_raw)
    hashes = [[] for _ in nodes]
    index = {node: i for i, node in enumerate(nodes)}
    for session in workerstatus.list_sessions(nodes, client=client):
        hashes[index[session["node"]]].append(session)
    elapsed = None if last_time is None else now - last_time
    rates_ok = elapsed is not None and 0 < elapsed <= MAX_GAP
    current: dict[str, str] = {}
    node_bytes: dict[str, list[int]] = {node: [0, 0] for node in nodes}
    export_bytes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for node, values in zip(nodes, hashes, strict=True):
        for session in values:
            try:
                sid, export = str(session["id"]), str(session.get("export", ""))
                read, written = int(session["bytes_read"]), int(session["bytes_written"])
            except (ValueError, KeyError, TypeError):
                continue
            key = f"{node} {sid}"
            current[key] = json.dumps([export, read, written])
            before = last.get(key)
            if before is not None:
                delta = [max(0, read - before[1]), max(0, written - before[2])]
            elif last_time is not None and (_since(session) or 0) >= last_time:
                delta = [read, written]
            else:
                delta = [0, 0]
            for totals in (node_bytes[node], export_bytes[node, export]):
                totals[0] += delta[0]
                totals[1] += delta[1]
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(LAST_KEY)
        if current:
            pipe.hset(LAST_KEY, mapping=current)
            pipe.expire(LAST_KEY, EXPIRY)
        pipe.set(LAST_TIME_KEY, repr(now), ex=EXPIRY)
        if rates_ok:
            points = [(node_key(n), b) for n, b in node_bytes.items()]
            points += [(export_key(n, e), b) for (n, e), b in export_bytes.items()]
            for key, (read, written) in points:
                pipe.rpush(key, json.dumps([round(now, 1), read / elapsed, written / elapsed]))
                pipe.ltrim(key, -HISTORY, -1)
                pipe.expire(key, EXPIRY)
        pipe.execute()
    return True


# A point is [time, read/s, written/s]: far shorter than this. Longer items stay in Redis.
MAX_POINT_BYTES = 128
_BOUNDED_LRANGE = """
local out = {}
for _, item in ipairs(redis.call('LRANGE', KEYS[1], ARGV[1], -1)) do
  if #item <= tonumber(ARGV[2]) then out[#out + 1] = item end
end
return out
"""


def series(key: str, now: float | None = None, client=None) -> list[tuple[float, float, float]]:
    """[(time, read/s, written/s)] of the last hour, oldest first ([] when Redis is down)."""
    now = time.time() if now is None else now
    try:
        raw = (client or redis_client()).eval(_BOUNDED_LRANGE, 1, key, -HISTORY, MAX_POINT_BYTES)
    except RedisError:
        return []
    points = []
    for item in raw:
        # Anyone can write to Redis: only three finite numbers are a point.
        try:
            t, read, written = (float(v) for v in json.loads(item))
        except (ValueError, TypeError):
            continue
        if all(math.isfinite(v) for v in (t, read, written)) and now - t <= 3600:
            points.append((t, read, written))
    return points


_sampler_started = threading.Lock()
_sampler: threading.Thread | None = None


def _run_sampler(stop: threading.Event) -> None:
    from exports_app.models import WorkerNode

    while not stop.wait(SAMPLE_SECONDS - time.time() % SAMPLE_SECONDS):
        try:
            sample_once(list(WorkerNode.objects.values_list("name", flat=True)))
        except Exception as exc:  # a sampler that dies takes the charts with it: log, go on
            log.warning("throughput sample failed: %s", exc)
        finally:
            from django.db import connection

            connection.close()


def start_sampler() -> threading.Thread:
    """Start this process's sampler thread (once)."""
    global _sampler
    with _sampler_started:
        if _sampler is None or not _sampler.is_alive():
            _sampler = threading.Thread(
                target=_run_sampler, args=(threading.Event(),), name="throughput", daemon=True
            )
            _sampler.start()
        return _sampler
