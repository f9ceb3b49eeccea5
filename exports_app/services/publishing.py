"""Publishing worker configuration: the one entry point every change goes through.

`schedule_publish(node)` is called for every change to what a node's worker serves. The model
signals in `exports_app.signals` call it on every save and delete of an export, a node, a TLS
policy, a certificate or a CA (API, admin, jobs and services alike), so no caller has to
remember; a job or service may still call it explicitly, it costs nothing extra.

Within one transaction the affected nodes are collected and published by a single
`transaction.on_commit` callback: publish after commit, never before, and nothing at all when
the transaction rolls back.

Publishing one node (`publish_nodes`):

1. take the next generation: ``max(stored + 1, now in milliseconds)`` in
   ``nbdweb:config-generation:<node>`` (a WATCH/MULTI transaction). It only grows across web
   restarts, and even when Redis loses its data the clock keeps it above anything published
   before;
2. build the node's full `WorkerConfig` from the database (ready, enabled exports; the TLS
   policy with the decrypted server key, trusted CAs and revoked serials), validate it with the
   worker's own parser, sign it with the node's own key (`services.nodekeys`, derived from the
   master secret: no other node's worker can forge or open it; `nbdworker.contract.snapshot`);
3. store it at ``nbdweb:config:<node>`` only if its generation is above the stored one (two web
   processes racing cannot put an older snapshot back), then PUBLISH
   ``nbdweb:config-changed <node>:<generation>``.

A Redis outage never fails the request that made the change: the error is logged and the node is
remembered. A background thread of this process retries the remembered nodes with backoff
(0.5 s doubling to 10 s) until Redis answers, and the next publish of any node retries them too.
Every publish builds the full snapshot, so any later publish of a node carries all earlier
changes. If the web process ends before Redis is back, ``manage.py publish_config`` republishes
every node; `/api/v1/nodes/` shows a node whose worker runs an older generation than the latest
as not current.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from functools import lru_cache

import redis
from django.conf import settings
from django.db import connections, transaction

from exports_app.choices import TLSMode
from exports_app.models import Export, WorkerNode
from exports_app.services import export_states
from exports_app.services.nodekeys import node_key
from nbdworker.contract.config import ConfigError, WorkerConfig, tls_refusal
from nbdworker.contract.redisconn import connect
from nbdworker.contract.snapshot import (
    CHANNEL,
    config_key,
    generation_key,
    published_key,
    sign_snapshot,
)

__all__ = [
    "PublishError",
    "build_config",
    "publish_nodes",
    "redis_client",
    "schedule_publish",
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
            pipe.publish(CHANNEL, f"{node}:{generation}")

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


# Nodes whose last publish hit a Redis error, retried by the next publish in this process and
# by the retry thread.
_retry_lock = threading.Lock()
_retry: set[int] = set()
_retry_thread: threading.Thread | None = None
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 10.0


def _retry_loop() -> None:
    global _retry_thread
    delay = RETRY_FIRST_DELAY
    try:
        while True:
            # A backoff between attempts, not a synchronisation: Redis is down, nothing to wait on.
            time.sleep(delay)
            with _retry_lock:
                if not _retry:
                    _retry_thread = None
                    return
            publish_nodes(())
            delay = min(delay * 2, RETRY_MAX_DELAY)
    finally:
        connections.close_all()  # this thread's own database connections


def _schedule_retry(node_id: int) -> None:
    global _retry_thread
    with _retry_lock:
        _retry.add(node_id)
        if _retry_thread is None:
            _retry_thread = threading.Thread(
                target=_retry_loop, name="nbdweb-publish-retry", daemon=True
            )
            _retry_thread.start()


def publish_nodes(node_ids: Iterable[int]) -> dict[str, int | None]:
    """Publish the given nodes now (plus any whose last publish failed). Never raises: errors
    are logged. Returns {node name: generation published, or None}."""
    with _retry_lock:
        wanted = set(node_ids) | _retry
        _retry.clear()
    results: dict[str, int | None] = {}
    client = redis_client()
    redis_down: redis.RedisError | None = None
    for node in WorkerNode.objects.filter(pk__in=wanted).select_related("tls_policy"):
        results[node.name] = None
        if redis_down is None:
            try:
                results[node.name] = _publish_one(client, node)
                continue
            except redis.RedisError as exc:
                redis_down = exc  # the other nodes wait too: no connect timeout per node
            except PublishError as exc:
                log.error("node %s: config not published: %s", node.name, exc)
                continue
        log.error(
            "node %s: config not published, Redis unavailable (retrying): %s", node.name, redis_down
        )
        _schedule_retry(node.pk)
    return results


# -- scheduling -------------------------------------------------------------------------------


class _Batch:
    """The nodes to publish when the current transaction commits."""

    def __init__(self, savepoints: tuple[str, ...]) -> None:
        self.savepoints = savepoints
        self.node_ids: set[int] = set()

    def flush(self) -> None:
        publish_nodes(self.node_ids)


_local = threading.local()


def _node_ids(nodes: object | Iterable[object]) -> set[int]:
    if isinstance(nodes, WorkerNode | int):
        nodes = [nodes]
    ids: set[int] = set()
    for node in nodes:  # type: ignore[union-attr]
        ids.add(node.pk if isinstance(node, WorkerNode) else int(node))
    return ids


def schedule_publish(nodes: object | Iterable[object]) -> None:
    """Publish the config of `nodes` (a WorkerNode, a node id, or several) once the transaction
    commits; at once outside a transaction."""
    ids = _node_ids(nodes)
    if not ids:
        return
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        publish_nodes(ids)
        return
    savepoints = tuple(connection.savepoint_ids)
    batch: _Batch | None = getattr(_local, "batch", None)
    # Reuse the pending batch only while its callback is still queued (a rollback drops it) and
    # it was queued in this savepoint or an enclosing one (so it cannot be rolled back while
    # this change survives). Otherwise start another; at worst a node is published twice.
    if (
        batch is None
        or savepoints[: len(batch.savepoints)] != batch.savepoints
        or not any(func == batch.flush for _, func, _ in connection.run_on_commit)
    ):
        batch = _Batch(savepoints)
        _local.batch = batch
        transaction.on_commit(batch.flush, robust=True)
    batch.node_ids |= ids
