"""Publishing worker configuration: building a node's config and storing it in Redis.

Called out of band by the publisher (`exports_app.services.publisher`, which marks changes and
decides when), never on a request thread. Publishing one node (`publish_node`), under the
node's lock in Redis (``nbdweb:publisher-lock:<node>``: one publisher per node across every
process and host):

1. read the newest dirty marker (`PendingPublish`) of the node, and the scopes of the markers
   up to it: `export:<pk>`, `tls`, or `node` (everything);
2. take the next generation: ``max(stored + 1, now in milliseconds, head + 1)`` in
   ``nbdweb:config-generation:<node>`` (a WATCH/MULTI transaction). It only grows across web
   restarts, and even when Redis loses its data the clock keeps it above anything published
   before. A stored counter that is not digits, or is far above the clock (forged), is logged,
   counted and reset: a writer must not choose the generation the web side signs;
3. build the entries of what changed from the database (one per changed export: served and
   enabled, else removed; the TLS section with the decrypted server key, trusted CAs and
   revoked serials), validate each with the worker's own parser, sign each with the node's own
   key (`services.nodekeys`: no other node's worker can forge or open it;
   `nbdworker.contract.entries`), and a head whose count and set digest follow from the stored
   head and the replaced entries (both verified; anything that does not verify means a whole
   rewrite);
4. store entries and head in one MULTI/EXEC, only if the stored head is still the one read (a
   whole rewrite: or is not a newer publish's, verified), then PUBLISH ``<node>:<generation>`` on
   ``nbdweb:config-changed:<node>``;
5. delete the markers up to the one read in 1 (later ones are the next publish's).

A Redis error leaves the markers in place (the publisher tries again). `/api/v1/nodes/` shows a
node whose worker runs an older generation than the latest, or that has markers, as not current.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import redis
from django.conf import settings

from exports_app.choices import TLSMode
from exports_app.models import Export, PendingPublish, WorkerNode
from exports_app.models.publishing import NODE_SCOPE, TLS_SCOPE
from exports_app.services import export_states
from exports_app.services.nodekeys import node_key
from nbdworker.contract.config import (
    ConfigError,
    ExportConfig,
    TLSConfig,
    WorkerConfig,
    tls_refusal,
)
from nbdworker.contract.entries import (
    DIGEST_MODULUS,
    MAX_ENTRY_BYTES,
    MAX_HEAD_BYTES,
    TLS_FIELD,
    Head,
    entries_key,
    export_field,
    head_key,
    set_digest,
    sign_entry,
    sign_head,
    verify_entry,
    verify_head,
)
from nbdworker.contract.redisconn import connect
from nbdworker.contract.snapshot import (
    MAX_GENERATION_DIGITS,
    SnapshotError,
    config_channel,
    config_key,
    generation_key,
    published_key,
)

__all__ = [
    "GENERATION_AHEAD_MS",
    "NodeBusy",
    "PublishError",
    "build_config",
    "lock_key",
    "publish_node",
    "publish_nodes",
    "redis_client",
    "refused_values",
]

log = logging.getLogger("exports_app.publishing")

# A request must not hang on an unreachable Redis: fail fast and let the retry catch up.
REDIS_CONNECT_TIMEOUT = 1.0
REDIS_TIMEOUT = 3.0

# A stored generation counter further than this above the clock (or the stored head) was not
# written by a publisher: it is forged, and reset. Believing it would sign it into a head, and
# the worker refuses every generation below one it applied.
GENERATION_AHEAD_MS = 60_000

# What the publisher read back from Redis and refused (garbage, forged or over its bound), by
# kind ("generation", "head", "entries"): each is logged, counted and overwritten.
refused_values: Counter[str] = Counter()
# The head as read when it is over its bound or not a string: compared, never verified.
_UNREADABLE = "!unreadable"


class PublishError(Exception):
    """A node's config could not be built (bad data) — not a Redis problem."""


@lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    return connect(
        redis,
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=REDIS_TIMEOUT,
        decode_responses=True,
        # Anyone who can write to Redis can store bytes that are not UTF-8: decoding them must
        # not raise (it would fail the request); they are refused as malformed where read.
        encoding_errors="replace",
    )


