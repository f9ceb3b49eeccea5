"""Request decoding, Session.check validation tables, reply encoders, errno mapping."""

from __future__ import annotations

import errno
import struct

import pytest

from nbdworker.protocol import (
    BASE_ALLOCATION_ID,
    MAX_PAYLOAD,
    OK,
    REQUEST_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ExportView,
    LocalProtocolError,
    ProtocolError,
    Ready,
    Request,
    Session,
    StateFlag,
    TransmissionFlag,
    Verdict,
    decode_request,
    encode_block_status,
    encode_error,
    encode_hole_chunk,
    encode_none_chunk,
    encode_read_data_header,
    encode_read_data_header_into,
    encode_simple_reply,
    errno_from_oserror,
    final_transmission_flags,
    read_data_header_size,
)
from tests.support.nbdclient import (
    Chunk,
    SimpleReply,
    decode_reply,
    encode_request,
    parse_block_status,
    parse_error_chunk,
    parse_hole,
)

from .helpers import ALL_FLAGS, MIB

F = TransmissionFlag
C = Command
CF = CommandFlag
SIZE = 64 * MIB


def session(
    flags: int = ALL_FLAGS,
    structured: bool = True,
    meta: bool = True,
    size: int = SIZE,
    max_block: int = MAX_PAYLOAD,
) -> Session:
    view = ExportView("disk", "", size, TransmissionFlag(flags), max_block=max_block)
    ready = Ready(
        export=view,
        structured=structured,
        meta_contexts={BASE_ALLOCATION_ID: "base:allocation"} if meta and structured else {},
        flags=final_transmission_flags(view, structured),
        no_zeroes=True,
    )
    return Session(ready)


def req(command, offset=0, length=4096, flags=0, cookie=7) -> Request:
    return Request(flags, command, cookie, offset, length)


# --- decode_request ----------------------------------------------------------------------------


def test_decode_request_reads_every_field():
    raw = encode_request(
        C.WRITE, flags=CF.FUA, cookie=0xDEADBEEF00112233, offset=1 << 40, length=512
    )
    assert decode_request(raw) == Request(CF.FUA, C.WRITE, 0xDEADBEEF00112233, 1 << 40, 512)


def test_decode_request_at_an_offset_in_a_buffer():
    raw = b"junk" + encode_request(C.READ, cookie=5)
    assert decode_request(bytearray(raw), 4).cookie == 5


def test_decode_request_rejects_bad_magic():
    raw = struct.pack(">IHHQQI", REQUEST_MAGIC + 1, 0, 0, 0, 0, 0)
    with pytest.raises(ProtocolError, match="magic"):
        decode_request(raw)


def test_decode_request_rejects_short_buffer():
    with pytest.raises(ProtocolError):
        decode_request(encode_request(C.READ)[:27])


# --- Session.check ------------------------------------------------------------------------------

EPERM, EINVAL, ENOSPC, EOVERFLOW = Errno.EPERM, Errno.EINVAL, Errno.ENOSPC, Errno.EOVERFLOW
NO_FUA = ALL_FLAGS & ~F.SEND_FUA
RO = F.HAS_FLAGS | F.READ_ONLY | F.SEND_FLUSH | F.SEND_FUA
BARE = F.HAS_FLAGS

