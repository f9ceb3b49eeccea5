"""What the handshake reports to its caller, and the export as the protocol sees it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import MAX_PAYLOAD, MAX_STRING, Option, Reply, TransmissionFlag

__all__ = [
    "NEED_DATA",
    "Closed",
    "Event",
    "ExportView",
    "NeedData",
    "OptionHandled",
    "Ready",
    "StartTLS",
]


@dataclass(frozen=True, slots=True)
class ExportView:
    """One export, reduced to what negotiation and request validation need."""

    name: str
    description: str
    size: int
    # HAS_FLAGS | READ_ONLY | SEND_FLUSH | ... as the export allows; never SEND_DF (the handshake
    # adds it when structured replies are on).
    flags: TransmissionFlag
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD
    tls_required: bool = False  # honoured in SELECTIVETLS only

    def __post_init__(self) -> None:
        # Only what the wire cannot carry is checked here (once per export, not per
        # connection), so that a bad view fails where it is built instead of as a struct.error
        # in the middle of a handshake. Policy (powers of two, alignment) is the config's job.
        if not 0 <= self.size < 1 << 64:
            raise ValueError(f"export size {self.size} does not fit in 64 bits")
        if not 0 <= int(self.flags) <= 0xFFFF:
            raise ValueError(f"transmission flags 0x{int(self.flags):x} do not fit in 16 bits")
        for field_name in ("min_block", "preferred_block", "max_block"):
            value = getattr(self, field_name)
            if not 1 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{field_name} {value} outside 1 .. 2**32-1")
        if len(self.name.encode("utf-8")) > MAX_STRING:
            raise ValueError("export name longer than 4096 bytes")


class NeedData:
    """Sentinel type: feed more bytes with ``receive_data`` before asking again."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """One option was answered (informational: for logs and metrics).

    ``reply`` is ACK or the error sent; for an EXPORT_NAME that ends in a disconnect it is the
    error the option would have earned, and a ``Closed`` event follows. ``option`` is an
    ``Option`` when the code is known, else the raw integer.
    """

    option: Option | int
    reply: Reply
    detail: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The plaintext ACK to STARTTLS is queued: send it, then run the TLS handshake as server."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The reply to GO / EXPORT_NAME is queued: send it and enter transmission."""

    export: ExportView
    structured: bool
    meta_contexts: dict[int, str]
    flags: TransmissionFlag  # exactly what the client was sent (SEND_DF added when structured)
    no_zeroes: bool
    tls: bool = False  # TLS was active when the export was opened
    block_size_requested: bool = False  # GO asked for NBD_INFO_BLOCK_SIZE (the client obeys it)


@dataclass(frozen=True, slots=True)
class Closed:
    """End the connection after sending ``data_to_send()``.

    ``error`` is False for ABORT and for EOF at a message boundary.
    """

    reason: str
    error: bool = field(default=True)


Event = OptionHandled | StartTLS | Ready | Closed
