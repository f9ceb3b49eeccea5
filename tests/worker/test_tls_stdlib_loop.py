"""The TLS upgrade on the standard-library asyncio loop.

The worker runs on uvloop when it is installed (it is a runtime requirement), and falls back to
asyncio's own loop, whose TLS layer is a different implementation (``asyncio.sslproto``) with
different timing: it hands the client's first options to the connection before the upgrade
coroutine has resumed. These tests run the server in-process on that loop.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nbdworker.protocol import Option, Reply
from tests.support.nbdclient import decode_option_replies, encode_info_request, encode_option
from tests.support.pki import PKI, make_pki
from tests.support.tlsprobe import (
    PipelinedTLS,
    Probe,
    client_context,
    serve_in_process,
    worker_config,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("mode", ["OPTIONALTLS", "FORCEDTLS", "SELECTIVETLS"])
def test_upgrade_then_read(pki: PKI, tmp_path: Path, mode: str) -> None:
    with serve_in_process(worker_config(pki, mode), tmp_path) as srv, Probe(srv.port) as p:
        p.starttls(client_context(pki, "alice"))
        # OPTIONALTLS refuses the tls_required "secret" (tests/worker/test_tls_modes.py).
        export = "plain" if mode == "OPTIONALTLS" else "secret"
        assert p.info(export, go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("simple", 0)
        p.disconnect()


def test_option_sent_with_the_finished_message_is_answered(pki: PKI, tmp_path: Path) -> None:
    cfg = worker_config(pki, "FORCEDTLS")
    with serve_in_process(cfg, tmp_path) as srv, Probe(srv.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        info = encode_info_request(Option.INFO, "plain")
        tls = PipelinedTLS(p, client_context(pki, "alice"), info + info)
        for _ in range(2):
            header = tls.recv_exact(20)
            _magic, option, reply, length = struct.unpack(">QIII", header)
            assert (option, reply) == (Option.INFO, Reply.INFO)
            tls.recv_exact(length)
            assert struct.unpack(">QIII", tls.recv_exact(20))[2] == Reply.ACK


def test_revoked_client_pipelining_an_option_gets_no_answer(pki: PKI, tmp_path: Path) -> None:
    cfg = worker_config(pki, "FORCEDTLS")
    with serve_in_process(cfg, tmp_path) as srv, Probe(srv.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        tls = PipelinedTLS(
            p, client_context(pki, "revoked"), encode_info_request(Option.INFO, "plain")
        )
        with pytest.raises((EOFError, ConnectionResetError)):
            tls.recv_exact(20)


def test_plaintext_pipelined_behind_starttls_is_never_answered(pki: PKI, tmp_path: Path) -> None:
    cfg = worker_config(pki, "SELECTIVETLS")
    with serve_in_process(cfg, tmp_path) as srv, Probe(srv.port) as p:
        p.send(encode_option(Option.STARTTLS) + encode_option(Option.STRUCTURED_REPLY))
        data = b""
        while chunk := p.sock.recv(4096):
            data += chunk
        replies, used = decode_option_replies(data)
        assert used == len(data)
        assert all(r.option == Option.STARTTLS for r in replies)


def test_garbage_instead_of_client_hello_closes(pki: PKI, tmp_path: Path) -> None:
    cfg = worker_config(pki, "FORCEDTLS")
    with serve_in_process(cfg, tmp_path) as srv:
        with Probe(srv.port) as p:
            assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
            p.send(bytes(range(256)) * 4)
            assert p.closed()
        with Probe(srv.port) as p:
            p.starttls(client_context(pki, "alice"))
            assert p.info("plain")[-1].reply == Reply.ACK
