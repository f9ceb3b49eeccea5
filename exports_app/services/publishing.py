"""Publishing worker configuration: building a node's config and storing it in Redis.

Called out of band by the publisher (`exports_app.services.publisher`, which marks changes and
decides when), never on a request thread. Publishing one node (`publish_node`), under the
node's lock in Redis (``nbdweb:publisher-lock:<node>``: one publisher per node across every
process and host):

1. read the newest dirty marker (`PendingPublish`) of the node, and the scopes of the markers
   up to it: `export:<pk>`, `tls`, or `node` (everything);
2. take the next generation: ``max(stored + 1, now in milliseconds, head + 1)`` in
   ``nbdweb:config-generation:<node>`` (one script, atomic in Redis). It only grows across web
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
4. store entries and head in one script (atomic), only if the stored head is still the one
   read (a whole rewrite: or is not a newer publish's, verified), then PUBLISH
   ``<node>:<generation>`` on ``nbdweb:config-changed:<node>``;
5. delete the markers up to the one read in 1 (later ones are the next publish's).

Several nodes (`publish_pending_batch`: a policy many share) go through these steps together,
one Redis round trip per step for all of them, each TLS section built once per policy.

A Redis error leaves the markers in place (the publisher tries again). `/api/v1/nodes/` shows a
node whose worker runs an older generation than the latest, or that has markers, as not current.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import redis
from django.conf import settings
from django.db.models import Q

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
    "publish_pending_batch",
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


# The node's next generation, max(stored + 1, ARGV[1] (the floor)), stored and returned with why
# the stored counter was not believed ('' when it was): not a string, not ASCII digits, or above
# ARGV[2] (the ceiling: forged). Believed values stay below 2^53 (exact in Lua's numbers).
_NEXT_GENERATION = """
local kind = redis.call('TYPE', KEYS[1]).ok
local stored, refused = 0, ''
if kind == 'string' then
  local raw = redis.call('GETRANGE', KEYS[1], 0, 20)
  if #raw > 15 or not string.match(raw, '^%d+$') then refused = 'not a generation'
  elseif tonumber(raw) > tonumber(ARGV[2]) then refused = 'forged far above the clock'
  else stored = tonumber(raw) end
elseif kind ~= 'none' then refused = 'of type ' .. kind end
local new = string.format('%.0f', math.max(stored + 1, tonumber(ARGV[1])))
redis.call('SET', KEYS[1], new)
return {new, refused}
"""


def _generation_bounds(head: Head | None) -> tuple[int, int]:
    """(floor, ceiling) of the next generation: above the clock and the verified head (a writer
    cannot forge it); a stored counter is believed only up to GENERATION_AHEAD_MS above them, so
    no writer chooses the generation the web side signs (the worker refuses any below the one it
    applied)."""
    now = time.time_ns() // 1_000_000
    head_generation = head.generation if head is not None else 0
    return max(now, head_generation + 1), max(now, head_generation) + GENERATION_AHEAD_MS


def _generation_reply(node: str, reply: list) -> int:
    new, refused = int(reply[0]), reply[1]
    if refused:
        _refuse(node, "generation", f"{generation_key(node)} ({refused})")
    return new


# The head if it is a string within ARGV[1] bytes, ARGV[2] when it is not, false when missing.
_READ_HEAD = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return false end
if kind ~= 'string' or redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return ARGV[2] end
return redis.call('GET', KEYS[1])
"""


def _read_head(client: redis.Redis | redis.client.Pipeline, node: str) -> str | None:
    """The stored head as read, bounded in Redis (`_UNREADABLE` when over its bound or another
    type); None when missing."""
    return client.eval(_READ_HEAD, 1, head_key(node), MAX_HEAD_BYTES, _UNREADABLE)


