"""Raw-socket probes of the worker's TLS behaviour, cell by cell.

The table below is /work/shared/nbd-protocol.md section 4.3 (option x mode x before/after TLS),
as this worker answers it. Every cell runs against a real worker subprocess; "after" cells first
complete STARTTLS and a real TLS handshake (Python's ssl on the raw socket), as client "alice".
Each probe is followed by a check that a fresh client is still served.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdworker.protocol import ClientFlag, Command, Errno, Option, Reply
from tests.support.nbdclient import (
    decode_option_replies,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    encode_request,
    parse_server,
)
from tests.support.pki import PKI, make_pki
from tests.support.tlsprobe import (
    MODES,
    PipelinedTLS,
    Probe,
    client_context,
    wait_for_line,
    worker_config,
)
from tests.support.worker import RunningWorker, run_worker

TLS_MODES = [m for m in MODES if m != "NOTLS"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def workers(
    pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningWorker]]:
    """One worker per mode, for the whole module (client verification: required)."""
    base = tmp_path_factory.mktemp("workers")
    with contextlib.ExitStack() as stack:
        yield {
            mode: stack.enter_context(
                run_worker(worker_config(pki, mode), workdir=base / mode, log_level="DEBUG")
            )
            for mode in MODES
        }


def assert_still_serving(worker: RunningWorker, pki: PKI, mode: str) -> None:
    """A fresh, well-behaved client gets INFO for "plain" (after STARTTLS where TLS is on)."""
    with Probe(worker.port) as p:
        if mode != "NOTLS":
            p.starttls(client_context(pki, "alice"))
        replies = p.info("plain")
        assert replies[-1].reply == Reply.ACK, replies


def me(p: Probe) -> str:
    """How the worker's log names this client's connection."""
    return f"127.0.0.1:{p.sock.getsockname()[1]}:"


# -- outcomes -------------------------------------------------------------------------------------


def reply_name(replies) -> str:
    last = replies[-1].reply
    if not isinstance(last, Reply):
        return str(last)
    return _SHORT.get(last, last.name.removeprefix("ERR_").lower())


_SHORT = {Reply.ERR_INVALID: "inval", Reply.ERR_TLS_REQD: "tlsreq"}


def opened(p: Probe, export_name_reply: bool) -> str:
    """After GO / EXPORT_NAME: "open" if a READ is served, "drop" if the server hung up."""
    try:
        if export_name_reply:
            no_zeroes = bool(p.flags & ClientFlag.C_NO_ZEROES)
            p.recv_exact(10 if no_zeroes else 134)
        _kind, error, _data = p.read()
    except (EOFError, ConnectionResetError, ssl.SSLError):
        return "drop"
    p.disconnect()
    return "open" if error == 0 else f"read error {error}"


def do_starttls(p: Probe) -> str:
    replies = p.option(Option.STARTTLS)
    if replies[-1].reply == Reply.ACK:
        assert p.tls_context is not None
        p.sock = p.tls_context.wrap_socket(p.sock, server_hostname="localhost")
        return "ack"
    return reply_name(replies)


def do_starttls_data(p: Probe) -> str:
    return reply_name(p.option(Option.STARTTLS, b"data"))


def do_abort(p: Probe) -> str:
    replies = p.option(Option.ABORT)
    return f"{reply_name(replies)}+x" if p.closed() else reply_name(replies)


def do_export_name(name: str) -> Callable[[Probe], str]:
    def run(p: Probe) -> str:
        p.send(encode_option(Option.EXPORT_NAME, name.encode()))
        return opened(p, export_name_reply=True)

    return run


def do_list(p: Probe) -> str:
    replies = p.option(Option.LIST)
    if replies[-1].reply != Reply.ACK:
        return reply_name(replies)
    names = {parse_server(r.data)[0] for r in replies if r.reply == Reply.SERVER}
    return {
        frozenset(): "L:",
        frozenset({"plain"}): "L:p",
        frozenset({"plain", "secret"}): "L:ps",
    }.get(frozenset(names & {"plain", "secret"}), f"L:{sorted(names)}")


def do_info(name: str, go: bool = False) -> Callable[[Probe], str]:
    def run(p: Probe) -> str:
        replies = p.info(name, go=go)
        if replies[-1].reply != Reply.ACK:
            # A gated answer carries no INFO before it.
            assert len(replies) == 1, replies
            return reply_name(replies)
        assert any(r.reply == Reply.INFO for r in replies)
        return opened(p, export_name_reply=False) if go else "ack"

    return run


def do_structured(p: Probe) -> str:
    return reply_name(p.option(Option.STRUCTURED_REPLY))


def do_extended_headers(p: Probe) -> str:
    return reply_name(p.option(Option.EXTENDED_HEADERS))


def do_meta(code: int, name: str) -> Callable[[Probe], str]:
    def run(p: Probe) -> str:
        p.option(Option.STRUCTURED_REPLY)  # SET needs it; gated like everything in FORCEDTLS
        p.send(encode_meta_context_request(code, name, ["base:allocation"]))
        replies = p.replies()
        if replies[-1].reply != Reply.ACK:
            return reply_name(replies)
        assert [r.reply for r in replies] == [Reply.META_CONTEXT, Reply.ACK], replies
        return "ack"

    return run


def do_unknown(p: Probe) -> str:
    return reply_name(p.option(99, b"xyz"))


def do_malformed(p: Probe) -> str:
    # INFO whose name length runs past the option.
    return reply_name(p.option(Option.INFO, struct.pack(">I", 50) + b"ab"))


CASES: dict[str, Callable[[Probe], str]] = {
    "STARTTLS": do_starttls,
    "STARTTLS with data": do_starttls_data,
    "ABORT": do_abort,
    "EXPORT_NAME": do_export_name("plain"),
    "EXPORT_NAME tls-only": do_export_name("secret"),
    "LIST": do_list,
    "INFO": do_info("plain"),
    "INFO tls-only": do_info("secret"),
    "INFO unknown export": do_info("nope"),
    "GO": do_info("plain", go=True),
    "GO tls-only": do_info("secret", go=True),
    "STRUCTURED_REPLY": do_structured,
    "EXTENDED_HEADERS": do_extended_headers,
    "LIST_META_CONTEXT": do_meta(Option.LIST_META_CONTEXT, "plain"),
    "LIST_META_CONTEXT tls-only": do_meta(Option.LIST_META_CONTEXT, "secret"),
    "SET_META_CONTEXT": do_meta(Option.SET_META_CONTEXT, "plain"),
    "SET_META_CONTEXT tls-only": do_meta(Option.SET_META_CONTEXT, "secret"),
    "unknown option": do_unknown,
    "malformed option": do_malformed,
}

# Section 4.3 as this worker answers it. Columns: NOTLS, then before/after TLS for OPTIONALTLS,
# FORCEDTLS and SELECTIVETLS. Cells: ack, inval(id), policy, tlsreq(d), unknown, unsup = the option
# reply; "ack+x" = ACK then close; "open" = the export is served (a READ works); "drop" = hard
# disconnect; "L:p" / "L:ps" = LIST shows "plain" / "plain" and the TLS-only "secret";
# "-" = impossible (NOTLS has no TLS-only export, and no "after"). OPTIONALTLS has no TLS-only
# exports either: its worker is given "secret" with tls_required all the same and refuses to serve
# it at all, before and after TLS, rather than serve it in plaintext.
TABLE_TEXT = """
case                       | NOTLS   | OPT:pre | OPT:tls | FOR:pre | FOR:tls | SEL:pre | SEL:tls
STARTTLS                   | policy  | ack     | inval   | ack     | inval   | ack     | inval
STARTTLS with data         | inval   | inval   | inval   | inval   | inval   | inval   | inval
ABORT                      | ack+x   | ack+x   | ack+x   | ack+x   | ack+x   | ack+x   | ack+x
EXPORT_NAME                | open    | open    | open    | drop    | open    | open    | open
EXPORT_NAME tls-only       | -       | drop    | drop    | drop    | open    | drop    | open
LIST                       | L:p     | L:p     | L:p     | tlsreq  | L:ps    | L:p     | L:ps
INFO                       | ack     | ack     | ack     | tlsreq  | ack     | ack     | ack
INFO tls-only              | -       | unknown | unknown | tlsreq  | ack     | tlsreq  | ack
INFO unknown export        | unknown | unknown | unknown | tlsreq  | unknown | unknown | unknown
GO                         | open    | open    | open    | tlsreq  | open    | open    | open
GO tls-only                | -       | unknown | unknown | tlsreq  | open    | tlsreq  | open
STRUCTURED_REPLY           | ack     | ack     | ack     | tlsreq  | ack     | ack     | ack
EXTENDED_HEADERS           | unsup   | unsup   | unsup   | tlsreq  | unsup   | unsup   | unsup
LIST_META_CONTEXT          | ack     | ack     | ack     | tlsreq  | ack     | ack     | ack
LIST_META_CONTEXT tls-only | -       | unknown | unknown | tlsreq  | ack     | unknown | ack
SET_META_CONTEXT           | ack     | ack     | ack     | tlsreq  | ack     | ack     | ack
SET_META_CONTEXT tls-only  | -       | unknown | unknown | tlsreq  | ack     | unknown | ack
unknown option             | unsup   | unsup   | unsup   | tlsreq  | unsup   | unsup   | unsup
malformed option           | inval   | inval   | inval   | tlsreq  | inval   | inval   | inval
"""
TABLE: dict[str, list[str]] = {
    cells[0]: cells[1:]
    for line in TABLE_TEXT.strip().splitlines()[1:]
    for cells in [[c.strip() for c in line.split("|")]]
}

COLUMNS = [
    ("NOTLS", False),
    ("OPTIONALTLS", False),
    ("OPTIONALTLS", True),
    ("FORCEDTLS", False),
    ("FORCEDTLS", True),
    ("SELECTIVETLS", False),
    ("SELECTIVETLS", True),
]


def _cells():
    for case, row in TABLE.items():
        for (mode, after), expected in zip(COLUMNS, row, strict=True):
            if expected == "-":
                continue
            when = "after" if after else "before"
            yield pytest.param(case, mode, after, expected, id=f"{case}-{mode}-{when}")


def test_table_covers_every_case() -> None:
    assert set(TABLE) == set(CASES)


@pytest.mark.parametrize(("case", "mode", "after", "expected"), list(_cells()))
def test_tls_table_cell(
    workers: dict[str, RunningWorker], pki: PKI, case: str, mode: str, after: bool, expected: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        p.tls_context = client_context(pki, "alice")
        if after:
            p.starttls(client_context(pki, "alice"))
        assert CASES[case](p) == expected
    assert_still_serving(worker, pki, mode)


# Client without NBD_FLAG_C_FIXED_NEWSTYLE: TLS is impossible, only EXPORT_NAME exists.
@pytest.mark.parametrize(
    ("mode", "export", "expected"),
    [
        ("NOTLS", "plain", "open"),
        ("OPTIONALTLS", "plain", "open"),
        ("OPTIONALTLS", "secret", "drop"),
        ("FORCEDTLS", "plain", "drop"),
        ("SELECTIVETLS", "plain", "open"),
        ("SELECTIVETLS", "secret", "drop"),
    ],
)
def test_tls_table_client_without_fixed_newstyle(
    workers: dict[str, RunningWorker], pki: PKI, mode: str, export: str, expected: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port, flags=0) as p:
        assert do_export_name(export)(p) == expected
    assert_still_serving(worker, pki, mode)


# -- state forgotten at STARTTLS ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["OPTIONALTLS", "SELECTIVETLS"])
def test_structured_reply_before_starttls_is_forgotten(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    with Probe(workers[mode].port) as p:
        assert p.option(Option.STRUCTURED_REPLY)[-1].reply == Reply.ACK
        p.starttls(client_context(pki))
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        kind, error, _ = p.read()
        assert (kind, error) == ("simple", 0)
        p.disconnect()


@pytest.mark.parametrize("mode", ["OPTIONALTLS", "SELECTIVETLS"])
def test_structured_reply_can_be_negotiated_again_after_starttls(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    with Probe(workers[mode].port) as p:
        assert p.option(Option.STRUCTURED_REPLY)[-1].reply == Reply.ACK
        p.starttls(client_context(pki))
        # Not "already negotiated": the pre-TLS negotiation no longer exists.
        assert p.option(Option.STRUCTURED_REPLY)[-1].reply == Reply.ACK
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("structured", 0)
        p.disconnect()


@pytest.mark.parametrize("mode", ["OPTIONALTLS", "SELECTIVETLS"])
def test_meta_context_set_before_starttls_is_forgotten(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    with Probe(workers[mode].port) as p:
        p.option(Option.STRUCTURED_REPLY)
        p.send(encode_meta_context_request(Option.SET_META_CONTEXT, "plain", ["base:allocation"]))
        assert [r.reply for r in p.replies()] == [Reply.META_CONTEXT, Reply.ACK]
        p.starttls(client_context(pki))
        assert p.option(Option.STRUCTURED_REPLY)[-1].reply == Reply.ACK
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        # No context is selected on this connection any more: BLOCK_STATUS is invalid.
        assert p.block_status() == Errno.EINVAL
        p.disconnect()


def test_meta_context_selected_after_starttls_works(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    # The control for the test above: the same sequence after TLS does select the context.
    with Probe(workers["SELECTIVETLS"].port) as p:
        p.starttls(client_context(pki))
        p.option(Option.STRUCTURED_REPLY)
        p.send(encode_meta_context_request(Option.SET_META_CONTEXT, "plain", ["base:allocation"]))
        assert [r.reply for r in p.replies()] == [Reply.META_CONTEXT, Reply.ACK]
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        assert p.block_status() == 0
        p.disconnect()


# -- bytes that are not a TLS handshake after the ACK ---------------------------------------------


@pytest.mark.parametrize("mode", TLS_MODES)
def test_plaintext_pipelined_behind_starttls_closes_the_connection(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        # The MitM pattern of CVE-2021-3716: an option injected right behind STARTTLS.
        p.send(encode_option(Option.STARTTLS) + encode_option(Option.STRUCTURED_REPLY))
        # The server may or may not ACK STARTTLS first; it must never answer the injected option.
        data = b""
        while True:
            try:
                chunk = p.sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        replies, used = decode_option_replies(data)
        assert used == len(data), data
        assert all(r.option == Option.STARTTLS for r in replies), replies
        client = me(p)
    wait_for_line(worker, client, "plaintext received after STARTTLS")
    assert_still_serving(worker, pki, mode)


@pytest.mark.parametrize("mode", TLS_MODES)
def test_plaintext_instead_of_client_hello_closes_the_connection(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        # The ACK has been read; now an option where the ClientHello belongs.
        p.send(encode_info_request(Option.GO, "plain"))
        assert p.closed()
        client = me(p)
    wait_for_line(worker, client, "TLS handshake failed")
    assert_still_serving(worker, pki, mode)


@pytest.mark.parametrize("mode", TLS_MODES)
def test_garbage_instead_of_client_hello_closes_the_connection(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        p.send(bytes(range(256)) * 4)
        assert p.closed()
        client = me(p)
    wait_for_line(worker, client, "TLS handshake failed")
    assert_still_serving(worker, pki, mode)


@pytest.mark.parametrize("mode", TLS_MODES)
def test_client_hanging_up_after_the_ack_ends_only_its_connection(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        client = me(p)
    wait_for_line(worker, client, "TLS handshake failed")
    assert_still_serving(worker, pki, mode)


# -- refusals -------------------------------------------------------------------------------------


def test_plaintext_client_on_forcedtls_is_refused(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    worker = workers["FORCEDTLS"]
    with Probe(worker.port) as p:
        assert reply_name(p.info("plain")) == "tlsreq"
        assert reply_name(p.info("plain", go=True)) == "tlsreq"
        assert reply_name(p.option(Option.LIST)) == "tlsreq"
        p.send(encode_option(Option.EXPORT_NAME, b"plain"))
        assert p.closed()
    assert_still_serving(worker, pki, "FORCEDTLS")


def refuses_next_option(p: Probe) -> bool:
    """After a TLS handshake the server refused: the next option is never answered. The
    refusal may already be in when the client writes (the write fails) or arrive after."""
    try:
        p.send(encode_info_request(Option.INFO, "plain"))
    except (ssl.SSLError, OSError):
        return True
    return p.closed()


@pytest.mark.parametrize("mode", TLS_MODES)
@pytest.mark.parametrize("client", ["mallory", "expired"])
def test_certificate_that_does_not_verify_is_refused(
    workers: dict[str, RunningWorker], pki: PKI, mode: str, client: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        (ack,) = p.option(Option.STARTTLS)
        assert ack.reply == Reply.ACK
        who = me(p)
        ctx = client_context(pki, client)
        try:
            p.sock = ctx.wrap_socket(p.sock, server_hostname="localhost")
        except (ssl.SSLError, ConnectionResetError):
            pass  # TLS 1.2 style: the alert ends the handshake
        else:
            # TLS 1.3: the client finishes first and learns of the refusal on its next write
            # (when the alert is already in) or read.
            assert refuses_next_option(p)
    reason = "certificate has expired" if client == "expired" else "unable to get local issuer"
    wait_for_line(worker, who, "TLS handshake failed", reason)
    assert_still_serving(worker, pki, mode)


@pytest.mark.parametrize("mode", TLS_MODES)
def test_client_without_certificate_is_refused_when_verification_is_required(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        try:
            p.sock = client_context(pki, None).wrap_socket(p.sock, server_hostname="localhost")
        except (ssl.SSLError, ConnectionResetError):
            pass
        else:
            assert refuses_next_option(p)
    assert_still_serving(worker, pki, mode)


@pytest.mark.parametrize("mode", TLS_MODES)
def test_revoked_certificate_is_refused_before_any_option(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        # The certificate verifies (same CA, valid dates): the handshake completes ...
        p.starttls(client_context(pki, "revoked"))
        # ... and then nothing is answered.
        assert refuses_next_option(p)
    serial = pki.clients["revoked"].serial_hex
    wait_for_line(
        worker,
        "refused after the TLS handshake",
        "CN=revoked",
        f"certificate serial {serial} is revoked",
    )
    assert_still_serving(worker, pki, mode)


@pytest.mark.parametrize("mode", TLS_MODES)
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls11_client_is_refused(workers: dict[str, RunningWorker], pki: PKI, mode: str) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        client = me(p)
        ctx = client_context(pki, "alice", maximum=ssl.TLSVersion.TLSv1_1)
        with pytest.raises(ssl.SSLError) as info:
            p.sock = ctx.wrap_socket(p.sock, server_hostname="localhost")
        # The client did offer TLS 1.1 (no local failure to build a hello) ...
        assert info.value.reason != "NO_PROTOCOLS_AVAILABLE"
    # ... and the server refused it. (asyncio's TLS layer drops the connection without flushing
    # the protocol_version alert, so the client sees EOF rather than the alert.)
    wait_for_line(worker, client, "TLS handshake failed", "unsupported protocol")
    assert_still_serving(worker, pki, mode)


@pytest.mark.parametrize("mode", TLS_MODES)
@pytest.mark.parametrize(
    ("client", "allowed", "refused"),
    [("alice", "alice-only", "bob-only"), ("bob", "bob-only", "alice-only")],
)
def test_client_allowed_on_one_export_is_refused_another(
    workers: dict[str, RunningWorker], pki: PKI, mode: str, client: str, allowed: str, refused: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        p.starttls(client_context(pki, client))
        assert reply_name(p.info(refused)) == "policy"
        assert reply_name(p.info(refused, go=True)) == "policy"
        # The refusal left the negotiation usable.
        assert p.info(allowed, go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("simple", 0)
        p.disconnect()
    wait_for_line(worker, "127.0.0.1:", f"CN={client}", f"not authorized for export {refused!r}")
    with Probe(worker.port) as p:
        p.starttls(client_context(pki, client))
        p.send(encode_option(Option.EXPORT_NAME, refused.encode()))
        assert p.closed()
    assert_still_serving(worker, pki, mode)


# FORCEDTLS answers everything TLS_REQD before TLS (see the table).
@pytest.mark.parametrize("mode", ["OPTIONALTLS", "SELECTIVETLS"])
def test_allowed_clients_export_is_refused_before_tls(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    with Probe(workers[mode].port) as p:
        # No certificate yet, so no identity: the export is not authorized (and not described).
        assert reply_name(p.info("alice-only")) == "policy"


@pytest.mark.parametrize("mode", TLS_MODES)
def test_export_outside_allowed_networks_is_refused(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker = workers[mode]
    with Probe(worker.port) as p:
        p.starttls(client_context(pki, "alice"))
        assert reply_name(p.info("lan-only")) == "policy"
        listing = p.option(Option.LIST)
        names = {parse_server(r.data)[0] for r in listing if r.reply == Reply.SERVER}
        assert "plain" in names
        assert "lan-only" not in names
        client = me(p)
    wait_for_line(worker, client, "'lan-only'", "outside the export's allowed networks")


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_optionaltls_refuses_to_serve_a_tls_required_export(
    workers: dict[str, RunningWorker], pki: PKI, tls: bool
) -> None:
    # OPTIONALTLS never answers TLS_REQD, so "secret" would go out in plaintext: the worker does
    # not serve it at all (not even over TLS), says why, and serves everything else.
    worker = workers["OPTIONALTLS"]
    wait_for_line(
        worker,
        "export 'secret' refused",
        "tls_required",
        "OPTIONALTLS",
        "SELECTIVETLS or FORCEDTLS",
    )
    with Probe(worker.port) as p:
        if tls:
            p.starttls(client_context(pki, "alice"))
        listing = p.option(Option.LIST)
        names = {parse_server(r.data)[0] for r in listing if r.reply == Reply.SERVER}
        assert "secret" not in names
        assert "plain" in names
        assert reply_name(p.info("secret")) == "unknown"
        assert reply_name(p.info("secret", go=True)) == "unknown"
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("simple", 0)
        p.disconnect()


def test_notls_refuses_starttls_and_never_says_tls_required(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    with Probe(workers["NOTLS"].port) as p:
        assert reply_name(p.option(Option.STARTTLS)) == "policy"
        for code in (Option.LIST, Option.STRUCTURED_REPLY, 99):
            assert reply_name(p.option(code)) != "tlsreq"
        assert reply_name(p.info("nope")) == "unknown"
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("structured", 0)
        p.disconnect()


# -- verification modes and rotation (their own workers) ------------------------------------------


@pytest.mark.parametrize(("verification", "served"), [("none", True), ("optional", True)])
def test_client_without_certificate_is_served_unless_verification_is_required(
    pki: PKI, tmp_path: Path, verification: str, served: bool
) -> None:
    cfg = worker_config(pki, "FORCEDTLS", client_verification=verification)
    with run_worker(cfg, workdir=tmp_path) as worker, Probe(worker.port) as p:
        p.starttls(client_context(pki, None))
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("simple", 0)
        p.disconnect()


def test_verification_none_ignores_client_certificates(pki: PKI, tmp_path: Path) -> None:
    cfg = worker_config(pki, "FORCEDTLS", client_verification="none")
    with run_worker(cfg, workdir=tmp_path) as worker, Probe(worker.port) as p:
        # Not even asked for, so an untrusted one does not matter, and identifies nobody.
        p.starttls(client_context(pki, "mallory"))
        assert p.info("plain")[-1].reply == Reply.ACK
        assert reply_name(p.info("alice-only")) == "policy"


def test_min_version_13_refuses_tls12(pki: PKI, tmp_path: Path) -> None:
    cfg = worker_config(pki, "FORCEDTLS", min_version="1.3")
    with run_worker(cfg, workdir=tmp_path) as worker:
        with Probe(worker.port) as p:
            assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
            ctx = client_context(pki, "alice", maximum=ssl.TLSVersion.TLSv1_2)
            with pytest.raises(ssl.SSLError):
                p.sock = ctx.wrap_socket(p.sock, server_hostname="localhost")
        with Probe(worker.port) as p:
            p.starttls(client_context(pki, "alice"))
            assert p.sock.version() == "TLSv1.3"


def test_tls12_client_is_served(pki: PKI, tmp_path: Path) -> None:
    with (
        run_worker(worker_config(pki, "FORCEDTLS"), workdir=tmp_path) as worker,
        Probe(worker.port) as p,
    ):
        p.starttls(client_context(pki, "alice", maximum=ssl.TLSVersion.TLSv1_2))
        assert p.sock.version() == "TLSv1.2"
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("simple", 0)
        p.disconnect()


# -- options pipelined with the client's Finished -------------------------------------------------


def test_option_sent_with_the_finished_message_is_answered(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    with Probe(workers["FORCEDTLS"].port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        tls = PipelinedTLS(
            p, client_context(pki, "alice"), encode_info_request(Option.INFO, "plain")
        )
        header = tls.recv_exact(20)
        _magic, option, reply, _length = struct.unpack(">QIII", header)
        assert (option, reply) == (Option.INFO, Reply.INFO)


def test_revoked_client_pipelining_an_option_gets_no_answer(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    worker = workers["FORCEDTLS"]
    with Probe(worker.port) as p:
        assert p.option(Option.STARTTLS)[-1].reply == Reply.ACK
        client = me(p)
        tls = PipelinedTLS(
            p, client_context(pki, "revoked"), encode_info_request(Option.INFO, "plain")
        )
        with pytest.raises((EOFError, ssl.SSLError, ConnectionResetError)):
            tls.recv_exact(20)
    # This line names the peer as "addr:port [identity]: ...".
    wait_for_line(worker, client.rstrip(":") + " [CN=revoked", "refused after the TLS handshake")
    assert_still_serving(worker, pki, "FORCEDTLS")


# -- transmission over TLS ------------------------------------------------------------------------


def _go(p: Probe, pki: PKI, export: str = "plain") -> None:
    p.starttls(client_context(pki, "alice"))
    assert p.info(export, go=True)[-1].reply == Reply.ACK


def test_pipelined_writes_and_reads_over_tls_keep_their_data(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    blocks = {i: os.urandom(4096) for i in range(64)}
    with Probe(workers["SELECTIVETLS"].port) as p:
        _go(p, pki, "secret")
        # Every write, then every read, each batch in one send.
        p.send(
            b"".join(
                encode_request(Command.WRITE, cookie=i, offset=i * 8192, length=4096) + data
                for i, data in blocks.items()
            )
        )
        for _ in blocks:
            _, error, _cookie = struct.unpack(">IIQ", p.recv_exact(16))
            assert error == 0
        p.send(
            b"".join(
                encode_request(Command.READ, cookie=1000 + i, offset=i * 8192, length=4096)
                for i in blocks
            )
        )
        for _ in blocks:
            _magic, error, cookie = struct.unpack(">IIQ", p.recv_exact(16))
            assert error == 0
            assert p.recv_exact(4096) == blocks[cookie - 1000]
        p.disconnect()


def test_replies_batched_before_a_disconnect_are_all_delivered(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    with Probe(workers["FORCEDTLS"].port) as p:
        _go(p, pki)
        reads = b"".join(
            encode_request(Command.READ, cookie=i, offset=i * 4096, length=4096) for i in range(32)
        )
        p.send(reads + encode_request(Command.DISC, cookie=99))
        cookies = []
        for _ in range(32):
            _, error, cookie = struct.unpack(">IIQ", p.recv_exact(16))
            assert error == 0
            p.recv_exact(4096)
            cookies.append(cookie)
        assert sorted(cookies) == list(range(32))
        assert p.closed()


def test_large_pipelined_reads_over_tls(workers: dict[str, RunningWorker], pki: PKI) -> None:
    # Far more reply data than the transport's write buffer: the server must pause parsing
    # rather than hold it all, and still answer everything.
    with Probe(workers["FORCEDTLS"].port) as p:
        _go(p, pki)
        count, length = 48, 1 << 20
        p.send(
            b"".join(
                encode_request(Command.READ, cookie=i, offset=(i % 4) * length, length=length)
                for i in range(count)
            )
        )
        for _ in range(count):
            _, error, _cookie = struct.unpack(">IIQ", p.recv_exact(16))
            assert error == 0
            assert len(p.recv_exact(length)) == length
        p.disconnect()


def test_tls_over_a_unix_socket(pki: PKI, tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    cfg = worker_config(pki, "FORCEDTLS")
    cfg["exports"].append(
        {"name": "tcp-only", "backend": "memory", "size": 4096, "allowed_networks": ["0.0.0.0/0"]}
    )
    with run_worker(cfg, workdir=tmp_path, listen=[f"unix:{path}"]) as worker, Probe(path) as p:
        assert reply_name(p.info("plain")) == "tlsreq"
        p.starttls(client_context(pki, "alice"))
        assert p.info("alice-only")[-1].reply == Reply.ACK
        # A network rule cannot admit a peer without an IP address.
        assert reply_name(p.info("tcp-only")) == "policy"
        assert p.info("plain", go=True)[-1].reply == Reply.ACK
        assert p.read()[:2] == ("simple", 0)
        p.disconnect()
        wait_for_line(worker, "unix", "not authorized for export 'tcp-only'")
