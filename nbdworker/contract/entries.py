"""Signed per-export entries: a change sends what changed, not the node's whole config.

A node's config lives in Redis as one hash and one head (docs/architecture.md):

* ``nbdweb:config-entries:<node>``: field ``export:<id>`` → one export's signed entry; field
  ``tls`` → the node's TLS section (its private key sealed for the node, as in a snapshot);
* ``nbdweb:config-head:<node>``: the signed head: ``generation``, ``previous`` (the generation
  it follows), ``count`` and ``digest`` of the whole set of entries, and ``changed``: the
  fields written or removed since ``previous`` (null after a full rewrite).

Every entry and the head are HMAC-SHA256 envelopes under the node's key, like a snapshot, whose
payload names the node, the field and the generation that wrote it. ``digest`` is the sum,
modulo 2**256, of every entry's MAC: only the key holder can compute an entry's MAC, so a
Redis writer without the key cannot add an entry, put back an older one (another MAC) or delete
one (a missing term) without the digest telling. A worker that applied ``previous`` reads only
``changed`` (and updates the sum by their old and new MACs); any other reads the whole hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from nbdworker.contract.config import ConfigError, ExportConfig, TLSConfig, WorkerConfig
from nbdworker.contract.sealed import SealError, is_sealed, open_sealed, seal
from nbdworker.contract.snapshot import (
    ALGORITHM,
    SnapshotError,
    canonical_json,
    key_id,
)

__all__ = [
    "DIGEST_MODULUS",
    "MAX_ENTRIES",
    "MAX_ENTRY_BYTES",
    "TLS_FIELD",
    "Entry",
    "Head",
    "assemble",
    "entries_key",
    "export_field",
    "head_key",
    "set_digest",
    "sign_entry",
    "sign_head",
    "verify_entry",
    "verify_head",
]

ENTRY_FORMAT = "nbdweb-entry-v1"
HEAD_FORMAT = "nbdweb-head-v1"
DIGEST_MODULUS = 1 << 256
TLS_FIELD = "tls"
# Bounds a hostile hash: one entry (an export, or the TLS section with its CA bundle), and the
# number of entries of one node.
MAX_ENTRY_BYTES = 1 << 20
MAX_ENTRIES = 200_000
MAX_HEAD_BYTES = 1 << 20
_ASCII_DIGITS = frozenset("0123456789")
_ORDER = attrgetter("order")


def entries_key(node: str) -> str:
    """Hash field → signed entry of the node's config (web side writes)."""
    return f"nbdweb:config-entries:{node}"


def head_key(node: str) -> str:
    """The signed head of the node's entries (web side writes)."""
    return f"nbdweb:config-head:{node}"


def export_field(export_id: int) -> str:
    return f"export:{export_id}"


@dataclass(frozen=True, slots=True)
class Entry:
    field: str
    generation: int
    mac: int
    export: ExportConfig | None = None
    tls: TLSConfig | None = None
    order: int = 0  # an export's id: exports are listed in the order they were made


@dataclass(frozen=True, slots=True)
class Head:
    node: str
    generation: int
    previous: int
    count: int
    digest: int
    changed: tuple[str, ...] | None


def _raw_key(key: str | bytes) -> bytes:
    raw = key.encode("utf-8") if isinstance(key, str) else key
    if not raw:
        raise SnapshotError("the node key is empty", "bad_signature")
    return raw


def _mac(fmt: str, raw: bytes, kid: str, payload: str) -> str:
    return hmac.new(raw, f"{fmt}\n{kid}\n{payload}".encode(), hashlib.sha256).hexdigest()


def _seal(fmt: str, raw: bytes, document: dict[str, Any]) -> tuple[str, int]:
    kid = key_id(raw)
    payload = canonical_json(document)
    sig = _mac(fmt, raw, kid, payload)
    envelope = {"format": fmt, "alg": ALGORITHM, "kid": kid, "payload": payload, "sig": sig}
    return canonical_json(envelope), int(sig, 16)


