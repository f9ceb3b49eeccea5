"""Transmission phase: request decoding, request validation, reply encoding.

These functions run once per request on the server's hot path, so they avoid per-request work
beyond the result: precompiled ``struct.Struct`` objects, per-session lookup tables built once in
``Session.__init__``, and a shared ``Verdict`` for the common "go ahead" answer.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .constants import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    MAX_PAYLOAD,
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    ReplyFlag,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError
from .events import Ready

__all__ = [
    "CHUNK_HEADER",
    "OK",
    "REQUEST_HEADER",
    "SIMPLE_REPLY",
    "Request",
    "Session",
    "Verdict",
    "decode_request",
    "encode_block_status",
    "encode_error",
    "encode_hole_chunk",
    "encode_none_chunk",
    "encode_read_data_header",
    "encode_simple_reply",
    "errno_from_oserror",
]

REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, command, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
_CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")  # header + u64 offset
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # header + u64 offset + u32 hole length
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # header + u32 error + u16 message length
_CHUNK_BLOCK_STATUS = struct.Struct(">IHHQII")  # header + u32 context id
_EXTENT = struct.Struct(">II")
_U64 = struct.Struct(">Q")

_U32_MAX = 0xFFFFFFFF
_MAX_DATA_CHUNK = _U32_MAX - 8  # the u32 chunk length also counts the 8-byte offset
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ChunkType.OFFSET_DATA)


@dataclass(slots=True)
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int


def decode_request(buf: bytes | bytearray | memoryview, pos: int = 0) -> Request:
    """Decode the 28-byte compact request header at ``buf[pos:]``.

    ``ProtocolError`` on a bad magic (the stream cannot be resynchronised) or fewer than 28
    bytes.
    """
    try:
        magic, flags, command, cookie, offset, length = REQUEST_HEADER.unpack_from(buf, pos)
    except struct.error:
        raise ProtocolError("truncated request header") from None
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:08x}")
    return Request(flags, command, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one request.

    ``error`` 0: execute it. Otherwise reply with that error (``message`` may go in an error
    chunk). Either way, first read and discard ``payload`` bytes of WRITE data, unless
    ``disconnect`` is set: then the payload is not read (``payload`` is 0), the reply is optional,
    and the connection is closed because the stream cannot be trusted any more.
    """

    error: int = 0
    payload: int = 0
    disconnect: bool = False
    message: str = ""


OK = Verdict()
"""The shared verdict for every request without a payload that may go ahead."""

_LAST_COMMAND = CMD_BLOCK_STATUS
_WRITE_TYPE = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
# Past the end: writes that would grow the export are "no space", everything else "invalid".
_PAST_END = tuple(
    Errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else Errno.EINVAL
    for command in range(_LAST_COMMAND + 1)
)
# Distinct WRITE lengths whose OK verdict a session keeps (clients use a handful of sizes).
_WRITE_VERDICT_CACHE = 64
# Flag masks are plain ints: ``~`` on an IntFlag complements only the defined bits, which
# would let unknown bits through the validation.
_KNOWN_FLAGS = FLAG_FUA | FLAG_NO_HOLE | FLAG_DF | FLAG_REQ_ONE | FLAG_FAST_ZERO
_TF_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_TF_SEND_DF = int(TransmissionFlag.SEND_DF)
_TF_SEND_FUA = int(TransmissionFlag.SEND_FUA)
_TF_SEND_FLUSH = int(TransmissionFlag.SEND_FLUSH)
_TF_SEND_TRIM = int(TransmissionFlag.SEND_TRIM)
_TF_SEND_WRITE_ZEROES = int(TransmissionFlag.SEND_WRITE_ZEROES)
_TF_SEND_FAST_ZERO = int(TransmissionFlag.SEND_FAST_ZERO)


_TABLES: dict[
    tuple[int, bool], tuple[tuple[int | None, ...], tuple[str, ...], tuple[bool, ...]]
] = {}


