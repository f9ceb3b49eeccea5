"""Fuzz targets over the sans-IO NBD protocol (nbdworker/protocol/): arbitrary bytes from a
client produce only the spec's replies, events, or `ProtocolError`, never another exception.

Each target takes one byte string and raises on a bug (an `AssertionError` for a broken rule,
anything else for a crash). The same functions are driven by atheris (`fuzz/run.py`, coverage
guided) and by hypothesis in the test suite (tests/worker/protocol/test_fuzz.py). See
docs/fuzzing.md.

Input layout, the same for both targets: byte 0 picks the setting (TLS mode, or the export's
flags), byte 1 how the client's stream is cut into receives, the rest is the client's stream.
"""

from __future__ import annotations

from nbdworker.protocol import (
    NEED_DATA,
    Closed,
    Command,
    Errno,
    ExportView,
    Handshake,
    HandshakeLimits,
    OptionHandled,
    ProtocolError,
    Ready,
    Reply,
    Session,
    StartTLS,
    TLSMode,
    TransmissionFlag,
    decode_request,
    encode_error,
    encode_simple_reply,
)
from tests.support.nbdclient import (
    GREETING_SIZE,
    decode_export_name_reply,
    decode_greeting,
    decode_option_replies,
    decode_reply,
)

__all__ = ["TARGETS", "handshake", "transmission"]

F = TransmissionFlag
_WRITABLE = (
    F.HAS_FLAGS
    | F.SEND_FLUSH
    | F.SEND_FUA
    | F.SEND_TRIM
    | F.SEND_WRITE_ZEROES
    | F.SEND_FAST_ZERO
    | F.SEND_CACHE
    | F.CAN_MULTI_CONN
)
EXPORTS = {
    view.name: view
    for view in (
        ExportView("disk", "plain disk", 64 << 20, _WRITABLE),
        ExportView("secret", "needs TLS", 16 << 20, _WRITABLE, tls_required=True),
        ExportView("ro", "read-only", 8 << 20, F.HAS_FLAGS | F.READ_ONLY | F.SEND_FLUSH),
        ExportView("odd", "odd sizes", 12345, F.HAS_FLAGS, min_block=512, max_block=65536),
    )
}
MODES = list(TLSMode)
# Small limits, so the fuzzer reaches them.
LIMITS = HandshakeLimits(max_options=24, options_per_listed_export=2, max_option_length=512)
KNOWN_REPLIES = {int(r) for r in Reply}
KNOWN_ERRNOS = {int(e) for e in Errno}
# Transmission flags a session may be given directly (byte 0 of a transmission input).
SESSION_FLAGS = [
    _WRITABLE,
    _WRITABLE | F.SEND_DF,
    F.HAS_FLAGS | F.READ_ONLY | F.SEND_FLUSH,
    F.HAS_FLAGS,
    F.HAS_FLAGS | F.READ_ONLY | F.SEND_FUA | F.SEND_DF,
]
REQUEST_SIZE = 28


def _chunks(stream: bytes, cut: int) -> list[bytes]:
    size = cut % 65 or len(stream) or 1
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def _lookup(name: str) -> ExportView | None:
    return EXPORTS.get(name or "disk")


def handshake(data: bytes) -> None:
    """The handshake from the client's first byte; a Ready continues into transmission."""
    if len(data) < 2:
        return
    mode = MODES[data[0] % len(MODES)]
    hs = Handshake(
        lookup=_lookup, listing=lambda: list(EXPORTS.values()), tls_mode=mode, limits=LIMITS
    )
    events: list[object] = []
    ended: Ready | Closed | None = None
    try:
        for chunk in [*_chunks(data[2:], data[1]), b""]:
            hs.receive_data(chunk)
            while ended is None:
                event = hs.next_event()
                if event is NEED_DATA:
                    assert hs.buffered < 16 + LIMITS.max_option_length, hs.buffered
                    break
                assert isinstance(event, OptionHandled | StartTLS | Ready | Closed), event
                events.append(event)
                if isinstance(event, StartTLS):
                    hs.tls_started()
                elif isinstance(event, Ready | Closed):
                    ended = event
            if ended is not None:
                break
    except ProtocolError:
        return
    assert ended is not None, "EOF did not end the handshake"
    _check_handshake_output(hs.data_to_send(), events, ended)
    if isinstance(ended, Ready):
        trailing = hs.trailing_data()
        _serve(Session(ended), trailing, ended.export.size)