def _open(fmt: str, raw: bytes, data: str | bytes, bound: int) -> tuple[dict[str, Any], int]:
    if len(data) > bound:
        raise SnapshotError(f"{fmt} of {len(data)} bytes is over {bound}", "too_large")
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(envelope, dict) or envelope.get("format") != fmt:
        raise SnapshotError(f"not a {fmt} envelope")
    if envelope.get("alg") != ALGORITHM:
        raise SnapshotError(f"unknown algorithm {envelope.get('alg')!r}")
    kid, payload, sig = envelope.get("kid"), envelope.get("payload"), envelope.get("sig")
    if not all(isinstance(v, str) for v in (kid, payload, sig)):
        raise SnapshotError("kid, payload and sig must be strings")
    if kid != key_id(raw):
        raise SnapshotError(f"signed with another key (key id {kid})", "bad_signature")
    if len(sig) != 64 or not hmac.compare_digest(sig, _mac(fmt, raw, kid, payload)):
        raise SnapshotError("bad signature", "bad_signature")
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise SnapshotError(f"payload is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SnapshotError("payload is not an object")
    return document, int(sig, 16)


def _generation(document: Mapping[str, Any], name: str = "generation") -> int:
    value = document.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise SnapshotError(f"{name} must be an integer in [0, 2**64)")
    return value


# -- entries ------------------------------------------------------------------------------------


def sign_entry(
    node: str, field: str, generation: int, body: dict[str, Any], key: str | bytes
) -> tuple[str, int]:
    """(the envelope of one entry, its MAC as an integer). `body` is an export's dict, or for
    TLS_FIELD the TLS section (its ``key_pem`` sealed here for `node`)."""
    raw = _raw_key(key)
    if field == TLS_FIELD and body.get("key_pem"):
        body = {**body, "key_pem": seal(body["key_pem"], raw, node)}
    document = {"node": node, "field": field, "generation": generation, "body": body}
    return _seal(ENTRY_FORMAT, raw, document)


def verify_entry(data: str | bytes, key: str | bytes, *, node: str, field: str) -> Entry:
    """One entry, checked: signed with this node's key, for this node and this field, and
    valid. Raises SnapshotError."""
    raw = _raw_key(key)
    document, mac = _open(ENTRY_FORMAT, raw, data, MAX_ENTRY_BYTES)
    if document.get("node") != node:
        raise SnapshotError(f"entry for node {document.get('node')!r}", "other_node")
    if document.get("field") != field:
        # A valid entry moved to another field (or another export's entry copied over).
        raise SnapshotError(f"entry of {document.get('field')!r} found at {field!r}")
    generation = _generation(document)
    body = document.get("body")
    try:
        if field == TLS_FIELD:
            if not isinstance(body, dict):
                raise ConfigError("tls: expected an object")
            key_pem = body.get("key_pem")
            if isinstance(key_pem, str) and is_sealed(key_pem):
                body = {**body, "key_pem": open_sealed(key_pem, raw, node)}
            return Entry(field, generation, mac, tls=TLSConfig.from_dict(body, "tls"))
        number = field.removeprefix("export:")
        if number == field or not (0 < len(number) <= 20 and _ASCII_DIGITS.issuperset(number)):
            raise ConfigError(f"unknown field {field[:80]!r}")
        export = ExportConfig.from_dict(body, field)
        return Entry(field, generation, mac, export=export, order=int(number))
    except SealError as exc:
        raise SnapshotError(f"tls.key_pem: {exc}") from None
    except ValueError as exc:  # ConfigError is one
        raise SnapshotError(f"invalid entry: {exc}") from None


# -- head ---------------------------------------------------------------------------------------


def set_digest(macs: Iterable[int]) -> int:
    return sum(macs) % DIGEST_MODULUS


def sign_head(head: Head, key: str | bytes) -> str:
    document = {
        "node": head.node,
        "generation": head.generation,
        "previous": head.previous,
        "count": head.count,
        "digest": f"{head.digest:064x}",
        "changed": None if head.changed is None else list(head.changed),
    }
    return _seal(HEAD_FORMAT, _raw_key(key), document)[0]


def verify_head(data: str | bytes, key: str | bytes, *, node: str) -> Head:
    document, _ = _open(HEAD_FORMAT, _raw_key(key), data, MAX_HEAD_BYTES)
    if document.get("node") != node:
        raise SnapshotError(f"head for node {document.get('node')!r}", "other_node")
    count = _generation(document, "count")
    digest = document.get("digest")
    changed = document.get("changed")
    if not isinstance(digest, str) or len(digest) != 64:
        raise SnapshotError("digest must be 64 hex digits")
    try:
        digest_value = int(digest, 16)
    except ValueError:
        raise SnapshotError("digest must be 64 hex digits") from None
    if changed is not None and (
        not isinstance(changed, list) or not all(isinstance(f, str) for f in changed)
    ):
        raise SnapshotError("changed must be a list of fields or null")
    if count > MAX_ENTRIES:
        raise SnapshotError(f"{count} entries is over {MAX_ENTRIES}", "too_large")
    return Head(
        node,
        _generation(document),
        _generation(document, "previous"),
        count,
        digest_value,
        None if changed is None else tuple(changed),
    )


# -- the whole config ----------------------------------------------------------------------------


def assemble(head: Head, entries: Mapping[str, Entry]) -> WorkerConfig:
    """The config that `entries` make under `head`: every entry no newer than the head, as many
    as it counts, and their MACs summing to its digest. Raises SnapshotError."""
    if len(entries) != head.count:
        raise SnapshotError(
            f"{len(entries)} entries, the head counts {head.count} (entries deleted or added)",
            "digest_mismatch",
        )
    if set_digest(e.mac for e in entries.values()) != head.digest:
        raise SnapshotError(
            "the entries do not match the head's digest (an entry removed, replaced by an "
            "older one, or added)",
            "digest_mismatch",
        )
    tls = entries.get(TLS_FIELD)
    if tls is None or tls.tls is None:
        raise SnapshotError("no tls entry")
    exports = []
    names: set[str] = set()
    listed = sorted((e for e in entries.values() if e.export is not None), key=_ORDER)
    if len(listed) != len(entries) - 1:
        raise SnapshotError("an entry that is neither an export nor the TLS section")
    for entry in listed:
        field = entry.field
        if entry.generation > head.generation:
            raise SnapshotError(f"{field}: generation {entry.generation} above the head's")
        export = entry.export
        if export is None:
            raise SnapshotError(f"{field}: not an export entry")
        if export.name in names:
            raise SnapshotError(f"{field}: duplicate export name {export.name[:80]!r}")
        names.add(export.name)
        exports.append(export)
    return WorkerConfig(
        generation=head.generation, node=head.node, exports=tuple(exports), tls=tls.tls
    )
