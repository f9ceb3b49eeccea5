"""Signed config snapshots: the one format web and worker exchange through Redis.

The web side signs (`sign_snapshot`) and the worker verifies (`verify_snapshot`) with this same
code, so the two can never disagree on the canonical form. Standard library and
``cryptography`` only: `exports_app` imports it, and the worker must not depend on anything the
web side brings.

Envelope (the value stored at ``nbdweb:config:<node>``), JSON::

    {"format": "nbdweb-config-v1", "alg": "HMAC-SHA256", "kid": "k1-<8 hex>",
     "payload": "<canonical JSON of WorkerConfig.to_dict(), key sealed>", "sig": "<64 hex>"}

``sig`` is HMAC-SHA256, keyed with the node's key (`nbdworker.contract.nodekey`: derived from
``NBDWEB_CONFIG_SECRET`` for this node alone), over ``format "\\n" kid "\\n" payload``. The
payload travels as a string so the verifier checks the exact bytes that were signed and only
then parses them. ``kid`` names the key (a digest of it, not the key): a worker given another
key, or sent another node's snapshot, says so in its log instead of "forged".

The payload's ``tls.key_pem`` is sealed (AES-GCM under the node's key, the node's name as
associated data: `nbdworker.contract.sealed`) before signing and opened after verifying, so the
server's private key is never in Redis, nor in the worker's cached copy, in the clear.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.sealed import SealError, is_sealed, open_sealed, seal

__all__ = [
    "ALGORITHM",
    "FORMAT",
    "MAX_SNAPSHOT_BYTES",
    "SecretError",
    "SnapshotError",
    "canonical_json",
    "config_channel",
    "config_key",
    "generation_key",
    "heartbeat_key",
    "key_id",
    "kick_channel",
    "kicks_key",
    "load_secret",
    "parse_kick",
    "parse_notice",
    "published_key",
    "sessions_key",
    "sign_snapshot",
    "verify_snapshot",
]

FORMAT = "nbdweb-config-v1"
ALGORITHM = "HMAC-SHA256"
# A snapshot far bigger than any real node's config is refused before it is hashed or parsed.
MAX_SNAPSHOT_BYTES = 64 << 20


class SnapshotError(ValueError):
    """The snapshot is forged, malformed, for another node, or not newer than what runs.

    `kind` says which, for the worker's rejection counter: "bad_signature", "other_node",
    "old_generation" or "malformed".
    """

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


class SecretError(RuntimeError):
    """No usable NBDWEB_CONFIG_SECRET."""


# Redis names shared by both sides (docs/architecture.md). One notice channel of each kind per
# node, so a change to many nodes reaches each worker once, not every worker once per node.


def config_channel(node: str) -> str:
    """The node's config notices, ``<node>:<generation>`` (web → worker)."""
    return f"nbdweb:config-changed:{node}"


def kick_channel(node: str) -> str:
    """The node's kick notices, ``<node>``: drain kicks_key now (web → worker)."""
    return f"nbdweb:session-kick:{node}"


def config_key(node: str) -> str:
    """A node's config as one signed snapshot: what the web side wrote before per-export
    entries (contract/entries.py); a worker still reads it when its node has no head."""
    return f"nbdweb:config:{node}"


def generation_key(node: str) -> str:
    """The node's generation counter (web side)."""
    return f"nbdweb:config-generation:{node}"


def published_key(node: str) -> str:
    """The generation stored at config_key (web side), for the "latest published" status."""
    return f"nbdweb:config-published:{node}"


def heartbeat_key(node: str) -> str:
    """The worker's heartbeat, JSON, with an expiry (worker)."""
    return f"nbdweb:worker:{node}"


def sessions_key(node: str) -> str:
    """Hash session id → JSON of the worker's live sessions, with an expiry (worker)."""
    return f"nbdweb:sessions:{node}"


def kicks_key(node: str) -> str:
    """Set of session ids the web side asked the worker to end."""
    return f"nbdweb:kicks:{node}"