# (id, session kwargs, request, expected error, expected payload, expected disconnect)
CASES = [
    # plain success
    ("read", {}, req(C.READ), 0, 0, False),
    ("write", {}, req(C.WRITE), 0, 4096, False),
    ("flush", {}, req(C.FLUSH, 0, 0), 0, 0, False),
    ("trim", {}, req(C.TRIM), 0, 0, False),
    ("cache", {}, req(C.CACHE), 0, 0, False),
    ("write-zeroes", {}, req(C.WRITE_ZEROES), 0, 0, False),
    ("block-status", {}, req(C.BLOCK_STATUS), 0, 0, False),
    ("disc", {}, req(C.DISC, 0, 0), 0, 0, False),
    ("disc-with-garbage", {}, req(C.DISC, 5, 5, flags=0xFFFF), 0, 0, False),
    # unknown commands
    ("unknown-command", {}, req(9), EINVAL, 0, False),
    ("resize-unsupported", {}, req(C.RESIZE), EINVAL, 0, False),
    ("command-0xffff", {}, req(0xFFFF), EINVAL, 0, False),
    # flags: unknown bits
    ("unknown-flag-bit", {}, req(C.READ, flags=0x40), EINVAL, 0, False),
    ("payload-len-without-eh", {}, req(C.WRITE, flags=CF.PAYLOAD_LEN), EINVAL, 4096, False),
    ("high-flag-bit-on-write", {}, req(C.WRITE, flags=0x8000), EINVAL, 4096, False),
    # FUA: any command when SEND_FUA, none otherwise
    ("fua-write", {}, req(C.WRITE, flags=CF.FUA), 0, 4096, False),
    ("fua-read", {}, req(C.READ, flags=CF.FUA), 0, 0, False),
    ("fua-flush", {}, req(C.FLUSH, 0, 0, flags=CF.FUA), 0, 0, False),
    ("fua-trim", {}, req(C.TRIM, flags=CF.FUA), 0, 0, False),
    ("fua-cache", {}, req(C.CACHE, flags=CF.FUA), 0, 0, False),
    ("fua-block-status", {}, req(C.BLOCK_STATUS, flags=CF.FUA), 0, 0, False),
    ("fua-zeroes", {}, req(C.WRITE_ZEROES, flags=CF.FUA), 0, 0, False),
    ("fua-not-advertised", {"flags": NO_FUA}, req(C.WRITE, flags=CF.FUA), EINVAL, 4096, False),
    ("fua-read-not-adv", {"flags": NO_FUA}, req(C.READ, flags=CF.FUA), EINVAL, 0, False),
    # DF: READ only, only with structured replies
    ("df-read", {}, req(C.READ, flags=CF.DF), 0, 0, False),
    ("df-simple", {"structured": False}, req(C.READ, flags=CF.DF), EINVAL, 0, False),
    ("df-on-write", {}, req(C.WRITE, flags=CF.DF), EINVAL, 4096, False),
    ("df-on-block-status", {}, req(C.BLOCK_STATUS, flags=CF.DF), EINVAL, 0, False),
    # REQ_ONE: BLOCK_STATUS only
    ("req-one", {}, req(C.BLOCK_STATUS, flags=CF.REQ_ONE), 0, 0, False),
    ("req-one-on-read", {}, req(C.READ, flags=CF.REQ_ONE), EINVAL, 0, False),
    # NO_HOLE: WRITE_ZEROES only
    ("no-hole", {}, req(C.WRITE_ZEROES, flags=CF.NO_HOLE), 0, 0, False),
    ("no-hole-on-trim", {}, req(C.TRIM, flags=CF.NO_HOLE), EINVAL, 0, False),
    ("no-hole-on-write", {}, req(C.WRITE, flags=CF.NO_HOLE), EINVAL, 4096, False),
    # FAST_ZERO: WRITE_ZEROES only, only with SEND_FAST_ZERO
    ("fast-zero", {}, req(C.WRITE_ZEROES, flags=CF.FAST_ZERO), 0, 0, False),
    (
        "fast-zero-not-advertised",
        {"flags": ALL_FLAGS & ~F.SEND_FAST_ZERO},
        req(C.WRITE_ZEROES, flags=CF.FAST_ZERO),
        EINVAL,
        0,
        False,
    ),
    ("fast-zero-on-trim", {}, req(C.TRIM, flags=CF.FAST_ZERO), EINVAL, 0, False),
    ("fast-zero-no-hole", {}, req(C.WRITE_ZEROES, flags=CF.FAST_ZERO | CF.NO_HOLE), 0, 0, False),
    # commands that need advertising
    ("flush-not-advertised", {"flags": BARE}, req(C.FLUSH, 0, 0), EINVAL, 0, False),
    ("trim-not-advertised", {"flags": BARE}, req(C.TRIM), EINVAL, 0, False),
    ("zeroes-not-advertised", {"flags": BARE}, req(C.WRITE_ZEROES), EINVAL, 0, False),
    ("cache-answered-unadvertised", {"flags": BARE}, req(C.CACHE), 0, 0, False),
    ("cache-flag-unadvertised", {"flags": BARE}, req(C.CACHE, flags=CF.FUA), EINVAL, 0, False),
    # block status needs structured replies and a context
    ("bs-without-structured", {"structured": False}, req(C.BLOCK_STATUS), EINVAL, 0, False),
    ("bs-without-context", {"meta": False}, req(C.BLOCK_STATUS), EINVAL, 0, False),
    ("bs-length-is-a-hint", {"size": 8 << 30}, req(C.BLOCK_STATUS, 0, 0xFFFFFFFF), 0, 0, False),
    ("bs-past-end", {}, req(C.BLOCK_STATUS, SIZE - 512, 1024), EINVAL, 0, False),
    ("bs-zero-length", {}, req(C.BLOCK_STATUS, 0, 0), EINVAL, 0, False),
    # read-only
    ("ro-write", {"flags": RO}, req(C.WRITE), EPERM, 4096, False),
    ("ro-trim", {"flags": RO | F.SEND_TRIM}, req(C.TRIM), EPERM, 0, False),
    ("ro-zeroes", {"flags": RO | F.SEND_WRITE_ZEROES}, req(C.WRITE_ZEROES), EPERM, 0, False),
    # A read-only export never advertises TRIM or WRITE_ZEROES; a write of any kind is still
    # EPERM, as the spec says a server SHOULD answer (and nbdkit does), not EINVAL.
    ("ro-trim-not-advertised", {"flags": RO}, req(C.TRIM), EPERM, 0, False),
    ("ro-zeroes-not-advertised", {"flags": RO}, req(C.WRITE_ZEROES), EPERM, 0, False),
    ("ro-zeroes-no-hole", {"flags": RO}, req(C.WRITE_ZEROES, flags=CF.NO_HOLE), EPERM, 0, False),
    ("ro-trim-fua", {"flags": RO}, req(C.TRIM, flags=CF.FUA), EPERM, 0, False),
    ("ro-read", {"flags": RO}, req(C.READ), 0, 0, False),
    ("ro-flush", {"flags": RO}, req(C.FLUSH, 0, 0), 0, 0, False),
    ("ro-cache", {"flags": RO}, req(C.CACHE), 0, 0, False),
    ("ro-write-past-end", {"flags": RO}, req(C.WRITE, SIZE, 512), EPERM, 512, False),
    # bounds
    ("read-to-the-end", {}, req(C.READ, SIZE - 4096, 4096), 0, 0, False),
    ("read-past-end", {}, req(C.READ, SIZE - 4095, 4096), EINVAL, 0, False),
    ("read-offset-past-end", {}, req(C.READ, SIZE + 1, 0), EINVAL, 0, False),
    ("write-past-end", {}, req(C.WRITE, SIZE - 1, 2), ENOSPC, 2, False),
    ("zeroes-past-end", {}, req(C.WRITE_ZEROES, SIZE, 1), ENOSPC, 0, False),
    ("trim-past-end", {}, req(C.TRIM, SIZE, 1), EINVAL, 0, False),
    ("cache-past-end", {}, req(C.CACHE, SIZE, 1), EINVAL, 0, False),
    ("offset-overflow", {}, req(C.READ, 2**64 - 1, 4096), EINVAL, 0, False),
    ("offset-plus-length-wraps", {}, req(C.WRITE, 2**64 - 512, 1024), ENOSPC, 1024, False),
    ("flush-ignores-offset", {}, req(C.FLUSH, 2**64 - 1, 0xFFFFFFFF), 0, 0, False),
    # zero-length requests succeed (BLOCK_STATUS aside)
    ("zero-read", {}, req(C.READ, 0, 0), 0, 0, False),
    ("zero-write", {}, req(C.WRITE, 0, 0), 0, 0, False),
    ("zero-trim", {}, req(C.TRIM, 0, 0), 0, 0, False),
    ("zero-zeroes", {}, req(C.WRITE_ZEROES, 0, 0), 0, 0, False),
    ("zero-cache", {}, req(C.CACHE, 0, 0), 0, 0, False),
    ("zero-read-at-end", {}, req(C.READ, SIZE, 0), 0, 0, False),
    # payload limits
    ("read-max-payload", {}, req(C.READ, 0, MAX_PAYLOAD), 0, 0, False),
    ("read-over-max-with-df", {}, req(C.READ, 0, MAX_PAYLOAD + 1), EOVERFLOW, 0, False),
    (
        "read-over-max-simple",
        {"structured": False},
        req(C.READ, 0, MAX_PAYLOAD + 1),
        EINVAL,
        0,
        False,
    ),
    ("read-over-advertised", {"max_block": 1 * MIB}, req(C.READ, 0, MIB + 1), EOVERFLOW, 0, False),
    ("write-max-payload", {}, req(C.WRITE, 0, MAX_PAYLOAD), 0, MAX_PAYLOAD, False),
    ("write-over-max", {}, req(C.WRITE, 0, MAX_PAYLOAD + 1), EINVAL, 0, True),
    ("write-4g", {}, req(C.WRITE, 0, 0xFFFFFFFF), EINVAL, 0, True),
    ("write-over-advertised", {"max_block": MIB}, req(C.WRITE, 0, MIB + 1), EINVAL, MIB + 1, False),
    ("trim-longer-than-payload", {}, req(C.TRIM, 0, SIZE), 0, 0, False),
    ("zeroes-longer-than-payload", {}, req(C.WRITE_ZEROES, 0, SIZE), 0, 0, False),
    ("cache-longer-than-payload", {}, req(C.CACHE, 0, SIZE), 0, 0, False),
    ("bs-longer-than-payload", {}, req(C.BLOCK_STATUS, 0, SIZE), 0, 0, False),
    ("bad-write-flags-still-drain", {}, req(C.WRITE, 0, 512, flags=CF.REQ_ONE), EINVAL, 512, False),
]