def _checked_head(node: str, key: str, raw: str | None) -> Head | None:
    """The head `raw`, verified (None when missing, damaged or not ours: the next publish then
    rewrites every entry)."""
    if raw is None:
        return None
    if raw == _UNREADABLE:
        _refuse(node, "head", "the stored head (over its bound, or not a string)")
        return None
    try:
        return verify_head(raw, key, node=node)
    except SnapshotError as exc:
        refused_values["head"] += 1
        log.warning("node %s: the stored head is refused (%s): rewriting every entry", node, exc)
        return None


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


def _bodies(
    node: WorkerNode,
    export_ids: set[int] | None,
    with_tls: bool,
    tls_sections: dict[int, dict | PublishError] | None = None,
) -> dict[str, Any]:
    """field → entry body (None: the export is no longer served) for `export_ids` (None: all
    served exports) and, if `with_tls`, the TLS section (built once per policy in
    `tls_sections`). An export the worker's parser refuses is logged and left out (it must not
    cost the node its other exports)."""
    bodies: dict[str, Any] = {}
    mode = node.tls_policy.mode
    if with_tls:
        bodies[TLS_FIELD] = _tls_section(node, {} if tls_sections is None else tls_sections)
    if export_ids is not None and not export_ids:
        return bodies
    served = Export.objects.filter(
        node=node, state__in=export_states.SERVED_STATES, enabled=True
    ).select_related("node")
    if export_ids is not None:
        served = served.filter(pk__in=export_ids)
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


def _tls_section(node: WorkerNode, sections: dict[int, dict | PublishError]) -> dict:
    """The node's TLS section, built and validated once per policy per batch (decrypting the
    server key and parsing the certificates is most of a policy change's publish)."""
    policy_id = node.tls_policy_id
    if policy_id not in sections:
        try:
            tls = _tls_dict(node)
            try:
                TLSConfig.from_dict(tls, "tls")
            except ConfigError as exc:
                raise PublishError(f"the TLS section is invalid: {exc}") from exc
            sections[policy_id] = tls
        except PublishError as exc:
            sections[policy_id] = exc
    section = sections[policy_id]
    if isinstance(section, PublishError):
        raise PublishError(f"node {node.name!r}: {section}")
    return section


@dataclasses.dataclass
class _Plan:
    """One node's publish through its phases (`_publish_batch`)."""

    node: WorkerNode
    scopes: set[str] | None
    key: str = ""
    head_raw: str | None = None
    head: Head | None = None
    full: bool = True
    export_ids: set[int] | None = None
    fields: list[str] = dataclasses.field(default_factory=list)
    old_macs: list[int] = dataclasses.field(default_factory=list)
    generation: int = 0
    new_head: Head | None = None
    writes: dict[str, str] = dataclasses.field(default_factory=dict)
    removed: list[str] = dataclasses.field(default_factory=list)