def _command_tables(
    flags: int, block_status: bool
) -> tuple[tuple[int | None, ...], tuple[str, ...], tuple[bool, ...]]:
    """(allowed, refusal, eperm) per command for a session with these transmission flags."""
    read_only = bool(flags & _TF_READ_ONLY)
    df = bool(flags & _TF_SEND_DF)
    fua = FLAG_FUA if flags & _TF_SEND_FUA else 0
    # allowed[command] = flag bits the command accepts, or None if the command is not
    # available on this connection; _refusal[command] says why, for the error message.
    allowed: list[int | None] = [None] * 8
    refusal = ["unknown command"] * 8
    allowed[Command.READ] = fua | (FLAG_DF if df else 0)
    allowed[Command.WRITE] = fua
    allowed[Command.DISC] = _KNOWN_FLAGS  # never replied to: flags are irrelevant
    # CACHE is answered even when not advertised: some clients send it regardless.
    allowed[Command.CACHE] = fua
    if flags & _TF_SEND_FLUSH:
        allowed[Command.FLUSH] = fua
    else:
        refusal[Command.FLUSH] = "FLUSH not advertised"
    if flags & _TF_SEND_TRIM:
        allowed[Command.TRIM] = fua
    else:
        refusal[Command.TRIM] = "TRIM not advertised"
    if flags & _TF_SEND_WRITE_ZEROES:
        fast = FLAG_FAST_ZERO if flags & _TF_SEND_FAST_ZERO else 0
        allowed[Command.WRITE_ZEROES] = fua | FLAG_NO_HOLE | fast
    else:
        refusal[Command.WRITE_ZEROES] = "WRITE_ZEROES not advertised"
    if block_status:
        allowed[Command.BLOCK_STATUS] = fua | FLAG_REQ_ONE
    else:
        refusal[Command.BLOCK_STATUS] = "BLOCK_STATUS needs structured replies and a context"
    eperm = tuple(read_only and command in _WRITE_TYPE for command in range(_LAST_COMMAND + 1))
    return tuple(allowed), tuple(refusal), eperm


