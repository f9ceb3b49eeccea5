"""NBD wire constants and the limits this implementation enforces.

Values follow doc/proto.md of NetworkBlockDevice/nbd (see /work/shared/nbd-protocol.md, section 1).
Everything is an ``IntEnum``/``IntFlag`` so that log lines can say ``NBD_OPT_GO`` rather than ``7``.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from nbdworker.contract.config import MAX_PAYLOAD as CONTRACT_MAX_PAYLOAD

__all__ = [
    "CMD_BLOCK_STATUS",
    "CMD_CACHE",
    "CMD_DISC",
    "CMD_FLUSH",
    "CMD_READ",
    "CMD_TRIM",
    "CMD_WRITE",
    "CMD_WRITE_ZEROES",
    "EXPORT_NAME_PADDING",
    "FLAG_DF",
    "FLAG_FAST_ZERO",
    "FLAG_FUA",
    "FLAG_NO_HOLE",
    "FLAG_REQ_ONE",
    "IHAVEOPT",
    "MAX_OPTIONS",
    "MAX_OPTION_LENGTH",
    "MAX_PAYLOAD",
    "MAX_STRING",
    "META_CONTEXT_BASE_ALLOCATION",
    "NBDMAGIC",
    "OPTIONS_PER_LISTED_EXPORT",
    "REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "ChunkType",
    "ClientFlag",
    "Command",
    "CommandFlag",
    "Errno",
    "HandshakeFlag",
    "Info",
    "Option",
    "Reply",
    "ReplyFlag",
    "StateFlag",
    "TransmissionFlag",
]

# --- magics -----------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT": newstyle greeting and every option request
REPLY_MAGIC = 0x0003E889045565A9  # option replies
REQUEST_MAGIC = 0x25609513  # compact transmission request
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- limits -----------------------------------------------------------------------------------
MAX_STRING = 4096
"""Longest string (export name, description, query, message) the spec allows, in bytes."""

# The largest READ/WRITE payload we serve (the spec says no peer may treat <= 2**25 as abuse).
# Defined once, in the contract, because the web side validates max_block_size against it.
MAX_PAYLOAD = CONTRACT_MAX_PAYLOAD

MAX_OPTION_LENGTH = 1024 * 1024
"""An option claiming more data than this is a hard disconnect, decided from its header alone.

A legitimate GO is at most 4 + 4096 + 2 + 2 * 65535 bytes (~135 KiB); 1 MiB leaves room for
meta-context queries while keeping the per-connection cost small.
"""

MAX_OPTIONS = 64
"""Options allowed per handshake before the budget grows with LIST (see HandshakeLimits)."""

OPTIONS_PER_LISTED_EXPORT = 4
"""Budget added per export in the largest LIST reply: ``nbdinfo --list`` sends INFO and
LIST_META_CONTEXT (and may GO) for each listed export on one connection."""

EXPORT_NAME_PADDING = 124
"""Zero bytes after the EXPORT_NAME reply unless the client set NBD_FLAG_C_NO_ZEROES."""

META_CONTEXT_BASE_ALLOCATION = "base:allocation"


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 0x0001
    NO_ZEROES = 0x0002


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 0x00000001
    C_NO_ZEROES = 0x00000002


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 0x0001
    READ_ONLY = 0x0002
    SEND_FLUSH = 0x0004
    SEND_FUA = 0x0008
    ROTATIONAL = 0x0010
    SEND_TRIM = 0x0020
    SEND_WRITE_ZEROES = 0x0040
    SEND_DF = 0x0080
    CAN_MULTI_CONN = 0x0100
    SEND_RESIZE = 0x0200
    SEND_CACHE = 0x0400
    SEND_FAST_ZERO = 0x0800
    BLOCK_STATUS_PAYLOAD = 0x1000


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn: answered as unknown
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # experimental: answered as unknown

    def __str__(self) -> str:
        return f"NBD_OPT_{self.name}"


_REP_ERR = 1 << 31


class Reply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERR)

    def __str__(self) -> str:
        return f"NBD_REP_{self.name}"


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3

    def __str__(self) -> str:
        return f"NBD_INFO_{self.name}"


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental: refused with EINVAL

    def __str__(self) -> str:
        return f"NBD_CMD_{self.name}"


class CommandFlag(IntFlag):
    FUA = 0x0001
    NO_HOLE = 0x0002
    DF = 0x0004
    REQ_ONE = 0x0008
    FAST_ZERO = 0x0010
    PAYLOAD_LEN = 0x0020  # extended headers only


class ReplyFlag(IntFlag):
    DONE = 0x0001


class ChunkType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002

    @property
    def is_error(self) -> bool:
        return bool(self & 0x8000)


class Errno(IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108

    def __str__(self) -> str:
        return f"NBD_{self.name}"


class StateFlag(IntFlag):
    """Status bits of the ``base:allocation`` context."""

    HOLE = 0x1
    ZERO = 0x2


# --- plain ints for per-request code ----------------------------------------------------------
# Comparisons and masks with IntEnum/IntFlag members cost a Python call per operation; the
# transmission path (here and nbdworker/connection/) uses these instead.
CMD_READ = int(Command.READ)
CMD_WRITE = int(Command.WRITE)
CMD_DISC = int(Command.DISC)
CMD_FLUSH = int(Command.FLUSH)
CMD_TRIM = int(Command.TRIM)
CMD_CACHE = int(Command.CACHE)
CMD_WRITE_ZEROES = int(Command.WRITE_ZEROES)
CMD_BLOCK_STATUS = int(Command.BLOCK_STATUS)
FLAG_FUA = int(CommandFlag.FUA)
FLAG_NO_HOLE = int(CommandFlag.NO_HOLE)
FLAG_DF = int(CommandFlag.DF)
FLAG_REQ_ONE = int(CommandFlag.REQ_ONE)
FLAG_FAST_ZERO = int(CommandFlag.FAST_ZERO)