def redis_client() -> redis.Redis:
    """The web side's Redis connection pool for settings.REDIS_URL."""
    return _client(settings.REDIS_URL)


# -- building ---------------------------------------------------------------------------------


def _tls_dict(node: WorkerNode) -> dict:
    policy = node.tls_policy
    if policy.mode == TLSMode.NOTLS:
        # Nothing to serve with: keys stay out of Redis when no TLS is configured.
        return {"mode": TLSMode.NOTLS}
    cert = policy.server_certificate
    if cert is None:
        raise PublishError(f"TLS policy {policy.name!r} has no server certificate")
    try:
        key_pem = cert.private_key_pem()
    except Exception as exc:  # KeyDecryptionError, or a certificate without a key
        raise PublishError(f"server key of {cert.name!r}: {exc}") from exc
    authorities = sorted(policy.trusted_authorities.all(), key=lambda a: a.pk)
    return {
        "mode": policy.mode,
        "certificate_pem": cert.certificate_pem,
        "key_pem": key_pem,
        "ca_pem": "".join(a.certificate_pem for a in authorities),
        "client_verification": policy.client_verification,
        "min_version": policy.min_tls_version,
        "revoked_serials": policy.revoked_serials(),
    }


def _export_dict(export: Export) -> dict:
    return {
        "name": export.name,
        "backend": "file",
        "path": export.absolute_image_path,
        # The worker serves only this very file (an impostor renamed over it is refused).
        "image_identity": export.image_identity or None,
        "description": export.description,
        "read_only": export.read_only,
        "enabled": True,
        "tls_required": export.tls_required,
        "flush": export.flush,
        "fua": export.fua,
        "trim": export.trim,
        "write_zeroes": export.write_zeroes,
        "fast_zero": export.fast_zero,
        "cache": export.cache,
        "multi_conn": export.multi_conn,
        "min_block_size": export.min_block_size,
        "preferred_block_size": export.preferred_block_size,
        "max_block_size": export.max_block_size,
        "max_connections": export.max_connections,
        "allowed_clients": list(export.allowed_clients or []),
        "allowed_networks": list(export.allowed_networks or []),
    }


def build_config(node: WorkerNode, generation: int = 0) -> WorkerConfig:
    """The whole config the node's entries make: what its worker serves once every change is
    published (tests, and anyone asking what a node would be sent)."""
    node = WorkerNode.objects.select_related("tls_policy__server_certificate").get(pk=node.pk)
    bodies = _bodies(node, None, True)
    tls = bodies.pop(TLS_FIELD)
    document = {
        "version": 1,
        "generation": generation,
        "node": node.name,
        "exports": list(bodies.values()),
        "tls": tls,
    }
    try:
        return WorkerConfig.from_dict(document)
    except ConfigError as exc:
        raise PublishError(f"node {node.name!r}: the config is invalid: {exc}") from exc


# -- delivering -------------------------------------------------------------------------------


def _refuse(node: str, kind: str, what: str) -> None:
    refused_values[kind] += 1
    log.warning("node %s: %s refused, overwritten by this publish", node, what)


def _believed_generation(node: str, key: str, raw: str | None, ceiling: int) -> int:
    """A stored generation counter as read (at most MAX_GENERATION_DIGITS + 1 characters); 0
    when missing, or refused (logged and counted) when not ASCII digits or above `ceiling`."""
    if not raw:
        return 0
    if len(raw) > MAX_GENERATION_DIGITS or not raw.isascii() or not raw.isdigit():
        _refuse(node, "generation", f"{key} holds no generation ({raw[:24]!r})")
        return 0
    if int(raw) > ceiling:
        _refuse(node, "generation", f"{key} holds {raw}, forged far above the clock")
        return 0
    return int(raw)


def _read_generation(pipe: redis.client.Pipeline, key: str) -> str | None:
    try:
        return pipe.getrange(key, 0, MAX_GENERATION_DIGITS)
    except redis.ResponseError:  # WRONGTYPE: another type was stored there
        return "!wrongtype"


