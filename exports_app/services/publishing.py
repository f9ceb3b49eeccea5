"""Publishing worker configuration: building a node's config and storing it in Redis.

Called out of band by the publisher (`exports_app.services.publisher`, which marks changes and
decides when), never on a request thread. Publishing one node (`publish_node`), under the
node's lock in Redis (``nbdweb:publisher-lock:<node>``: one publisher per node across every
process and host):

1. read the newest dirty marker (`PendingPublish`) of the node;
2. take the next generation: ``max(stored + 1, now in milliseconds)`` in
   ``nbdweb:config-generation:<node>`` (a WATCH/MULTI transaction). It only grows across web
   restarts, and even when Redis loses its data the clock keeps it above anything published
   before;
3. build the node's full `WorkerConfig` from the database (ready, enabled exports; the TLS
   policy with the decrypted server key, trusted CAs and revoked serials), validate it with the
   worker's own parser, sign it with the node's own key (`services.nodekeys`, derived from the
   master secret: no other node's worker can forge or open it; `nbdworker.contract.snapshot`);
4. store it at ``nbdweb:config:<node>`` only if its generation is above the stored one (two
   publishers racing cannot put an older snapshot back), then PUBLISH
   ``nbdweb:config-changed:<node>`` ``<node>:<generation>``;
5. delete the markers up to the one read in 1 (later ones are the next publish's).

A Redis error leaves the markers in place (the publisher tries again). `/api/v1/nodes/` shows a
node whose worker runs an older generation than the latest, or that has markers, as not current.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterable
from functools import lru_cache

import redis
from django.conf import settings
from django.db.models import Max

from exports_app.choices import TLSMode
from exports_app.models import Export, PendingPublish, WorkerNode
from exports_app.services import export_states
from exports_app.services.nodekeys import node_key
from nbdworker.contract.config import ConfigError, WorkerConfig, tls_refusal
from nbdworker.contract.redisconn import connect
from nbdworker.contract.snapshot import (
    config_channel,
    config_key,
    generation_key,
    published_key,
    sign_snapshot,
)

__all__ = [
    "NodeBusy",
    "PublishError",
    "build_config",
    "lock_key",
    "publish_node",
    "publish_nodes",
    "redis_client",
]

log = logging.getLogger("exports_app.publishing")

# A request must not hang on an unreachable Redis: fail fast and let the retry catch up.
REDIS_CONNECT_TIMEOUT = 1.0
REDIS_TIMEOUT = 3.0


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
    """The full snapshot of what `node`'s worker serves, validated by the worker's parser."""
    node = WorkerNode.objects.select_related("tls_policy__server_certificate").get(pk=node.pk)
    exports = (
        Export.objects.filter(node=node, state__in=export_states.SERVED_STATES, enabled=True)
        .select_related("node")
        .order_by("pk")
    )
    data = {
        "version": 1,
        "generation": generation,
        "node": node.name,
        "exports": [_export_dict(e) for e in exports],
        "tls": _tls_dict(node),
    }
    try:
        config = WorkerConfig.from_dict(data)
    except ConfigError as exc:
        raise PublishError(f"node {node.name!r}: the config is invalid: {exc}") from exc
    for export in config.exports:
        # Only rows saved before clean() refused them; the worker will not serve these, and
        # this log is where the web side's operator hears of it.
        refusal = tls_refusal(export, config.tls.mode)
        if refusal is not None:
            log.warning("node %s: export %r will be refused: %s", node.name, export.name, refusal)
    return config


# -- delivering -------------------------------------------------------------------------------


def _next_generation(client: redis.Redis, node: str) -> int:
    floor = time.time_ns() // 1_000_000
    new = 0

    def step(pipe: redis.client.Pipeline) -> None:
        nonlocal new
        new = max(int(pipe.get(generation_key(node)) or 0) + 1, floor)
        pipe.multi()
        pipe.set(generation_key(node), new)

    client.transaction(step, generation_key(node))
    return new


def _store(client: redis.Redis, node: str, generation: int, envelope: str) -> bool:
    stored = False

    def step(pipe: redis.client.Pipeline) -> None:
        nonlocal stored
        current = int(pipe.get(published_key(node)) or 0)
        stored = generation > current
        pipe.multi()
        if stored:
            pipe.set(config_key(node), envelope)
            pipe.set(published_key(node), generation)
            pipe.publish(config_channel(node), f"{node}:{generation}")

    client.transaction(step, published_key(node))
    return stored


def _publish_one(client: redis.Redis, node: WorkerNode) -> int | None:
    generation = _next_generation(client, node.name)
    config = build_config(node, generation)
    envelope = sign_snapshot(config, node_key(node.name))
    if not _store(client, node.name, generation, envelope):
        log.info("node %s: generation %d superseded by a newer publish", node.name, generation)
        return None
    log.info(
        "node %s: published config generation %d (%d export(s))",
        node.name,
        generation,
        len(config.exports),
    )
    return generation


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
        newest = PendingPublish.objects.filter(node_id=node_id).aggregate(Max("id"))["id__max"]
        if newest is None and only_pending:
            return None
        try:
            generation = _publish_one(client, node)
        except PublishError as exc:
            log.error("node %s: config not published: %s", node.name, exc)
            generation = None
        if newest is not None:
            PendingPublish.objects.filter(node_id=node_id, id__lte=newest).delete()
        return generation
    finally:
        with contextlib.suppress(redis.RedisError):
            client.eval(_RELEASE_LUA, 1, lock_key(node.name), token)


def publish_nodes(node_ids: Iterable[int], lock_wait: float = 10.0) -> dict[str, int | None]:
    """Publish the given nodes now, in this thread, pending changes or not (`manage.py
    publish_config`). Never raises: errors are logged. Returns {node name: generation, or None}.
    """
    results: dict[str, int | None] = {}
    for node_id, name in WorkerNode.objects.filter(pk__in=set(node_ids)).values_list("pk", "name"):
        results[name] = None
        try:
            results[name] = publish_node(node_id, only_pending=False, lock_wait=lock_wait)
        except NodeBusy:
            log.error("node %s: config not published, its publisher lock stays taken", name)
        except redis.RedisError as exc:
            log.error("node %s: config not published, Redis unavailable: %s", name, exc)
    return results