class Session:
    """Per-connection transmission state: validates requests against what was negotiated."""

    __slots__ = (
        "_allowed",
        "_df",
        "_eperm",
        "_read_cap",
        "_read_only",
        "_refusal",
        "_write_cap",
        "_write_ok",
        "export",
        "flags",
        "meta_contexts",
        "shutting_down",
        "size",
        "structured",
    )

    def __init__(self, ready: Ready) -> None:
        view = ready.export
        self.export = view
        self.flags = ready.flags
        flags = int(ready.flags)  # int arithmetic: IntFlag operators are slow
        self.size = view.size
        self.structured = ready.structured
        self.meta_contexts = dict(ready.meta_contexts) if ready.structured else {}
        self.shutting_down = False
        self._read_only = bool(flags & _TF_READ_ONLY)
        self._df = bool(flags & _TF_SEND_DF)
        # The advertised maximum payload, never above what we are willing to buffer.
        cap = min(view.max_block, MAX_PAYLOAD)
        self._read_cap = cap
        self._write_cap = cap

        # The command tables depend only on the flags and on whether BLOCK_STATUS is usable:
        # built once per combination, shared by every session (they are never mutated).
        key = (flags, bool(self.structured and self.meta_contexts))
        tables = _TABLES.get(key)
        if tables is None:
            tables = _TABLES[key] = _command_tables(flags, key[1])
        self._allowed, self._refusal, self._eperm = tables
        self._write_ok: dict[int, Verdict] = {}

    def start_shutdown(self) -> None:
        """Refuse every further request (but DISC) with ESHUTDOWN."""
        self.shutting_down = True

    def check(self, req: Request) -> Verdict:
        """Validate ``req``; see ``Verdict`` for how to act on the answer."""
        # Hot path: plain int comparisons and per-session tables; a Verdict is allocated only
        # for errors and for WRITE lengths not seen before on this session.
        command = req.command
        length = req.length
        payload = 0
        if command == CMD_WRITE:
            if length > MAX_PAYLOAD:
                return Verdict(Errno.EINVAL, 0, True, "write payload too large")
            payload = length
        elif command == CMD_DISC:
            return OK
        if self.shutting_down:
            return Verdict(Errno.ESHUTDOWN, payload, False, "server is shutting down")
        if command > _LAST_COMMAND:
            return Verdict(Errno.EINVAL, payload, False, "unknown command")
        # Before "not advertised": a read-only export advertises no TRIM or WRITE_ZEROES, and a
        # write of any kind there SHOULD be EPERM (the spec; nbdkit does the same).
        if self._eperm[command]:
            return Verdict(Errno.EPERM, payload, False, "export is read-only")
        allowed = self._allowed[command]
        if allowed is None:
            return Verdict(Errno.EINVAL, payload, False, self._refusal[command])
        if req.flags & ~allowed:
            return Verdict(Errno.EINVAL, payload, False, self._flag_message(req, allowed))
        if command == CMD_FLUSH:
            return OK  # offset and length are reserved: ignored
        offset = req.offset
        size = self.size
        # Subtraction form, the spec's own: it cannot wrap (not that Python ints would).
        if offset > size or length > size - offset:
            return Verdict(
                _PAST_END[command], payload, False, "request beyond the end of the export"
            )
        if command == CMD_READ:
            if length > self._read_cap:
                error = Errno.EOVERFLOW if self._df else Errno.EINVAL
                return Verdict(error, 0, False, "read larger than the maximum payload")
            return OK
        if command == CMD_WRITE:
            if length > self._write_cap:
                return Verdict(
                    Errno.EINVAL, payload, False, "write larger than the maximum payload"
                )
            verdict = self._write_ok.get(length)
            if verdict is None:
                verdict = Verdict(0, length, False, "")
                if len(self._write_ok) < _WRITE_VERDICT_CACHE:
                    self._write_ok[length] = verdict
            return verdict
        if command == CMD_BLOCK_STATUS and length == 0:
            return Verdict(Errno.EINVAL, 0, False, "zero-length BLOCK_STATUS")
        # TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS lengths are not payloads: no cap here.
        return OK

    @staticmethod
    def _flag_message(req: Request, allowed: int) -> str:
        bad = req.flags & ~allowed
        try:
            name = str(Command(req.command))
        except ValueError:  # pragma: no cover - unknown commands are refused earlier
            name = f"command {req.command}"
        if bad & ~_KNOWN_FLAGS:
            return f"unknown flags 0x{bad:04x} on {name}"
        return f"flags {CommandFlag(bad)!r} not allowed on {name}"


# --- reply encoders ---------------------------------------------------------------------------


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    """The 16-byte simple reply (for a successful READ, the data follows it)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def _data_chunk_size(length: int) -> int:
    """An OFFSET_DATA chunk's length field for ``length`` bytes of data."""
    if not 0 < length <= _MAX_DATA_CHUNK:
        raise LocalProtocolError(f"OFFSET_DATA chunk of {length} bytes")
    return length + 8


def read_data_header_size(structured: bool) -> int:
    """The length of what ``encode_read_data_header`` returns."""
    return _CHUNK_OFFSET_DATA.size if structured else SIMPLE_REPLY.size


def encode_read_data_header_into(
    buf: bytearray, cookie: int, offset: int, length: int, structured: bool
) -> int:
    """``encode_read_data_header`` written at the front of ``buf`` (which then takes the data);
    returns the header's length."""
    if not structured:
        SIMPLE_REPLY.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, 0, cookie)
        return SIMPLE_REPLY.size
    _CHUNK_OFFSET_DATA.pack_into(
        buf,
        0,
        STRUCTURED_REPLY_MAGIC,
        _DONE,
        _OFFSET_DATA,
        cookie,
        _data_chunk_size(length),
        offset,
    )
    return _CHUNK_OFFSET_DATA.size