@pytest.mark.parametrize(
    ("kwargs", "request_", "error", "payload", "disconnect"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_session_check(kwargs, request_, error, payload, disconnect):
    verdict = session(**kwargs).check(request_)
    assert (verdict.error, verdict.payload, verdict.disconnect) == (error, payload, disconnect)
    if error:
        assert verdict.message
        assert isinstance(verdict.error, Errno)


def test_ok_verdict_is_shared_for_requests_without_payload():
    s = session()
    assert s.check(req(C.READ)) is OK
    assert s.check(req(C.TRIM)) is OK
    assert Verdict(0, 0, False, "") == OK


def test_shutdown_refuses_new_requests_but_still_drains_writes():
    s = session()
    s.start_shutdown()
    assert s.check(req(C.READ)).error == Errno.ESHUTDOWN
    verdict = s.check(req(C.WRITE, 0, 512))
    assert (verdict.error, verdict.payload) == (Errno.ESHUTDOWN, 512)
    assert s.check(req(C.DISC, 0, 0)) is OK


def test_session_without_structured_ignores_stray_meta_contexts():
    view = ExportView("disk", "", SIZE, ALL_FLAGS)
    ready = Ready(view, False, {1: "base:allocation"}, final_transmission_flags(view, False), True)
    assert Session(ready).check(req(C.BLOCK_STATUS)).error == Errno.EINVAL


def test_flag_error_messages_name_the_command():
    assert "NBD_CMD_TRIM" in session().check(req(C.TRIM, flags=CF.DF)).message
    assert "unknown flags" in session().check(req(C.TRIM, flags=0x100)).message


# --- encoders ----------------------------------------------------------------------------------


def decode_one(raw: bytes):
    decoded = decode_reply(raw)
    assert decoded is not None
    reply, end = decoded
    return reply, raw[end:]


def test_simple_reply_layout():
    raw = encode_simple_reply(0x0102030405060708, Errno.EIO)
    assert raw == bytes.fromhex("67446698 00000005 0102030405060708".replace(" ", ""))


def test_read_data_header_simple_is_the_success_reply():
    assert encode_read_data_header(9, 4096, 512, structured=False) == encode_simple_reply(9)


def test_read_data_header_structured_is_offset_data_chunk():
    raw = encode_read_data_header(9, 4096, 3, structured=True) + b"abc"
    chunk, rest = decode_one(raw)
    assert chunk == Chunk(1, ChunkType.OFFSET_DATA, 9, struct.pack(">Q", 4096) + b"abc")
    assert rest == b""


def test_read_data_header_not_done_clears_the_flag():
    raw = encode_read_data_header(9, 0, 1, structured=True, done=False) + b"x"
    chunk, _ = decode_one(raw)
    assert not chunk.done


@pytest.mark.parametrize("length", [0, 2**32 - 8, -1])
def test_read_data_header_rejects_lengths_that_do_not_fit_a_chunk(length):
    with pytest.raises(LocalProtocolError):
        encode_read_data_header(1, 0, length, structured=True)


@pytest.mark.parametrize("structured", [False, True])
def test_read_data_header_into_packs_the_header_before_the_data(structured):
    size = read_data_header_size(structured)
    buf = bytearray(size + 3)
    assert encode_read_data_header_into(buf, 9, 4096, 3, structured) == size
    assert bytes(buf[:size]) == encode_read_data_header(9, 4096, 3, structured)
    assert buf[size:] == bytes(3)  # the data's room is left alone


@pytest.mark.parametrize("length", [0, 2**32 - 8, -1])
def test_read_data_header_into_rejects_lengths_that_do_not_fit_a_chunk(length):
    with pytest.raises(LocalProtocolError):
        encode_read_data_header_into(bytearray(64), 1, 0, length, structured=True)


def test_hole_chunk_layout():
    chunk, _ = decode_one(encode_hole_chunk(3, 8192, 4096, done=True))
    assert chunk.type == ChunkType.OFFSET_HOLE and chunk.done
    assert parse_hole(chunk.payload) == (8192, 4096)


@pytest.mark.parametrize("length", [0, 2**32])
def test_hole_chunk_rejects_bad_lengths(length):
    with pytest.raises(LocalProtocolError):
        encode_hole_chunk(3, 0, length, done=False)


def test_none_chunk_is_done_and_empty():
    chunk, _ = decode_one(encode_none_chunk(77))
    assert chunk == Chunk(1, ChunkType.NONE, 77, b"")


def test_block_status_chunk_layout():
    extents = [(4096, StateFlag.HOLE | StateFlag.ZERO), (65536, 0), (512, StateFlag.ZERO)]
    raw = encode_block_status(11, BASE_ALLOCATION_ID, extents)
    chunk, _ = decode_one(raw)
    assert chunk.type == ChunkType.BLOCK_STATUS and chunk.done and chunk.cookie == 11
    assert len(chunk.payload) == 4 + 8 * 3
    assert parse_block_status(chunk.payload) == (BASE_ALLOCATION_ID, extents)


@pytest.mark.parametrize("extents", [[], [(0, 0)], [(2**32, 0)], [(1, 2**32)]])
def test_block_status_rejects_bad_extents(extents):
    with pytest.raises(LocalProtocolError):
        encode_block_status(1, 1, extents)


def test_error_simple_when_not_structured():
    assert encode_error(5, Errno.EINVAL, "ignored") == encode_simple_reply(5, Errno.EINVAL)


def test_error_chunk_carries_the_message():
    chunk, _ = decode_one(encode_error(5, Errno.EPERM, "read-only", structured=True))
    assert chunk.type == ChunkType.ERROR and chunk.done
    assert parse_error_chunk(chunk) == (Errno.EPERM, "read-only", None)


def test_error_offset_chunk_carries_the_offset():
    raw = encode_error(5, Errno.EIO, "bad sector", structured=True, offset=1 << 33, done=False)
    chunk, _ = decode_one(raw)
    assert chunk.type == ChunkType.ERROR_OFFSET and not chunk.done
    assert parse_error_chunk(chunk) == (Errno.EIO, "bad sector", 1 << 33)


def test_error_message_is_cut_to_4096_bytes_on_a_character_boundary():
    chunk, _ = decode_one(encode_error(5, Errno.EIO, "ü" * 3000, structured=True))
    _, message, _ = parse_error_chunk(chunk)
    assert message == "ü" * 2048


def test_error_zero_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        encode_error(5, 0)


def test_simple_reply_decodes_as_simple():
    reply, _ = decode_one(encode_simple_reply(42))
    assert reply == SimpleReply(0, 42)


# --- errno mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "nbd"),
    [
        (errno.EPERM, Errno.EPERM),
        (errno.EACCES, Errno.EPERM),
        (errno.EROFS, Errno.EPERM),
        (errno.EIO, Errno.EIO),
        (errno.ENOMEM, Errno.ENOMEM),
        (errno.EINVAL, Errno.EINVAL),
        (errno.ENOSPC, Errno.ENOSPC),
        (errno.EDQUOT, Errno.ENOSPC),
        (errno.EFBIG, Errno.ENOSPC),
        (errno.EOVERFLOW, Errno.EOVERFLOW),
        (errno.EOPNOTSUPP, Errno.ENOTSUP),
        (errno.ESHUTDOWN, Errno.ESHUTDOWN),
        (errno.ENXIO, Errno.EIO),
        (errno.EBADF, Errno.EIO),
    ],
)
def test_errno_from_oserror(host, nbd):
    assert errno_from_oserror(OSError(host, "x")) is nbd


def test_errno_from_oserror_without_errno_is_eio():
    assert errno_from_oserror(OSError("no errno")) is Errno.EIO
