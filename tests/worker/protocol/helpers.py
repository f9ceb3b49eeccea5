"""A small driver around Handshake for table-style tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nbdworker.protocol import (
    NEED_DATA,
    ClientFlag,
    Closed,
    Event,
    ExportView,
    Handshake,
    HandshakeLimits,
    Option,
    OptionHandled,
    Ready,
    Reply,
    StartTLS,
    TLSMode,
    TransmissionFlag,
)
from tests.support.nbdclient import (
    OptionReply,
    decode_greeting,
    decode_option_replies,
    encode_client_flags,
    encode_option,
)

F = TransmissionFlag
ALL_FLAGS = (
    F.HAS_FLAGS
    | F.SEND_FLUSH
    | F.SEND_FUA
    | F.SEND_TRIM
    | F.SEND_WRITE_ZEROES
    | F.SEND_FAST_ZERO
    | F.SEND_CACHE
    | F.CAN_MULTI_CONN
)
MIB = 1024 * 1024

DISK = ExportView("disk", "plain disk", 64 * MIB, ALL_FLAGS)
SECRET = ExportView("secret", "needs TLS", 16 * MIB, ALL_FLAGS, tls_required=True)
RO = ExportView("ro", "read-only", 8 * MIB, F.HAS_FLAGS | F.READ_ONLY | F.SEND_FLUSH)
EXPORTS = {view.name: view for view in (DISK, SECRET, RO)}
DEFAULT_EXPORT = "disk"
GOOD_CLIENT_FLAGS = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES


def lookup_in(exports: dict[str, ExportView], default: str | None = DEFAULT_EXPORT):
    def lookup(name: str) -> ExportView | None:
        if name == "" and default is not None:
            name = default
        return exports.get(name)

    return lookup


@dataclass
class Result:
    """What one exchange produced: events, raw output, and the output parsed as option replies."""

    events: list[Event]
    raw: bytes
    replies: list[OptionReply] = field(default_factory=list)

    @property
    def final(self) -> OptionReply:
        return self.replies[-1]

    @property
    def closed(self) -> Closed | None:
        return next((e for e in self.events if isinstance(e, Closed)), None)

    @property
    def ready(self) -> Ready | None:
        return next((e for e in self.events if isinstance(e, Ready)), None)

    @property
    def handled(self) -> list[OptionHandled]:
        return [e for e in self.events if isinstance(e, OptionHandled)]


class Driver:
    def __init__(
        self,
        mode: TLSMode = TLSMode.NOTLS,
        exports: dict[str, ExportView] | None = None,
        authorize: Callable[[ExportView], str | None] | None = None,
        limits: HandshakeLimits | None = None,
        client_flags: int | None = GOOD_CLIENT_FLAGS,
        default: str | None = DEFAULT_EXPORT,
    ) -> None:
        exports = EXPORTS if exports is None else exports
        kwargs = {}
        if authorize is not None:
            kwargs["authorize"] = authorize
        if limits is not None:
            kwargs["limits"] = limits
        self.hs = Handshake(
            lookup=lookup_in(exports, default),
            listing=lambda: list(exports.values()),
            tls_mode=mode,
            **kwargs,
        )
        self.greeting = self.hs.data_to_send()
        decode_greeting(self.greeting)
        self.no_zeroes = bool(client_flags and client_flags & ClientFlag.C_NO_ZEROES)
        if client_flags is not None:
            first = self.feed(encode_client_flags(client_flags))
            assert first.events == [] or isinstance(first.events[-1], Closed), first.events

    def events(self) -> list[Event]:
        out: list[Event] = []
        while True:
            event = self.hs.next_event()
            if event is NEED_DATA:
                return out
            out.append(event)
            if isinstance(event, Ready | Closed | StartTLS):
                return out

    def feed(self, data: bytes) -> Result:
        self.hs.receive_data(data)
        events = self.events()
        raw = self.hs.data_to_send()
        replies, _used = decode_option_replies(raw) if not _is_export_reply(events) else ([], 0)
        return Result(events, raw, replies)

    def option(self, code: int, data: bytes = b"") -> Result:
        return self.feed(encode_option(code, data))

    def eof(self) -> Result:
        return self.feed(b"")

    def start_tls(self) -> None:
        result = self.option(Option.STARTTLS)
        assert result.final.reply == Reply.ACK, result
        assert isinstance(result.events[-1], StartTLS), result.events
        self.hs.tls_started()


def _is_export_reply(events: list[Event]) -> bool:
    return any(
        isinstance(e, OptionHandled) and e.option == Option.EXPORT_NAME and e.reply == Reply.ACK
        for e in events
    )


def outcome(result: Result) -> str:
    """A compact name for how the last option ended, for tables."""
    last = result.events[-1] if result.events else None
    if isinstance(last, StartTLS):
        return "STARTTLS"
    if isinstance(last, Ready):
        return "READY"
    if isinstance(last, Closed):
        if last.error:
            return "DROP"
        assert result.final.reply == Reply.ACK
        return "ACK+CLOSE"
    if last is None:
        return "NEED_DATA"
    return Reply(result.final.reply).name
