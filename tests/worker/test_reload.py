"""A new config ends exactly the live connections it withdraws (nbdworker/reload.py), and no
other: real connections, plaintext and TLS, against an in-process server whose config is
swapped with `apply_config`, as nbdworker/configsource.py does."""

from __future__ import annotations

import copy
import os
import ssl
from collections.abc import Callable

import pytest

from nbdworker.protocol import Reply
from tests.support.inprocess import serving
from tests.support.pki import PKI, make_pki
from tests.support.tlsprobe import Probe, client_context, worker_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def connect(
    port: int,
    export: str,
    pki: PKI | None = None,
    client: str | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> Probe:
    """A client in transmission on `export`, over TLS as `client` when `pki` is given."""
    p = Probe(port)
    if pki is not None:
        p.starttls(client_context(pki, client, maximum))
    assert p.info(export, go=True)[-1].reply == Reply.ACK
    return p


def serves(p: Probe) -> bool:
    return p.read(0, 512)[1] == 0


def export(cfg: dict, name: str) -> dict:
    return next(e for e in cfg["exports"] if e["name"] == name)


def changed(cfg: dict, change: Callable[[dict], None]) -> dict:
    new = copy.deepcopy(cfg)
    new["generation"] = cfg["generation"] + 1
    change(new)
    return new


# Each case: (mode, change to the config, (export, TLS client or None) that must end, the
# connection that must carry on).
CASES = {
    "export removed": (
        "SELECTIVETLS",
        lambda c: c["exports"].remove(export(c, "plain")),
        ("plain", None),
        ("alice-only", "alice"),
    ),
    "export disabled": (
        "SELECTIVETLS",
        lambda c: export(c, "plain").update(enabled=False),
        ("plain", "bob"),
        ("alice-only", "alice"),
    ),
    "tls now required on the export": (
        "SELECTIVETLS",
        lambda c: export(c, "plain").update(tls_required=True),
        ("plain", None),
        ("plain", "bob"),
    ),
    # The unchanged "secret" keeps its open backend across generations; the new mode alone must
    # withdraw it, from TLS clients too (OPTIONALTLS cannot hold it to TLS: it is refused).
    "mode now OPTIONALTLS with a TLS-only export": (
        "SELECTIVETLS",
        lambda c: c["tls"].update(mode="OPTIONALTLS"),
        ("secret", "alice"),
        ("plain", None),
    ),
    "tls now required on the export under OPTIONALTLS": (
        "OPTIONALTLS",
        lambda c: export(c, "plain").update(tls_required=True),
        ("plain", "alice"),
        ("alice-only", "alice"),
    ),
    "mode now FORCEDTLS": (
        "SELECTIVETLS",
        lambda c: c["tls"].update(mode="FORCEDTLS"),
        ("plain", None),
        ("plain", "alice"),
    ),
    "certificate revoked": (
        "FORCEDTLS",
        lambda c: c["tls"]["revoked_serials"].append(_serials["alice"]),
        ("plain", "alice"),
        ("plain", "bob"),
    ),
    "client no longer allowed": (
        "FORCEDTLS",
        lambda c: export(c, "alice-only").update(allowed_clients=[{"common_name": "carol"}]),
        ("alice-only", "alice"),
        ("plain", "alice"),
    ),
    "network no longer allowed": (
        "SELECTIVETLS",
        lambda c: export(c, "plain").update(allowed_networks=["10.0.0.0/8"]),
        ("plain", None),
        ("alice-only", "alice"),
    ),
    "issuing CA no longer trusted": (
        "SELECTIVETLS",
        lambda c: c["tls"].update(ca_pem=_cas["other_ca"]),
        ("plain", "alice"),
        ("plain", "anonymous TLS"),
    ),
    "export became read-only": (
        "SELECTIVETLS",
        lambda c: export(c, "plain").update(read_only=True),
        ("plain", None),
        ("alice-only", "alice"),
    ),
}
_serials: dict[str, str] = {}
_cas: dict[str, str] = {}


def _remember(pki: PKI) -> None:
    _serials.update({name: cred.serial_hex for name, cred in pki.clients.items()})
    _cas.update(ca=pki.ca.cert_pem, other_ca=pki.other_ca.cert_pem)


def tls_client(client: str | None) -> tuple[bool, str | None]:
    """(over TLS?, client certificate name) for a CASES entry."""
    if client == "anonymous TLS":
        return True, None
    return client is not None, client


@pytest.mark.parametrize("case", list(CASES))
def test_a_tightening_ends_the_affected_connection_only(case: str, pki: PKI, tmp_path) -> None:
    _remember(pki)
    mode, change, (end_export, end_client), (keep_export, keep_client) = CASES[case]
    config = worker_config(pki, mode, generation=1, client_verification="optional")
    with serving(config, tmp_path) as s:
        end_tls, end_client = tls_client(end_client)
        keep_tls, keep_client = tls_client(keep_client)
        doomed = connect(s.port, end_export, pki if end_tls else None, end_client)
        kept = connect(s.port, keep_export, pki if keep_tls else None, keep_client)
        assert serves(doomed) and serves(kept)
        s.apply(changed(config, change))
        assert doomed.closed(), f"{case}: the affected connection was not ended"
        assert serves(kept), f"{case}: an unaffected connection was disturbed"
        doomed.close()
        kept.close()


HARMLESS = {
    "description": lambda c: export(c, "plain").update(description="new words"),
    "block sizes": lambda c: export(c, "plain").update(preferred_block_size=65536),
    "another export added": lambda c: c["exports"].append(
        {"name": "extra", "backend": "memory", "size": 1 << 20}
    ),
    "network rule that still admits": lambda c: export(c, "plain").update(
        allowed_networks=["127.0.0.0/8"]
    ),
    "another serial revoked": lambda c: c["tls"]["revoked_serials"].append(_serials["carol"]),
    "another CA trusted": lambda c: c["tls"].update(ca_pem=_cas["ca"] + _cas["other_ca"]),
    "trusted CAs reordered": lambda c: c["tls"].update(ca_pem=_cas["other_ca"] + _cas["ca"]),
}


@pytest.mark.parametrize("case", list(HARMLESS))
def test_other_changes_leave_live_connections_alone(case: str, pki: PKI, tmp_path) -> None:
    _remember(pki)
    config = worker_config(pki, "SELECTIVETLS", generation=1, client_verification="optional")
    with serving(config, tmp_path) as s:
        plain = connect(s.port, "plain")
        tls = connect(s.port, "plain", pki, "alice")
        s.apply(changed(config, HARMLESS[case]))
        assert serves(plain) and serves(tls)
        plain.close()
        tls.close()


def test_requiring_tls_13_ends_tls_12_connections_only(pki: PKI, tmp_path) -> None:
    config = worker_config(pki, "FORCEDTLS", generation=1, client_verification="optional")
    with serving(config, tmp_path) as s:
        old = connect(s.port, "plain", pki, "alice", maximum=ssl.TLSVersion.TLSv1_2)
        new = connect(s.port, "plain", pki, "bob")
        s.apply(changed(config, lambda c: c["tls"].update(min_version="1.3")))
        assert old.closed()
        assert serves(new)
        old.close()
        new.close()


def test_a_shrunk_image_ends_its_connections_a_grown_one_does_not(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("shrinks", "grows"):
        (images / f"{name}.img").write_bytes(b"\1" * (1 << 20))
    config = {
        "version": 1,
        "generation": 1,
        "exports": [
            {"name": n, "backend": "file", "path": str(images / f"{n}.img")}
            for n in ("shrinks", "grows")
        ],
    }
    with serving(config, images) as s:
        shrinks = connect(s.port, "shrinks")
        grows = connect(s.port, "grows")
        os.truncate(images / "shrinks.img", 512 * 1024)
        os.truncate(images / "grows.img", 2 << 20)
        s.apply(changed(config, lambda c: None))
        assert shrinks.closed()
        assert serves(grows)
        shrinks.close()
        grows.close()
