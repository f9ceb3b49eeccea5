"""nbdworker/contract/sealed.py and its use in snapshots: the server's private key is sealed for
one node with a key derived from the config secret; the envelope holds no PEM private key, the
node's worker opens it, and a key sealed for node A opens neither as node B's nor with another
secret, nor after tampering."""

from __future__ import annotations

import json

import pytest

from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.sealed import SEALED_PREFIX, SealError, open_sealed, seal
from nbdworker.contract.snapshot import (
    SnapshotError,
    _mac,
    canonical_json,
    key_id,
    sign_snapshot,
    verify_snapshot,
)
from tests.support.pki import make_pki, tls_config_dict

SECRET = b"test-secret-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki, node: str = "node-a") -> WorkerConfig:
    return WorkerConfig.from_dict(
        {
            "version": 1,
            "generation": 7,
            "node": node,
            "exports": [{"name": "disk", "backend": "memory", "size": 1 << 20}],
            "tls": tls_config_dict(pki, "FORCEDTLS", revoked=()),
        }
    )


def test_envelope_holds_no_pem_private_key_and_the_worker_opens_it(pki) -> None:
    config = tls_config(pki)
    envelope = sign_snapshot(config, SECRET)
    assert "PRIVATE KEY" not in envelope
    assert pki.server.key_pem.split("\n")[1] not in envelope  # not even a line of its base64
    payload = json.loads(json.loads(envelope)["payload"])
    assert payload["tls"]["key_pem"].startswith(SEALED_PREFIX)
    opened = verify_snapshot(envelope, SECRET, node="node-a")
    assert opened.tls.key_pem == pki.server.key_pem
    assert opened == config


def test_a_key_sealed_for_node_a_does_not_open_as_node_b(pki) -> None:
    sealed = seal(pki.server.key_pem, SECRET, "node-a")
    assert open_sealed(sealed, SECRET, "node-a") == pki.server.key_pem
    with pytest.raises(SealError, match="node-b"):
        open_sealed(sealed, SECRET, "node-b")


def test_node_a_snapshot_refused_by_node_b_even_with_its_name_rewritten(pki) -> None:
    """The whole envelope copied to node B's key is refused by name; a payload re-signed as
    node B's (by someone holding the secret) around A's sealed key fails to open it."""
    envelope = sign_snapshot(tls_config(pki, "node-a"), SECRET)
    with pytest.raises(SnapshotError, match="for node 'node-a'"):
        verify_snapshot(envelope, SECRET, node="node-b")
    payload = json.loads(json.loads(envelope)["payload"])
    payload["node"] = "node-b"
    text = canonical_json(payload)
    kid = key_id(SECRET)
    forged = canonical_json(
        {**json.loads(envelope), "payload": text, "sig": _mac(SECRET, kid, text)}
    )
    with pytest.raises(SnapshotError, match="does not open for node 'node-b'"):
        verify_snapshot(forged, SECRET, node="node-b")


def test_a_sealed_key_does_not_open_with_another_secret(pki) -> None:
    sealed = seal(pki.server.key_pem, SECRET, "node-a")
    with pytest.raises(SealError):
        open_sealed(sealed, b"another-secret", "node-a")


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s[:-4] + ("AAAA" if not s.endswith("AAAA") else "BBBB"),
        lambda s: s[: len(SEALED_PREFIX) + 10],
        lambda s: SEALED_PREFIX + "not base64!",
        lambda s: s.replace(SEALED_PREFIX, "nbdweb-sealed-v9:"),
    ],
    ids=["flipped tag", "truncated", "not base64", "unknown scheme"],
)
def test_damaged_sealed_values_are_refused(pki, damage) -> None:
    with pytest.raises(SealError):
        open_sealed(damage(seal(pki.server.key_pem, SECRET, "node-a")), SECRET, "node-a")


def test_every_seal_uses_a_fresh_nonce(pki) -> None:
    assert seal("k", SECRET, "n") != seal("k", SECRET, "n")


def test_a_key_in_the_clear_from_before_sealing_is_still_accepted(pki) -> None:
    """A snapshot published (or cached by the worker) before keys were sealed keeps working."""
    config = tls_config(pki)
    text = canonical_json(config.to_dict())
    kid = key_id(SECRET)
    envelope = canonical_json(
        {
            "format": "nbdweb-config-v1",
            "alg": "HMAC-SHA256",
            "kid": kid,
            "payload": text,
            "sig": _mac(SECRET, kid, text),
        }
    )
    assert verify_snapshot(envelope, SECRET, node="node-a") == config
