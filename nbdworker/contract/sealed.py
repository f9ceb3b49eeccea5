"""The server's private key inside a config snapshot, sealed for the node's worker.

A snapshot sits in Redis (and in its snapshots on disk, and in the worker's cache): anyone who
can read Redis could otherwise take the node's TLS key. The web side seals the key with AES-GCM
under a key derived (HKDF-SHA256) from the node's key (`nbdworker.contract.nodekey`), which only
the web side and that node's worker hold; the node's name is the associated data too, so a key
sealed for node A opens neither with node B's key nor as node B's. Used by
`snapshot.sign_snapshot` / `snapshot.verify_snapshot` only.

Sealed form: ``"nbdweb-sealed-v1:" + base64(12-byte nonce + ciphertext and tag)``.
"""

from __future__ import annotations

import base64
import binascii
import os
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SEALED_PREFIX", "SealError", "is_sealed", "open_sealed", "seal"]

SEALED_PREFIX = "nbdweb-sealed-v1:"
_NONCE_BYTES = 12
# HKDF's info keeps this key apart from the HMAC key the same secret signs snapshots with.
_HKDF_INFO = b"nbdweb snapshot private key v1"


class SealError(ValueError):
    """The sealed value is malformed, was sealed with another secret, or for another node."""


@lru_cache(maxsize=8)
def _aead(secret: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
    return AESGCM(key)


def _associated_data(node: str) -> bytes:
    return b"nbdweb snapshot key for node\0" + node.encode("utf-8")


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def seal(plaintext: str, secret: bytes, node: str) -> str:
    """`plaintext` (a PEM private key) sealed for `node`'s worker; a fresh nonce each time."""
    nonce = os.urandom(_NONCE_BYTES)
    sealed = _aead(secret).encrypt(nonce, plaintext.encode("utf-8"), _associated_data(node))
    return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")


def open_sealed(value: str, secret: bytes, node: str) -> str:
    """The plaintext of a value `seal` made for `node` with `secret`; SealError otherwise."""
    if not is_sealed(value):
        raise SealError("not a sealed value")
    try:
        raw = base64.b64decode(value[len(SEALED_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise SealError("sealed value is not base64") from None
    if len(raw) <= _NONCE_BYTES + 16:
        raise SealError("sealed value is too short")
    try:
        nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        plain = _aead(secret).decrypt(nonce, sealed, _associated_data(node))
    except InvalidTag:
        raise SealError(
            f"sealed private key does not open for node {node!r} "
            "(sealed for another node, or with another secret)"
        ) from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise SealError("sealed private key is not text") from None
