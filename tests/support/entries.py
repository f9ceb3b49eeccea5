"""Reading and writing a node's signed entries in Redis as the web side does
(nbdworker/contract/entries.py), for tests that play the web side or an attacker holding the
node's key."""

from __future__ import annotations

from typing import Any

import redis

from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.entries import (
    DIGEST_MODULUS,
    TLS_FIELD,
    Head,
    assemble,
    entries_key,
    head_key,
    set_digest,
    sign_entry,
    sign_head,
    verify_entry,
    verify_head,
)
from nbdworker.contract.snapshot import config_channel

__all__ = ["publish_entries", "read_config", "read_head"]


def read_head(r: redis.Redis, node: str, key: str) -> Head | None:
    raw = r.get(head_key(node))
    return None if raw is None else verify_head(raw, key, node=node)


def read_config(r: redis.Redis, node: str, key: str) -> WorkerConfig | None:
    """The config the node's entries make, verified as its worker does."""
    head = read_head(r, node, key)
    if head is None:
        return None
    entries = {
        (f.decode() if isinstance(f, bytes) else f): verify_entry(v, key, node=node, field=f)
        for f, v in r.hgetall(entries_key(node)).items()
    }
    return assemble(head, entries)


def publish_entries(
    r: redis.Redis,
    node: str,
    key: str,
    changes: dict[str, dict[str, Any] | None],
    *,
    generation: int | None = None,
    tls: dict[str, Any] | None = None,
    notify: bool = True,
) -> Head:
    """Write `changes` (field → export body, None: removed) under a new head that follows the
    stored one (or a whole new set, with `tls`, when there is none), and notify the node."""
    head = read_head(r, node, key)
    generation = generation if generation is not None else (head.generation + 1 if head else 1)
    if head is None:
        changes = {TLS_FIELD: tls or {"mode": "NOTLS"}, **changes}
    written: dict[str, str] = {}
    new_macs = 0
    old_macs = 0
    count = head.count if head else 0
    for field, body in changes.items():
        old = r.hget(entries_key(node), field) if head else None
        if old is not None:
            old_macs += verify_entry(old, key, node=node, field=field).mac
            count -= 1
        if body is not None:
            written[field], mac = sign_entry(node, field, generation, body, key)
            new_macs += mac
            count += 1
    digest = (
        ((head.digest if head else 0) - old_macs + new_macs) % DIGEST_MODULUS
        if head
        else set_digest([new_macs])
    )
    new_head = Head(
        node,
        generation,
        head.generation if head else 0,
        count,
        digest,
        tuple(sorted(changes)) if head else None,
    )
    with r.pipeline() as pipe:
        if written:
            pipe.hset(entries_key(node), mapping=written)
        removed = [f for f, body in changes.items() if body is None]
        if removed:
            pipe.hdel(entries_key(node), *removed)
        pipe.set(head_key(node), sign_head(new_head, key))
        if notify:
            pipe.publish(config_channel(node), f"{node}:{generation}")
        pipe.execute()
    return new_head