def _check_handshake_output(out: bytes, events: list[object], ended: Ready | Closed) -> None:
    """What the server sent: the greeting, then well-formed option replies with known codes
    (and the EXPORT_NAME reply when that option opened the export)."""
    decode_greeting(out[:GREETING_SIZE])
    body = out[GREETING_SIZE:]
    handled = [e for e in events if isinstance(e, OptionHandled)]
    if isinstance(ended, Ready) and handled and handled[-1].option == 1:  # EXPORT_NAME
        tail = 10 if ended.no_zeroes else 134
        assert decode_export_name_reply(body[-tail:], ended.no_zeroes) is not None
        body = body[:-tail]
    replies, used = decode_option_replies(body)
    assert used == len(body), f"{len(body) - used} bytes after the last option reply"
    for reply in replies:
        _check_reply(int(reply.reply), reply.data)


# The fixed lengths of NBD_REP_INFO payloads by info type (names and descriptions vary).
_INFO_LENGTHS = {0: 12, 3: 14}


def _check_reply(code: int, data: bytes) -> None:
    """One option reply's payload is shaped as the spec says for its type."""
    assert code in KNOWN_REPLIES, code
    if code == Reply.ACK:
        assert data == b"", data
    elif code == Reply.SERVER:
        assert len(data) >= 4, data
        name_length = int.from_bytes(data[:4], "big")
        assert name_length <= len(data) - 4, data
        data[4:].decode("utf-8")
    elif code == Reply.INFO:
        assert len(data) >= 2, data
        info = int.from_bytes(data[:2], "big")
        assert info in (0, 1, 2, 3), info
        if info in _INFO_LENGTHS:
            assert len(data) == _INFO_LENGTHS[info], (info, data)
        else:
            data[2:].decode("utf-8")
    elif code == Reply.META_CONTEXT:
        assert len(data) > 4, data  # a context id and a name
        data[4:].decode("utf-8")
    else:  # an error: an optional human-readable message
        assert len(data) <= 4096, len(data)
        data.decode("utf-8")


def transmission(data: bytes) -> None:
    """Requests straight into a session with the flags byte 0 picks."""
    if len(data) < 2:
        return
    flags = SESSION_FLAGS[data[0] % len(SESSION_FLAGS)]
    structured = bool(data[0] & 0x80)
    view = ExportView("disk", "", 64 << 20, flags)
    meta = {1: "base:allocation"} if structured and data[0] & 0x40 else {}
    ready = Ready(view, structured, meta, flags, no_zeroes=True)
    _serve(Session(ready), data[2:], view.size, shutdown_at=data[1])


def _serve(session: Session, stream: bytes, size: int, shutdown_at: int = 256) -> None:
    """Parse and check requests as the server does; every verdict must be one the spec allows,
    and its reply must encode and decode."""
    pos = 0
    count = 0
    while len(stream) - pos >= REQUEST_SIZE:
        if count == shutdown_at:
            session.start_shutdown()
        count += 1
        try:
            req = decode_request(stream, pos)
        except ProtocolError:
            return  # a bad magic: the server drops the connection
        pos += REQUEST_SIZE
        verdict = session.check(req)
        assert verdict.error == 0 or verdict.error in KNOWN_ERRNOS, verdict
        assert verdict.payload in (0, req.length), (req, verdict)
        if verdict.payload:
            assert req.command == Command.WRITE, (req, verdict)
        if req.command == Command.DISC and not verdict.error:
            return
        if verdict.disconnect:
            assert verdict.payload == 0, verdict
            return
        if verdict.error == 0:
            assert req.command <= Command.BLOCK_STATUS, req
            if req.command in (Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES):
                assert req.offset + req.length <= size, (req, size)
            reply = encode_simple_reply(req.cookie)
        else:
            reply = encode_error(
                req.cookie, verdict.error, verdict.message, structured=session.structured
            )
        decoded = decode_reply(reply)
        assert decoded is not None and decoded[1] == len(reply), reply
        pos += verdict.payload


TARGETS = {"handshake": handshake, "transmission": transmission}