def _next_generation(client: redis.Redis, node: str, head: Head | None) -> int:
    """``max(stored + 1, now in ms, head + 1)``: the verified head is the floor (a writer cannot
    forge it), and a stored counter is believed only up to GENERATION_AHEAD_MS above the clock
    or that head, so no writer pushes the node's generations out of the worker's reach."""
    now = time.time_ns() // 1_000_000
    head_generation = head.generation if head is not None else 0
    floor = max(now, head_generation + 1)
    ceiling = max(now, head_generation) + GENERATION_AHEAD_MS
    new = 0

    def step(pipe: redis.client.Pipeline) -> None:
        nonlocal new
        raw = _read_generation(pipe, generation_key(node))
        stored = _believed_generation(node, generation_key(node), raw, ceiling)
        new = max(stored + 1, floor)
        pipe.multi()
        pipe.set(generation_key(node), new)

    client.transaction(step, generation_key(node))
    return new


_READ_HEAD = """
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return ARGV[2] end
return redis.call('GET', KEYS[1])
"""


def _read_head(client: redis.Redis | redis.client.Pipeline, node: str) -> str | None:
    """The stored head as read, bounded in Redis (`_UNREADABLE` when over its bound or another
    type); None when missing."""
    try:
        return client.eval(_READ_HEAD, 1, head_key(node), MAX_HEAD_BYTES, _UNREADABLE)
    except redis.ResponseError:  # WRONGTYPE: another type was stored there
        return _UNREADABLE


def _current_head(client: redis.Redis, node: str, key: str) -> tuple[str | None, Head | None]:
    """The stored head, and it verified (None when missing, damaged or not ours: the next
    publish then rewrites every entry)."""
    raw = _read_head(client, node)
    if raw is None:
        return None, None
    if raw == _UNREADABLE:
        _refuse(node, "head", "the stored head (over its bound, or not a string)")
        return raw, None
    try:
        return raw, verify_head(raw, key, node=node)
    except SnapshotError as exc:
        refused_values["head"] += 1
        log.warning("node %s: the stored head is refused (%s): rewriting every entry", node, exc)
        return raw, None


# The entries count, then each field's value: false when missing, a marker when over its bound
# (never sent whole).
_READ_CHANGED = """
local out = {redis.call('HLEN', KEYS[1])}
for i = 2, #ARGV do
  if redis.call('HSTRLEN', KEYS[1], ARGV[i]) > tonumber(ARGV[1]) then
    out[#out + 1] = '!too-large'
  else
    out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i])
  end
end
return out
"""


def _bodies(node: WorkerNode, export_ids: set[int] | None, with_tls: bool) -> dict[str, Any]:
    """field → entry body (None: the export is no longer served) for `export_ids` (None: all
    served exports) and, if `with_tls`, the TLS section. An export the worker's parser refuses
    is logged and left out (it must not cost the node its other exports)."""
    served = Export.objects.filter(
        node=node, state__in=export_states.SERVED_STATES, enabled=True
    ).select_related("node")
    if export_ids is not None:
        served = served.filter(pk__in=export_ids)
    bodies: dict[str, Any] = {}
    tls: dict | None = None
    mode = node.tls_policy.mode
    if with_tls:
        tls = _tls_dict(node)
        try:
            TLSConfig.from_dict(tls, "tls")
        except ConfigError as exc:
            raise PublishError(f"node {node.name!r}: the TLS section is invalid: {exc}") from exc
        bodies[TLS_FIELD] = tls
    for export in served.order_by("pk"):
        field = export_field(export.pk)
        body = _export_dict(export)
        try:
            parsed = ExportConfig.from_dict(body, field)
        except ConfigError as exc:
            log.error("node %s: export %r not published: %s", node.name, export.name, exc)
            continue
        refusal = tls_refusal(parsed, mode)
        if refusal is not None:
            # Only rows saved before clean() refused them; the worker will not serve these,
            # and this log is where the web side's operator hears of it.
            log.warning("node %s: export %r will be refused: %s", node.name, export.name, refusal)
        bodies[field] = body
    for export_id in export_ids or ():
        bodies.setdefault(export_field(export_id), None)
    return bodies


