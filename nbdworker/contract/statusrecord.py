"""The worker's status records in Redis (heartbeat, sessions), signed with its node's key.

The web side signs what only it writes and reads back (the event stream, the observer's state)
the same way, with a key of its own (`exports_app.services.nodekeys.web_key`).

Anyone who can write to Redis could otherwise invent sessions (and with them ``session.opened``
events and webhook deliveries) or keep a dead node "online". The worker signs each record it
writes (`sign_record`) and the web side keeps only records whose signature verifies
(`open_record`), with the same node key it derives from the master secret
(`nodekey.derive_node_key`). A record is the JSON object itself plus a ``"sig"`` member:
HMAC-SHA256, under a key derived from the node key for this purpose alone, over
``format "\\n" node "\\n" kind "\\n" canonical JSON of the object without "sig"`` — so a record
of one node or kind does not pass for another's, and a web side that predates signing still
reads the object.

What signing cannot stop: a Redis writer may delete records, or put back a record the worker
wrote a little earlier (a session that has since ended); it cannot make up a new one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nbdworker.contract.snapshot import canonical_json

__all__ = [
    "HEARTBEAT",
    "MAX_RECORD_BYTES",
    "SESSION",
    "RecordRefused",
    "open_record",
    "sign_record",
]

STATUS_FORMAT = "nbdweb-status-v1"
HEARTBEAT = "heartbeat"
SESSION = "session"
# Far above any real record (a session with a client certificate's names is under 2 KiB, a
# heartbeat with a few storage roots under 4 KiB): a bigger one is refused unread.
MAX_RECORD_BYTES = 64 << 10
_SIG = "sig"


class RecordRefused(ValueError):
    """Not a record the node's worker wrote: `reason` is "too_large", "malformed" or
    "bad_signature" (the web side's counter label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@lru_cache(maxsize=256)
def _record_key(node_key: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"nbdweb status records v1"
    ).derive(node_key.encode("ascii"))


def _mac(node_key: str, node: str, kind: str, body: dict[str, Any]) -> str:
    message = f"{STATUS_FORMAT}\n{node}\n{kind}\n{canonical_json(body)}".encode()
    return hmac.new(_record_key(node_key), message, hashlib.sha256).hexdigest()


def sign_record(node_key: str, node: str, kind: str, body: dict[str, Any]) -> str:
    """`body` (a JSON object without "sig") as the JSON text the worker stores, signed."""
    return canonical_json({**body, _SIG: _mac(node_key, node, kind, body)})


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"{text} is out of range")
    return value


def open_record(
    node_key: str,
    node: str,
    kind: str,
    raw: str | bytes | None,
    max_bytes: int = MAX_RECORD_BYTES,
) -> dict[str, Any]:
    """The object of a record `node`'s worker signed; RecordRefused otherwise."""
    if raw is None:
        raise RecordRefused("malformed", "no record")
    if len(raw) > max_bytes:
        raise RecordRefused("too_large", f"record of {len(raw)} bytes is over {max_bytes}")
    try:
        # NaN and Infinity are no JSON: read, they would make every answer that shows the
        # record fail (strict JSON out). A worker signs them only if something is wrong with it.
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RecordRefused("malformed", "not JSON") from None
    if not isinstance(body, dict):
        raise RecordRefused("malformed", "not a JSON object")
    sig = body.pop(_SIG, None)
    if not isinstance(sig, str):
        raise RecordRefused("bad_signature", "not signed")
    if not hmac.compare_digest(sig, _mac(node_key, node, kind, body)):
        raise RecordRefused("bad_signature", "bad signature")
    return body
