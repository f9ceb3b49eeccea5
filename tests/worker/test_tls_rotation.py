"""A new TLS policy (certificate, revocations) reaches new connections without a restart, and
connections already up keep the one they were accepted with.

The server runs in-process (real listener, real TLS, on its own event loop thread) and the test
applies a new configuration generation with `NBDServer.apply_config`, the call any reload path
ends in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nbdworker.protocol import Option, Reply
from tests.support.pki import PKI, make_pki
from tests.support.tlsprobe import Probe, client_context, serve_in_process, worker_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_cert(p: Probe) -> bytes:
    return p.sock.getpeercert(binary_form=True)


def test_changed_certificate_applies_to_new_connections(pki: PKI, tmp_path: Path) -> None:
    with (
        serve_in_process(worker_config(pki, "FORCEDTLS"), tmp_path) as srv,
        Probe(srv.port) as before,
    ):
        before.starttls(client_context(pki, "alice"))
        assert server_cert(before) == pki.server.der

        rotated = pki.issue_server("rotated")
        srv.apply(worker_config(pki, "FORCEDTLS", generation=2, server=rotated))

        with Probe(srv.port) as after:
            after.starttls(client_context(pki, "alice"))
            assert server_cert(after) == rotated.der
            assert after.info("plain")[-1].reply == Reply.ACK
        # The connection accepted before the change still works, on its own session.
        assert before.info("plain")[-1].reply == Reply.ACK


def test_connection_accepted_before_a_change_upgrades_with_its_own_policy(
    pki: PKI, tmp_path: Path
) -> None:
    with (
        serve_in_process(worker_config(pki, "FORCEDTLS"), tmp_path) as srv,
        Probe(srv.port) as early,
    ):
        # Accepted, but STARTTLS only after the new generation is in place.
        rotated = pki.issue_server("rotated-2")
        srv.apply(worker_config(pki, "FORCEDTLS", generation=2, server=rotated))
        early.starttls(client_context(pki, "alice"))
        assert server_cert(early) == pki.server.der


def test_added_revocation_refuses_new_connections_only(pki: PKI, tmp_path: Path) -> None:
    with (
        serve_in_process(worker_config(pki, "FORCEDTLS"), tmp_path) as srv,
        Probe(srv.port) as before,
    ):
        before.starttls(client_context(pki, "bob"))
        srv.apply(worker_config(pki, "FORCEDTLS", generation=2, revoked=("revoked", "bob")))
        with Probe(srv.port) as after:
            after.starttls(client_context(pki, "bob"))
            after.send(b"IHAVEOPT" + int(Option.LIST).to_bytes(4, "big") + bytes(4))
            assert after.closed()
        assert before.info("plain")[-1].reply == Reply.ACK
        with Probe(srv.port) as alice:
            alice.starttls(client_context(pki, "alice"))
            assert alice.info("plain")[-1].reply == Reply.ACK


def test_unusable_policy_never_falls_back_to_plaintext(
    pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = worker_config(pki, "FORCEDTLS", generation=2)
    broken["tls"]["key_pem"] = pki.clients["alice"].key_pem  # does not match the certificate
    with serve_in_process(worker_config(pki, "FORCEDTLS"), tmp_path) as srv:
        with caplog.at_level(logging.ERROR, logger="nbdworker"):
            srv.apply(broken)
        assert any("TLS policy unusable" in r.getMessage() for r in caplog.records)
        with Probe(srv.port) as p:
            # Still TLS-only before the upgrade ...
            assert p.info("plain")[-1].reply == Reply.ERR_TLS_REQD
            # ... and the upgrade cannot happen: the connection ends after the ACK.
            (ack,) = p.option(Option.STARTTLS)
            assert ack.reply == Reply.ACK
            assert p.closed()
        # A fixed policy is picked up again.
        srv.apply(worker_config(pki, "FORCEDTLS", generation=3))
        with Probe(srv.port) as p:
            p.starttls(client_context(pki, "alice"))
            assert p.info("plain")[-1].reply == Reply.ACK