def _publish_one(
    client: redis.Redis, node: WorkerNode, scopes: set[str] | None = None
) -> int | None:
    """Write what changed in `scopes` ("node", "tls", "export:<pk>"; None: everything) as
    signed entries under a new head, then notify the node. A change to the node as a whole, or
    a head or old entry that does not verify, rewrites every entry."""
    key = node_key(node.name)
    head_raw, head = _current_head(client, node.name, key)
    full = scopes is None or head is None or NODE_SCOPE in scopes
    export_ids = None
    if not full:
        export_ids = {int(s.split(":", 1)[1]) for s in scopes if s.startswith("export:")}
        fields = [export_field(i) for i in sorted(export_ids)]
        if TLS_SCOPE in scopes:
            fields.append(TLS_FIELD)
        old_macs: list[int] = []
        try:
            try:
                stored_count, *old_values = client.eval(
                    _READ_CHANGED, 1, entries_key(node.name), MAX_ENTRY_BYTES, *fields
                )
            except redis.ResponseError as exc:  # WRONGTYPE: another type was stored there
                raise SnapshotError(str(exc)) from None
            if stored_count != head.count:
                raise SnapshotError(f"{stored_count} entries stored, the head counts {head.count}")
            for field, value in zip(fields, old_values, strict=True):
                if value is not None:
                    old_macs.append(verify_entry(value, key, node=node.name, field=field).mac)
        except SnapshotError as exc:
            refused_values["entries"] += 1
            log.warning("node %s: stored entries refused (%s): rewriting all", node.name, exc)
            full = True
    generation = _next_generation(client, node.name, head)
    bodies = _bodies(node, export_ids if not full else None, full or TLS_SCOPE in scopes)
    writes: dict[str, str] = {}
    macs: list[int] = []
    for field, body in bodies.items():
        if body is not None:
            writes[field], mac = sign_entry(node.name, field, generation, body, key)
            macs.append(mac)
    removed = [field for field, body in bodies.items() if body is None]
    if full:
        new_head = Head(
            node.name,
            generation,
            head.generation if head else 0,
            len(writes),
            set_digest(macs),
            None,
        )
    else:
        new_head = Head(
            node.name,
            generation,
            head.generation,
            head.count - len(old_macs) + len(writes),
            (head.digest - sum(old_macs) + sum(macs)) % DIGEST_MODULUS,
            tuple(sorted(bodies)),
        )
    if not _store(
        client, node.name, key, head_raw, new_head, sign_head(new_head, key), writes, removed, full
    ):
        if full:
            log.info("node %s: generation %d superseded by a newer publish", node.name, generation)
            return None
        return _publish_one(client, node, None)  # the head moved under us: write it all
    log.info(
        "node %s: published config generation %d (%s: %d entr%s written, %d removed)",
        node.name,
        generation,
        "whole" if full else "changes",
        len(writes),
        "y" if len(writes) == 1 else "ies",
        len(removed),
    )
    return generation


def _superseded(node: str, key: str, current_raw: str | None, generation: int) -> bool:
    """Whether the stored head is another publisher's, of `generation` or later (only a head
    that verifies counts: a forged or damaged one is overwritten)."""
    if current_raw is None or current_raw == _UNREADABLE:
        return False
    try:
        return verify_head(current_raw, key, node=node).generation >= generation
    except SnapshotError:
        return False


def _store(
    client: redis.Redis,
    node: str,
    key: str,
    head_raw: str | None,
    head: Head,
    head_envelope: str,
    writes: dict[str, str],
    removed: list[str],
    full: bool,
) -> bool:
    """Store the entries and the head atomically, only if the head is still the one read (an
    incremental head follows exactly one), or for a whole rewrite, the head stored meanwhile is
    not a newer publish's. The published generation key is only written, never believed (any
    writer can set it)."""
    stored = False

    def step(pipe: redis.client.Pipeline) -> None:
        nonlocal stored
        current_raw = _read_head(pipe, node)
        if current_raw == head_raw:
            stored = True
        else:
            stored = full and not _superseded(node, key, current_raw, head.generation)
        pipe.multi()
        if not stored:
            return
        if full:
            pipe.delete(entries_key(node), config_key(node))
        if writes:
            pipe.hset(entries_key(node), mapping=writes)
        if removed:
            pipe.hdel(entries_key(node), *removed)
        pipe.set(head_key(node), head_envelope)
        pipe.set(published_key(node), head.generation)
        pipe.publish(config_channel(node), f"{node}:{head.generation}")

    client.transaction(step, head_key(node))
    return stored