def _plan_reads(client: redis.Redis, plans: list[_Plan]) -> None:
    """Read every node's head, then the old entries of the changed fields, in one round trip
    each for the batch; decide which nodes are rewritten whole."""
    with client.pipeline(transaction=False) as pipe:
        for plan in plans:
            _read_head(pipe, plan.node.name)
        heads = pipe.execute(raise_on_error=False)
    changed: list[_Plan] = []
    for plan, raw in zip(plans, heads, strict=True):
        plan.key = node_key(plan.node.name)
        plan.head_raw = _UNREADABLE if isinstance(raw, redis.ResponseError) else raw
        if isinstance(raw, Exception) and not isinstance(raw, redis.ResponseError):
            raise raw
        plan.head = _checked_head(plan.node.name, plan.key, plan.head_raw)
        scopes = plan.scopes
        plan.full = scopes is None or plan.head is None or NODE_SCOPE in scopes
        if not plan.full:
            plan.export_ids = {int(s.split(":", 1)[1]) for s in scopes if s.startswith("export:")}
            plan.fields = [export_field(i) for i in sorted(plan.export_ids)]
            if TLS_SCOPE in scopes:
                plan.fields.append(TLS_FIELD)
            changed.append(plan)
    if not changed:
        return
    with client.pipeline(transaction=False) as pipe:
        for plan in changed:
            pipe.eval(_READ_CHANGED, 1, entries_key(plan.node.name), MAX_ENTRY_BYTES, *plan.fields)
        replies = pipe.execute(raise_on_error=False)
    for plan, reply in zip(changed, replies, strict=True):
        try:
            if isinstance(reply, redis.ResponseError):  # WRONGTYPE: another type stored there
                raise SnapshotError(str(reply))
            if isinstance(reply, Exception):
                raise reply
            stored_count, *old_values = reply
            if stored_count != plan.head.count:
                raise SnapshotError(
                    f"{stored_count} entries stored, the head counts {plan.head.count}"
                )
            for name, value in zip(plan.fields, old_values, strict=True):
                if value is not None:
                    entry = verify_entry(value, plan.key, node=plan.node.name, field=name)
                    plan.old_macs.append(entry.mac)
        except SnapshotError as exc:
            refused_values["entries"] += 1
            log.warning("node %s: stored entries refused (%s): rewriting all", plan.node.name, exc)
            plan.full, plan.export_ids, plan.old_macs = True, None, []


def _plan_generations(client: redis.Redis, plans: list[_Plan]) -> None:
    with client.pipeline(transaction=False) as pipe:
        for plan in plans:
            floor, ceiling = _generation_bounds(plan.head)
            pipe.eval(_NEXT_GENERATION, 1, generation_key(plan.node.name), floor, ceiling)
        replies = pipe.execute()
    for plan, reply in zip(plans, replies, strict=True):
        plan.generation = _generation_reply(plan.node.name, reply)


def _plan_entries(plan: _Plan, tls_sections: dict[int, dict | PublishError]) -> None:
    """Build, validate and sign the node's changed entries and its new head (raises
    PublishError)."""
    node, head = plan.node, plan.head
    with_tls = plan.full or TLS_SCOPE in plan.scopes
    bodies = _bodies(node, None if plan.full else plan.export_ids, with_tls, tls_sections)
    macs: list[int] = []
    for name, body in bodies.items():
        if body is not None:
            plan.writes[name], mac = sign_entry(node.name, name, plan.generation, body, plan.key)
            macs.append(mac)
    plan.removed = [name for name, body in bodies.items() if body is None]
    previous = head.generation if head else 0
    if plan.full:
        plan.new_head = Head(
            node.name, plan.generation, previous, len(plan.writes), set_digest(macs), None
        )
    else:
        plan.new_head = Head(
            node.name,
            plan.generation,
            previous,
            head.count - len(plan.old_macs) + len(plan.writes),
            (head.digest - sum(plan.old_macs) + sum(macs)) % DIGEST_MODULUS,
            tuple(sorted(bodies)),
        )


# Store a node's entries and head only if the head is still ARGV[2] (as read: '' when missing,
# the unreadable marker when over ARGV[1] bytes or not a string) and, for a publish of changes,
# the entries are a hash: then ARGV[3] '1' deletes the entries first (a whole rewrite); ARGV[7]
# pairs of field and entry follow from ARGV[9], then the fields to remove; the head ARGV[4] and
# generation ARGV[5] are stored, the notice ARGV[7] published on ARGV[6]. 0: nothing written.
_STORE = """
local kind = redis.call('TYPE', KEYS[1]).ok
local current = ''
if kind ~= 'none' then
  if kind ~= 'string' or redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then
    current = '%UNREADABLE%'
  else
    current = redis.call('GET', KEYS[1])
  end
end
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[2], KEYS[3])
else
  local entries = redis.call('TYPE', KEYS[2]).ok
  if entries ~= 'none' and entries ~= 'hash' then return 0 end
end
local first, last = 9, 8 + 2 * tonumber(ARGV[8])
for i = first, last, 1000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, i, math.min(i + 999, last)))
end
for i = last + 1, #ARGV, 1000 do
  redis.call('HDEL', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
""".replace("%UNREADABLE%", _UNREADABLE)