def encode_read_data_header(
    cookie: int, offset: int, length: int, structured: bool, done: bool = True
) -> bytes:
    """What precedes ``length`` bytes of READ data at ``offset``.

    Simple: the 16-byte success reply. Structured: an OFFSET_DATA chunk header plus its u64
    offset (28 bytes), ``length`` >= 1.
    """
    if not structured:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
    return _CHUNK_OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        _OFFSET_DATA,
        cookie,
        _data_chunk_size(length),
        offset,
    )


def encode_hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` (1 .. 2**32-1) bytes at ``offset`` read as zeroes."""
    if not 0 < length <= _U32_MAX:
        raise LocalProtocolError(f"OFFSET_HOLE chunk of {length} bytes")
    return _CHUNK_HOLE.pack(
        STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        ChunkType.OFFSET_HOLE,
        cookie,
        12,
        offset,
        length,
    )


def encode_none_chunk(cookie: int) -> bytes:
    """The NONE chunk, always with DONE: ends a structured reply."""
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, _DONE, ChunkType.NONE, cookie, 0)


def encode_block_status(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool = True
) -> bytes:
    """A BLOCK_STATUS chunk: ``extents`` are (length, status flags), length 1 .. 2**32-1."""
    count = len(extents)
    if not count:
        raise LocalProtocolError("BLOCK_STATUS chunk without extents")
    out = bytearray(_CHUNK_BLOCK_STATUS.size + 8 * count)
    _CHUNK_BLOCK_STATUS.pack_into(
        out,
        0,
        STRUCTURED_REPLY_MAGIC,
        _DONE if done else 0,
        ChunkType.BLOCK_STATUS,
        cookie,
        4 + 8 * count,
        context_id,
    )
    pos = _CHUNK_BLOCK_STATUS.size
    pack_into = _EXTENT.pack_into
    try:
        for length, status in extents:
            if not length:
                raise LocalProtocolError("zero-length extent")
            pack_into(out, pos, length, status)
            pos += 8
    except struct.error as exc:
        raise LocalProtocolError(f"extent out of range: {exc}") from None
    return bytes(out)


def encode_error(
    cookie: int,
    error: int,
    message: str = "",
    *,
    structured: bool = False,
    offset: int | None = None,
    done: bool = True,
) -> bytes:
    """An error reply: simple when not structured, else ERROR (or ERROR_OFFSET) chunk.

    The message is cut to 4096 bytes (longer ones make libnbd drop the connection).
    """
    if not error:
        raise LocalProtocolError("encode_error() with error 0")
    if not structured:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
    msg = message.encode("utf-8", "replace")
    if len(msg) > MAX_STRING:
        msg = msg[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    flags = _DONE if done else 0
    if offset is None:
        head = _CHUNK_ERROR.pack(
            STRUCTURED_REPLY_MAGIC, flags, ChunkType.ERROR, cookie, 6 + len(msg), error, len(msg)
        )
        return head + msg
    head = _CHUNK_ERROR.pack(
        STRUCTURED_REPLY_MAGIC,
        flags,
        ChunkType.ERROR_OFFSET,
        cookie,
        14 + len(msg),
        error,
        len(msg),
    )
    return head + msg + _U64.pack(offset)


# --- host errors ------------------------------------------------------------------------------

_ERRNO_MAP: dict[int, Errno] = {
    _errno.EPERM: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.EOPNOTSUPP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def errno_from_oserror(exc: OSError) -> Errno:
    """The NBD error for a host error: EROFS/EACCES -> EPERM, EDQUOT/EFBIG -> ENOSPC, ...

    Anything without an NBD counterpart is EIO (it came from the backend's I/O, so "I/O error"
    is the honest answer; the real cause belongs in the server's log).
    """
    if exc.errno is None:
        return Errno.EIO
    return _ERRNO_MAP.get(exc.errno, Errno.EIO)