# -- one publisher per node -------------------------------------------------------------------

# Held while a node is published, by whichever process publishes it. A publisher that dies
# holding it delays that node by this long at most; no publish of a real node takes near it.
LOCK_TTL_MS = 15_000
# Compare-and-delete: a publisher releases only the lock it holds (not one taken after its own
# expired).
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def lock_key(node: str) -> str:
    """The publisher lock of one node (web side only)."""
    return f"nbdweb:publisher-lock:{node}"


class NodeBusy(Exception):
    """Another publisher holds the node's lock (it publishes what is pending when done)."""


def _acquire(client: redis.Redis, node: str, wait: float) -> str:
    token = secrets.token_hex(16)
    deadline = time.monotonic() + wait
    while not client.set(lock_key(node), token, nx=True, px=LOCK_TTL_MS):
        if time.monotonic() >= deadline:
            raise NodeBusy(node)
        # Waiting for another process to finish its publish: nothing to be notified by.
        time.sleep(0.01)
    return token


def publish_node(node_id: int, *, only_pending: bool, lock_wait: float = 0.0) -> int | None:
    """Publish one node's config now, under its lock, and clear the markers it includes.

    `only_pending`: publish only if the node has markers (another publisher may have sent them
    already). Returns the generation published, or None (nothing pending, node gone, or a config
    that cannot be built: logged, markers cleared, since only a new change can mend it). Raises
    NodeBusy, or redis.RedisError with the markers kept for the next attempt.
    """
    if only_pending and not PendingPublish.objects.filter(node_id=node_id).exists():
        return None  # another publisher sent it already (checked again under the lock)
    node = WorkerNode.objects.select_related("tls_policy").filter(pk=node_id).first()
    if node is None:
        return None
    client = redis_client()
    token = _acquire(client, node.name, lock_wait)
    try:
        # Markers first, then the database: every change marked up to `newest` committed before
        # the config is read, so the published config includes it.
        marks = list(PendingPublish.objects.filter(node_id=node_id).values_list("id", "scope"))
        newest = max((mark_id for mark_id, _ in marks), default=None)
        if newest is None and only_pending:
            return None
        # Only what the markers name (a publish_config asks for everything).
        scopes = {scope for _, scope in marks} if only_pending else None
        try:
            generation = _publish_one(client, node, scopes)
        except PublishError as exc:
            log.error("node %s: config not published: %s", node.name, exc)
            generation = None
        if newest is not None:
            PendingPublish.objects.filter(node_id=node_id, id__lte=newest).delete()
        return generation
    finally:
        with contextlib.suppress(redis.RedisError):
            client.eval(_RELEASE_LUA, 1, lock_key(node.name), token)


# Rounds of publishing what was marked meanwhile before leaving the rest to the beat sweep (a
# node changed without pause keeps marking).
PUBLISH_AGAIN_ROUNDS = 10


def publish_nodes(node_ids: Iterable[int], lock_wait: float = 10.0) -> dict[str, int | None]:
    """Publish the given nodes now, in this thread, pending changes or not (`manage.py
    publish_config`). Never raises: errors are logged. Returns {node name: generation, or None}.
    """
    results: dict[str, int | None] = {}
    for node_id, name in WorkerNode.objects.filter(pk__in=set(node_ids)).values_list("pk", "name"):
        results[name] = None
        try:
            results[name] = publish_node(node_id, only_pending=False, lock_wait=lock_wait)
            # Released: a change marked while we held the lock (its publisher found the lock
            # taken and left the marker to the holder) is ours to publish.
            for _ in range(PUBLISH_AGAIN_ROUNDS):
                again = publish_node(node_id, only_pending=True, lock_wait=lock_wait)
                if again is None and not PendingPublish.objects.filter(node_id=node_id).exists():
                    break
                results[name] = again or results[name]
        except NodeBusy:
            log.error("node %s: config not published, its publisher lock stays taken", name)
        except redis.RedisError as exc:
            log.error("node %s: config not published, Redis unavailable: %s", name, exc)
    return results