def canonical_json(data: Any) -> str:
    """One spelling for one value: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_id(secret: str | bytes) -> str:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "k1-" + hashlib.sha256(b"nbdweb config key id\0" + raw).hexdigest()[:8]


def _mac(secret: bytes, kid: str, payload: str) -> str:
    message = f"{FORMAT}\n{kid}\n{payload}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _secret_bytes(secret: str | bytes) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if not raw:
        raise SecretError("the config secret is empty")
    return raw


def sign_snapshot(config: WorkerConfig, key: str | bytes) -> str:
    """The envelope (JSON text) carrying `config`, signed (and its private key sealed) with
    `key`: the key of ``config.node`` (`nodekey.derive_node_key`), never the master secret."""
    raw = _secret_bytes(key)
    kid = key_id(raw)
    document = config.to_dict()
    tls = document.get("tls")
    if isinstance(tls, dict) and tls.get("key_pem"):
        tls["key_pem"] = seal(tls["key_pem"], raw, config.node)
    payload = canonical_json(document)
    return canonical_json(
        {
            "format": FORMAT,
            "alg": ALGORITHM,
            "kid": kid,
            "payload": payload,
            "sig": _mac(raw, kid, payload),
        }
    )


def verify_snapshot(
    data: str | bytes,
    key: str | bytes,
    *,
    node: str | None = None,
    after_generation: int | None = None,
) -> WorkerConfig:
    """Check the signature with `key` (this node's key), then parse and validate; raise
    SnapshotError naming the reason.

    `node`: the snapshot must be for this node (a copy of another node's key is refused).
    `after_generation`: the snapshot's generation must be greater (an older or replayed
    snapshot is refused).
    """
    raw_secret = _secret_bytes(key)
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot of {len(data)} bytes is over {MAX_SNAPSHOT_BYTES}")
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(envelope, Mapping):
        raise SnapshotError("not a snapshot envelope (expected an object)")
    if envelope.get("format") != FORMAT:
        raise SnapshotError(f"unknown format {envelope.get('format')!r} (expected {FORMAT})")
    if envelope.get("alg") != ALGORITHM:
        raise SnapshotError(f"unknown algorithm {envelope.get('alg')!r}")
    kid, payload, sig = envelope.get("kid"), envelope.get("payload"), envelope.get("sig")
    if not all(isinstance(v, str) for v in (kid, payload, sig)):
        raise SnapshotError("kid, payload and sig must be strings")
    if kid != key_id(raw_secret):
        raise SnapshotError(
            f"signed with another key (key id {kid}, ours {key_id(raw_secret)})"
            f"{_claimed_node(payload)}",
            "bad_signature",
        )
    if not hmac.compare_digest(sig, _mac(raw_secret, kid, payload)):
        raise SnapshotError("bad signature", "bad_signature")
    try:
        document = json.loads(payload)
    except ValueError as exc:
        raise SnapshotError(f"payload is not JSON: {exc}") from None
    if isinstance(document, dict):
        if node is not None and document.get("node") != node:
            raise SnapshotError(
                f"snapshot is for node {document.get('node')!r}, this is node {node!r}",
                "other_node",
            )
        _open_private_key(document, raw_secret, node)
    try:
        config = WorkerConfig.from_dict(document)
    except ValueError as exc:  # ConfigError is one
        raise SnapshotError(f"invalid config: {exc}") from None
    if after_generation is not None and config.generation <= after_generation:
        raise SnapshotError(
            f"generation {config.generation} is not newer than {after_generation} (applied)",
            "old_generation",
        )
    return config


def _claimed_node(payload: str) -> str:
    """For the log of a snapshot signed with another key: the node its (unverified) payload
    names, which tells another node's snapshot (or this worker given another node's key) from
    a stranger's."""
    try:
        node = json.loads(payload).get("node")
    except (ValueError, AttributeError, RecursionError):
        return ""
    if not isinstance(node, str):
        return ""
    return f"; its unverified payload names node {node[:64]!r}"


def _open_private_key(document: dict[str, Any], secret: bytes, node: str | None) -> None:
    """Replace a sealed ``tls.key_pem`` by the key, opened for this node (`node`, else the
    node the signed payload names). A key in the clear (published before keys were sealed)
    passes as it is."""
    tls = document.get("tls")
    key = tls.get("key_pem") if isinstance(tls, dict) else None
    if not isinstance(key, str) or not is_sealed(key):
        return
    for_node = node if node is not None else document.get("node")
    if not isinstance(for_node, str):
        raise SnapshotError("invalid config: node must be a string")
    try:
        tls["key_pem"] = open_sealed(key, secret, for_node)
    except SealError as exc:
        raise SnapshotError(f"tls.key_pem: {exc}") from None


# A generation is a 64-bit count of milliseconds at most: 20 digits. A longer "number" in a
# notice is noise (and int() of thousands of digits is refused or slow).
MAX_GENERATION_DIGITS = 20
_ASCII_DIGITS = frozenset("0123456789")


def _notice_text(message: str | bytes) -> str | None:
    if isinstance(message, bytes):
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return message if isinstance(message, str) else None


def parse_notice(message: str | bytes) -> tuple[str, int] | None:
    """``<node>:<generation>`` → (node, generation); None when it is not one.

    Anyone who can publish on Redis can send anything here: bytes that are not UTF-8, Unicode
    digits (``"²".isdigit()`` is true, ``int("²")`` raises), signs, spaces, endless numbers.
    Only ASCII digits make a generation.
    """
    text = _notice_text(message)
    if text is None:
        return None
    node, sep, generation = text.rpartition(":")
    if (
        not sep
        or not node
        or not generation
        or len(generation) > MAX_GENERATION_DIGITS
        or not _ASCII_DIGITS.issuperset(generation)
    ):
        return None
    return node, int(generation)


def parse_kick(message: str | bytes) -> str | None:
    """A kick notice is the node's name; None when it is not text (the caller counts it)."""
    text = _notice_text(message)
    return text or None


def load_secret(environ: Mapping[str, str] | None = None) -> str:
    """NBDWEB_CONFIG_SECRET, else ``$NBDWEB_DATA_DIR/config_secret`` (the file the web side
    generates on first run). Raises SecretError naming both places."""
    env = os.environ if environ is None else environ
    # Exactly as nbdweb.datadir reads it: the variable verbatim, the file stripped.
    value = env.get("NBDWEB_CONFIG_SECRET", "")
    if value:
        return value
    path = Path(env.get("NBDWEB_DATA_DIR") or "./var") / "config_secret"
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretError(
            f"no config secret: NBDWEB_CONFIG_SECRET is unset and {path} cannot be read "
            f"({exc.strerror or exc}); run the web side once (it generates the file) or set "
            "NBDWEB_CONFIG_SECRET to the web side's value"
        ) from None
    if not value:
        raise SecretError(f"no config secret: {path} is empty")
    return value
