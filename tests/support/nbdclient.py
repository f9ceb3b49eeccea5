"""Minimal client-side helpers: build what a client sends, parse what the server answers.

Used by the protocol's tests (round trips against the server-side encoders, tests/worker/protocol/)
and by raw-socket tests of the worker; test code, so it lives here and not in nbdworker. Not a
client implementation: no state, no validation beyond layout. Malformed input raises
``ProtocolError``; ``decode_*`` functions that take a buffer return ``None`` when it holds only
part of a message.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from nbdworker.protocol.constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from nbdworker.protocol.errors import ProtocolError

__all__ = [
    "GREETING_SIZE",
    "Chunk",
    "OptionReply",
    "SimpleReply",
    "decode_chunk",
    "decode_export_name_reply",
    "decode_greeting",
    "decode_option_replies",
    "decode_option_reply",
    "decode_reply",
    "encode_client_flags",
    "encode_info_request",
    "encode_meta_context_request",
    "encode_option",
    "encode_request",
    "parse_block_status",
    "parse_error_chunk",
    "parse_hole",
    "parse_info",
    "parse_meta_context",
    "parse_offset_data",
    "parse_server",
]

_GREETING = struct.Struct(">QQH")
GREETING_SIZE = _GREETING.size
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_EXPORT_REPLY = struct.Struct(">QH")


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"string is not UTF-8: {exc}") from None


# --- handshake --------------------------------------------------------------------------------


def decode_greeting(data: bytes) -> HandshakeFlag:
    """The handshake flags of an 18-byte fixed-newstyle greeting."""
    if len(data) < GREETING_SIZE:
        raise ProtocolError("short greeting")
    magic, opts, flags = _GREETING.unpack_from(data)
    if magic != NBDMAGIC or opts != IHAVEOPT:
        raise ProtocolError("not a newstyle greeting")
    return HandshakeFlag(flags)


def encode_client_flags(
    flags: int = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES,
) -> bytes:
    return _U32.pack(flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_info_request(option: int, name: str, infos: Iterable[int] = ()) -> bytes:
    """A whole INFO or GO option (header included)."""
    raw = name.encode("utf-8")
    types = list(infos)
    data = _U32.pack(len(raw)) + raw + _U16.pack(len(types))
    data += struct.pack(f">{len(types)}H", *types)
    return encode_option(option, data)


def encode_meta_context_request(option: int, name: str, queries: Iterable[str] = ()) -> bytes:
    """A whole LIST_META_CONTEXT or SET_META_CONTEXT option (header included)."""
    raw = name.encode("utf-8")
    encoded = [q.encode("utf-8") for q in queries]
    data = _U32.pack(len(raw)) + raw + _U32.pack(len(encoded))
    for q in encoded:
        data += _U32.pack(len(q)) + q
    return encode_option(option, data)


@dataclass(frozen=True, slots=True)
class OptionReply:
    option: Option | int
    reply: Reply | int
    data: bytes


def decode_option_reply(buf: bytes, pos: int = 0) -> tuple[OptionReply, int] | None:
    """One option reply at ``buf[pos:]`` and the position after it, or None if incomplete."""
    if len(buf) - pos < _REPLY_HEADER.size:
        return None
    magic, option, reply, length = _REPLY_HEADER.unpack_from(buf, pos)
    if magic != REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic 0x{magic:016x}")
    start = pos + _REPLY_HEADER.size
    if len(buf) - start < length:
        return None
    with contextlib.suppress(ValueError):
        option = Option(option)
    with contextlib.suppress(ValueError):
        reply = Reply(reply)
    return OptionReply(option, reply, bytes(buf[start : start + length])), start + length


def decode_option_replies(buf: bytes) -> tuple[list[OptionReply], int]:
    """Every complete option reply in ``buf``, and how many bytes they took."""
    replies: list[OptionReply] = []
    pos = 0
    while (decoded := decode_option_reply(buf, pos)) is not None:
        reply, pos = decoded
        replies.append(reply)
    return replies, pos


def decode_export_name_reply(buf: bytes, no_zeroes: bool) -> tuple[int, TransmissionFlag] | None:
    """(size, flags) from the EXPORT_NAME reply, or None if incomplete."""
    need = _EXPORT_REPLY.size + (0 if no_zeroes else EXPORT_NAME_PADDING)
    if len(buf) < need:
        return None
    size, flags = _EXPORT_REPLY.unpack_from(buf)
    if not no_zeroes and any(buf[_EXPORT_REPLY.size : need]):
        raise ProtocolError("EXPORT_NAME padding is not zero")
    return size, TransmissionFlag(flags)


def parse_info(data: bytes) -> tuple[Info | int, object]:
    """An NBD_REP_INFO payload: (type, value).

    EXPORT -> (size, flags); NAME / DESCRIPTION -> str; BLOCK_SIZE -> (min, preferred, max);
    unknown types -> the raw bytes.
    """
    if len(data) < 2:
        raise ProtocolError("INFO reply shorter than 2 bytes")
    (kind,) = _U16.unpack_from(data)
    body = data[2:]
    if kind == Info.EXPORT:
        if len(body) != 10:
            raise ProtocolError("INFO_EXPORT must be 12 bytes")
        size, flags = _EXPORT_REPLY.unpack(body)
        return Info.EXPORT, (size, TransmissionFlag(flags))
    if kind in (Info.NAME, Info.DESCRIPTION):
        return Info(kind), _text(body)
    if kind == Info.BLOCK_SIZE:
        if len(body) != 12:
            raise ProtocolError("INFO_BLOCK_SIZE must be 14 bytes")
        return Info.BLOCK_SIZE, struct.unpack(">III", body)
    return kind, body


def parse_server(data: bytes) -> tuple[str, str]:
    """An NBD_REP_SERVER payload: (name, description)."""
    if len(data) < 4:
        raise ProtocolError("SERVER reply shorter than 4 bytes")
    (namelen,) = _U32.unpack_from(data)
    if namelen > len(data) - 4:
        raise ProtocolError("SERVER name runs past the reply")
    return _text(data[4 : 4 + namelen]), _text(data[4 + namelen :])


def parse_meta_context(data: bytes) -> tuple[int, str]:
    """An NBD_REP_META_CONTEXT payload: (context id, name)."""
    if len(data) < 5:
        raise ProtocolError("META_CONTEXT reply shorter than 5 bytes")
    (context_id,) = _U32.unpack_from(data)
    return context_id, _text(data[4:])


# --- transmission -----------------------------------------------------------------------------


def encode_request(
    command: int, *, flags: int = 0, cookie: int = 0, offset: int = 0, length: int = 0
) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


@dataclass(frozen=True, slots=True)
class SimpleReply:
    error: int
    cookie: int


@dataclass(frozen=True, slots=True)
class Chunk:
    flags: int
    type: ChunkType | int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & 1)


def decode_chunk(buf: bytes, pos: int = 0) -> tuple[Chunk, int] | None:
    """One structured reply chunk at ``buf[pos:]`` and the position after it."""
    if len(buf) - pos < _CHUNK.size:
        return None
    magic, flags, kind, cookie, length = _CHUNK.unpack_from(buf, pos)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic 0x{magic:08x}")
    start = pos + _CHUNK.size
    if len(buf) - start < length:
        return None
    with contextlib.suppress(ValueError):
        kind = ChunkType(kind)
    return Chunk(flags, kind, cookie, bytes(buf[start : start + length])), start + length


def decode_reply(buf: bytes, pos: int = 0) -> tuple[SimpleReply | Chunk, int] | None:
    """A simple reply (header only: READ data is the caller's to take) or a chunk."""
    if len(buf) - pos < 4:
        return None
    (magic,) = _U32.unpack_from(buf, pos)
    if magic == SIMPLE_REPLY_MAGIC:
        if len(buf) - pos < _SIMPLE.size:
            return None
        _, error, cookie = _SIMPLE.unpack_from(buf, pos)
        return SimpleReply(error, cookie), pos + _SIMPLE.size
    if magic == STRUCTURED_REPLY_MAGIC:
        return decode_chunk(buf, pos)
    raise ProtocolError(f"bad reply magic 0x{magic:08x}")


def parse_offset_data(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 9:
        raise ProtocolError("OFFSET_DATA payload shorter than 9 bytes")
    (offset,) = struct.unpack_from(">Q", payload)
    return offset, payload[8:]


def parse_hole(payload: bytes) -> tuple[int, int]:
    if len(payload) != 12:
        raise ProtocolError("OFFSET_HOLE payload must be 12 bytes")
    offset, length = struct.unpack(">QI", payload)
    return offset, length


def parse_block_status(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, status), ...])."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise ProtocolError("BLOCK_STATUS payload must be 4 + 8n bytes, n >= 1")
    (context_id,) = _U32.unpack_from(payload)
    flat = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
    return context_id, list(zip(flat[::2], flat[1::2], strict=True))


def parse_error_chunk(chunk: Chunk) -> tuple[int, str, int | None]:
    """(error, message, offset or None) of an ERROR / ERROR_OFFSET chunk."""
    payload = chunk.payload
    if len(payload) < 6:
        raise ProtocolError("error chunk shorter than 6 bytes")
    error, msglen = struct.unpack_from(">IH", payload)
    extra = 8 if chunk.type == ChunkType.ERROR_OFFSET else 0
    if 6 + msglen + extra != len(payload):
        raise ProtocolError("error chunk message length does not match")
    message = _text(payload[6 : 6 + msglen])
    offset = struct.unpack_from(">Q", payload, 6 + msglen)[0] if extra else None
    return error, message, offset