def _store_args(plan: _Plan) -> list[Any]:
    node, head = plan.node.name, plan.new_head
    args: list[Any] = [
        MAX_HEAD_BYTES,
        plan.head_raw or "",
        "1" if plan.full else "0",
        sign_head(head, plan.key),
        head.generation,
        config_channel(node),
        f"{node}:{head.generation}",
        len(plan.writes),
    ]
    for name, value in plan.writes.items():
        args += (name, value)
    return args + plan.removed


def _store_keys(node: str) -> tuple[str, str, str, str]:
    return head_key(node), entries_key(node), config_key(node), published_key(node)


def _superseded(node: str, key: str, current_raw: str | None, generation: int) -> bool:
    """Whether the stored head is another publisher's, of `generation` or later (only a head
    that verifies counts: a forged or damaged one is overwritten)."""
    if current_raw is None or current_raw == _UNREADABLE:
        return False
    try:
        return verify_head(current_raw, key, node=node).generation >= generation
    except SnapshotError:
        return False


def _store_unless_superseded(client: redis.Redis, plan: _Plan) -> bool:
    """A whole rewrite whose head moved since it was read: stored unless the head now stored
    is a newer publish's (verified: a forged or damaged one is overwritten)."""
    node = plan.node.name
    for _ in range(3):
        current = _read_head(client, node)
        if _superseded(node, plan.key, current, plan.generation):
            return False
        plan.head_raw = current
        if client.eval(_STORE, 4, *_store_keys(node), *_store_args(plan)):
            return True
    # Rewritten under us on every try and never by a newer publish (a writer at work): keep the
    # markers (the caller's Redis error) rather than count the change as sent.
    raise redis.RedisError(f"node {node}: the stored head keeps changing under the publish")


def _publish_batch(client: redis.Redis, plans: list[_Plan]) -> dict[int, int | None]:
    """Publish several nodes, each under its lock: one round trip per phase for the batch
    (heads, old entries, generations, stores), each TLS section built once per policy. Returns
    {node id: generation published, or None (config not buildable: logged; superseded)}."""
    results: dict[int, int | None] = {}
    _plan_reads(client, plans)
    _plan_generations(client, plans)
    tls_sections: dict[int, dict | PublishError] = {}
    ready: list[_Plan] = []
    for plan in plans:
        try:
            _plan_entries(plan, tls_sections)
        except PublishError as exc:
            log.error("node %s: config not published: %s", plan.node.name, exc)
            results[plan.node.pk] = None
            continue
        ready.append(plan)
    results.update(_publish_batch_stores(client, ready))
    return results


def _publish_batch_stores(client: redis.Redis, ready: list[_Plan]) -> dict[int, int | None]:
    results: dict[int, int | None] = {}
    with client.pipeline(transaction=False) as pipe:
        for plan in ready:
            pipe.eval(_STORE, 4, *_store_keys(plan.node.name), *_store_args(plan))
        stored = pipe.execute()
    for plan, ok in zip(ready, stored, strict=True):
        node = plan.node
        if not ok and not plan.full:
            # The head moved under us (or the entries are not a hash): write it all.
            try:
                results[node.pk] = _publish_one(client, node, None)
            except PublishError as exc:
                log.error("node %s: config not published: %s", node.name, exc)
                results[node.pk] = None
            continue
        if not ok and not _store_unless_superseded(client, plan):
            log.info(
                "node %s: generation %d superseded by a newer publish", node.name, plan.generation
            )
            results[node.pk] = None
            continue
        log.info(
            "node %s: published config generation %d (%s: %d entr%s written, %d removed)",
            node.name,
            plan.generation,
            "whole" if plan.full else "changes",
            len(plan.writes),
            "y" if len(plan.writes) == 1 else "ies",
            len(plan.removed),
        )
        results[node.pk] = plan.generation
    return results


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


