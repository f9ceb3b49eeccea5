"""Well-formed inputs for the fuzz targets (fuzz/targets.py): a corpus to start from, so the
fuzzer mutates real sessions instead of first having to guess the magic numbers."""

from __future__ import annotations

import hashlib
from pathlib import Path

from nbdworker.protocol import ClientFlag, Command, CommandFlag, Option
from tests.support.nbdclient import (
    encode_client_flags,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    encode_request,
)

__all__ = ["seeds", "write_seeds"]

C, CF = Command, CommandFlag
GOOD_FLAGS = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES


def _requests() -> bytes:
    return b"".join(
        [
            encode_request(C.READ, cookie=1, offset=0, length=4096),
            encode_request(C.WRITE, cookie=2, offset=4096, length=8) + b"x" * 8,
            encode_request(C.WRITE, flags=CF.FUA, cookie=3, offset=0, length=0),
            encode_request(C.FLUSH, cookie=4),
            encode_request(C.TRIM, cookie=5, offset=0, length=1 << 20),
            encode_request(C.WRITE_ZEROES, flags=CF.NO_HOLE, cookie=6, length=512),
            encode_request(C.CACHE, cookie=7, length=4096),
            encode_request(C.BLOCK_STATUS, flags=CF.REQ_ONE, cookie=8, length=1 << 20),
            encode_request(C.READ, flags=CF.DF, cookie=9, offset=(64 << 20) - 512, length=1024),
            encode_request(C.DISC, cookie=10),
        ]
    )


def _handshakes() -> list[bytes]:
    flags = encode_client_flags(GOOD_FLAGS)
    sr = encode_option(Option.STRUCTURED_REPLY)
    meta = encode_meta_context_request(Option.SET_META_CONTEXT, "disk", ["base:allocation"])
    return [
        flags + encode_option(Option.LIST) + encode_option(Option.ABORT),
        flags + sr + meta + encode_info_request(Option.GO, "disk", [3]) + _requests(),
        flags + encode_info_request(Option.INFO, "ro") + encode_info_request(Option.GO, "ro"),
        flags + encode_option(Option.STARTTLS) + encode_info_request(Option.GO, "secret"),
        flags
        + encode_meta_context_request(Option.LIST_META_CONTEXT, "", ["base:"])
        + encode_option(Option.EXPORT_NAME, b"disk")
        + _requests(),
        encode_client_flags(ClientFlag.C_FIXED_NEWSTYLE) + encode_option(Option.EXPORT_NAME),
    ]


def seeds(target: str) -> list[bytes]:
    if target == "handshake":
        # byte 0: TLS mode; byte 1: how the stream is cut (0: whole)
        return [
            bytes([mode, cut]) + s for s in _handshakes() for mode in range(4) for cut in (0, 7)
        ]
    return [bytes([choice, 200]) + _requests() for choice in (0, 1, 2, 3, 0x80, 0xC1, 0xC4)]


def write_seeds(target: str, directory: Path) -> None:
    for data in seeds(target):
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