def _publish_one(
    client: redis.Redis, node: WorkerNode, scopes: set[str] | None = None
) -> int | None:
    """Write what changed in `scopes` ("node", "tls", "export:<pk>"; None: everything) as
    signed entries under a new head, then notify the node (raises PublishError)."""
    plan = _Plan(node, scopes)
    _plan_reads(client, [plan])
    _plan_generations(client, [plan])
    _plan_entries(plan, {})
    return _publish_batch_stores(client, [plan])[node.pk]


def _nodes(node_ids: Iterable[int]) -> list[WorkerNode]:
    return list(
        WorkerNode.objects.select_related("tls_policy__server_certificate")
        .filter(pk__in=set(node_ids))
        .order_by("pk")
    )


def _release(client: redis.Redis, locks: dict[str, str]) -> None:
    with contextlib.suppress(redis.RedisError), client.pipeline(transaction=False) as pipe:
        for name, token in locks.items():
            pipe.eval(_RELEASE_LUA, 1, lock_key(name), token)
        pipe.execute()


def publish_node(node_id: int, *, only_pending: bool, lock_wait: float = 0.0) -> int | None:
    """Publish one node's config now, under its lock, and clear the markers it includes.

    `only_pending`: publish only if the node has markers (another publisher may have sent them
    already). Returns the generation published, or None (nothing pending, node gone, or a config
    that cannot be built: logged, markers cleared, since only a new change can mend it). Raises
    NodeBusy, or redis.RedisError with the markers kept for the next attempt.
    """
    if only_pending and not PendingPublish.objects.filter(node_id=node_id).exists():
        return None  # another publisher sent it already (checked again under the lock)
    nodes = _nodes([node_id])
    if not nodes:
        return None
    node = nodes[0]
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
        _release(client, {node.name: token})


def publish_pending_batch(node_ids: Iterable[int]) -> dict[int, int | None]:
    """Publish the markers of several nodes in one batch (a policy many nodes share): the
    nodes whose lock is free, each under it, with one round trip per phase for all and each TLS
    section built once. Nodes another publisher holds are left to it (it re-reads the markers
    when done); the caller looks again for markers left (see `publisher`). Raises
    redis.RedisError or DatabaseError with the markers kept."""
    nodes = _nodes(node_ids)
    if not nodes:
        return {}
    client = redis_client()
    tokens = {node.name: secrets.token_hex(16) for node in nodes}
    with client.pipeline(transaction=False) as pipe:
        for name, token in tokens.items():
            pipe.set(lock_key(name), token, nx=True, px=LOCK_TTL_MS)
        taken = pipe.execute()
    locks = {name: token for (name, token), ok in zip(tokens.items(), taken, strict=True) if ok}
    try:
        nodes = [node for node in nodes if node.name in locks]
        # Markers first, then the database (as publish_node): every change marked up to each
        # node's newest committed before any of the batch's config is read.
        scopes: dict[int, set[str]] = {}
        newest: dict[int, int] = {}
        marks = PendingPublish.objects.filter(node_id__in=[n.pk for n in nodes])
        for node_id, mark_id, scope in marks.values_list("node_id", "id", "scope"):
            scopes.setdefault(node_id, set()).add(scope)
            newest[node_id] = max(newest.get(node_id, 0), mark_id)
        plans = [_Plan(node, scopes[node.pk]) for node in nodes if node.pk in scopes]
        results = _publish_batch(client, plans) if plans else {}
        if newest:
            done = Q()
            for node_id, mark_id in newest.items():
                done |= Q(node_id=node_id, id__lte=mark_id)
            PendingPublish.objects.filter(done).delete()
        return results
    finally:
        _release(client, locks)


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
