"""Server side of NBD option negotiation (fixed newstyle), sans-IO.

Bytes go in with ``receive_data``; ``next_event`` returns ``OptionHandled`` / ``StartTLS`` /
``Ready`` / ``Closed`` events or ``NEED_DATA``; replies accumulate in ``data_to_send``.

Costs are bounded by construction: an option's header is judged before its data is read, an
option longer than ``HandshakeLimits.max_option_length`` ends the connection unread, data that
will not be parsed (unknown options, TLS-gated options, data where none is allowed) is discarded
as it arrives instead of being buffered, and the number of options is budgeted (see
``HandshakeLimits``). ``NEED_DATA`` is therefore only ever returned with fewer than
``16 + max_option_length`` bytes buffered.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, auto
from functools import partial

from .constants import (
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_STRING,
    META_CONTEXT_BASE_ALLOCATION,
    NBDMAGIC,
    OPTIONS_PER_LISTED_EXPORT,
    REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from .errors import LocalProtocolError
from .events import (
    NEED_DATA,
    Closed,
    Event,
    ExportView,
    NeedData,
    OptionHandled,
    Ready,
    StartTLS,
)
from .tlsmode import TLSMode, export_needs_tls, option_needs_tls, tls_possible

__all__ = [
    "BASE_ALLOCATION_ID",
    "GREETING_FLAGS",
    "Handshake",
    "HandshakeLimits",
    "final_transmission_flags",
]

GREETING_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# Plain ints: ``~`` on an IntFlag only complements the defined bits, which would hide unknown
# bits from the check.
_C_FIXED_NEWSTYLE = int(ClientFlag.C_FIXED_NEWSTYLE)
_C_NO_ZEROES = int(ClientFlag.C_NO_ZEROES)
_KNOWN_CLIENT_FLAGS = _C_FIXED_NEWSTYLE | _C_NO_ZEROES
_NO_ZEROES_OFFERED = bool(GREETING_FLAGS & HandshakeFlag.NO_ZEROES)

BASE_ALLOCATION_ID = 1
"""Context id of ``base:allocation`` after SET_META_CONTEXT (ids are per connection; 0 is
reserved for LIST_META_CONTEXT replies, so we avoid it)."""

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_PADDING = bytes(EXPORT_NAME_PADDING)
# Every connection starts with the same 18 bytes.
_GREETING_BYTES = _GREETING.pack(NBDMAGIC, IHAVEOPT, GREETING_FLAGS)

# Flags an export may pass through to the client. SEND_DF is added only with structured
# replies; the experimental RESIZE / BLOCK_STATUS_PAYLOAD and reserved bits are never sent.
_SERVABLE_FLAGS = int(
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.READ_ONLY
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.ROTATIONAL
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.SEND_FAST_ZERO
)

_HAS_FLAGS = int(TransmissionFlag.HAS_FLAGS)
_SEND_WRITE_ZEROES = int(TransmissionFlag.SEND_WRITE_ZEROES)
_SEND_FAST_ZERO = int(TransmissionFlag.SEND_FAST_ZERO)
_SEND_DF = int(TransmissionFlag.SEND_DF)


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    """Per-connection budgets; exceeding any of them is a hard disconnect.

    The option budget is ``max_options + options_per_listed_export * N`` where N is the size of
    the largest LIST reply sent on this connection (not a running sum, so repeating LIST does
    not buy more options). With the defaults, ``nbdinfo --list`` of up to ~hundreds of exports
    fits, while a client looping on options is cut off.
    """

    max_options: int = MAX_OPTIONS
    options_per_listed_export: int = OPTIONS_PER_LISTED_EXPORT
    max_option_length: int = MAX_OPTION_LENGTH


class _State(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TLS_PENDING = auto()  # STARTTLS acked; waiting for the caller's tls_started()
    DONE = auto()  # Ready emitted: transmission
    CLOSED = auto()


# Module globals: cheaper to reach than enum class attributes on every step.
_S_CLIENT_FLAGS = _State.CLIENT_FLAGS
_S_OPTIONS = _State.OPTIONS
_S_TLS_PENDING = _State.TLS_PENDING
_S_DONE = _State.DONE
_S_CLOSED = _State.CLOSED
_DEFAULT_LIMITS = HandshakeLimits()
_ACK = Reply.ACK
_INFO = Reply.INFO
# The ACK reply header of each option code we answer (no data): packed once.
_ACK_HEADERS = {
    int(option): _REPLY_HEADER.pack(REPLY_MAGIC, option, Reply.ACK, 0) for option in Option
}


_OPTIONS_BY_CODE = {int(option): option for option in Option}


def _known_option(code: int) -> Option | int:
    return _OPTIONS_BY_CODE.get(code, code)


def _encode_string(text: str) -> bytes:
    """UTF-8, cut at a character boundary to the spec's 4096-byte limit."""
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_STRING:
        data = data[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return data


def _decode_string(data: bytes) -> str | None:
    """A protocol string, or None when it is not one (bad UTF-8, NUL, too long)."""
    if len(data) > MAX_STRING or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def final_transmission_flags(view: ExportView, structured: bool) -> TransmissionFlag:
    """The transmission flags the client is sent for ``view``."""
    flags = (int(view.flags) | _HAS_FLAGS) & _SERVABLE_FLAGS
    if not flags & _SEND_WRITE_ZEROES:
        # The spec forbids FAST_ZERO without WRITE_ZEROES.
        flags &= ~_SEND_FAST_ZERO
    if structured:
        flags |= _SEND_DF
    result = _FLAG_VALUES.get(flags)
    if result is None:
        result = _FLAG_VALUES[flags] = TransmissionFlag(flags)
    return result


# TransmissionFlag(int) goes through the enum machinery (microseconds): cached per value
# (at most 2**16 of them; a worker sees a handful).
_FLAG_VALUES: dict[int, TransmissionFlag] = {}


class _Malformed(Exception):
    """Internal: the option data does not fit its layout (answered ERR_INVALID)."""


class Handshake:
    """One connection's negotiation, from greeting to transmission (or close)."""

    def __init__(
        self,
        lookup: Callable[[str], ExportView | None],
        listing: Callable[[], Iterable[ExportView]],
        tls_mode: TLSMode = TLSMode.NOTLS,
        authorize: Callable[[ExportView], str | None] = lambda view: None,
        limits: HandshakeLimits = _DEFAULT_LIMITS,
    ) -> None:
        self._lookup = lookup
        self._listing = listing
        self._tls_mode = tls_mode
        self._authorize = authorize
        self._limits = limits

        self._state = _S_CLIENT_FLAGS
        self._buf = bytearray()
        self._out = bytearray(_GREETING_BYTES)
        self._events: deque[Event] = deque()
        self._terminal: Ready | Closed | None = None
        self._eof = False
        self._shutting_down = False

        self._fixed_newstyle = False
        self._no_zeroes = False
        self._tls_active = False
        self._options_seen = 0
        self._largest_listing = 0

        # The option being received: code, bytes still expected, and what to do once they are in.
        # ``_cur_discard``: the data is dropped as it arrives (the answer does not depend on it).
        self._cur_code: int | None = None
        self._cur_remaining = 0
        self._cur_discard = False
        self._cur_then: Callable[[Handshake, int, bytes], None] | None = None

        # Negotiated state, all forgotten at tls_started().
        self._structured = False
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}

    # --- public API ---------------------------------------------------------------------------

    @property
    def tls_mode(self) -> TLSMode:
        return self._tls_mode

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def buffered(self) -> int:
        """Received bytes not yet consumed (for tests and the caller's own accounting)."""
        return len(self._buf)

    @property
    def options_seen(self) -> int:
        return self._options_seen

    def data_to_send(self) -> bytes:
        """Everything queued for the peer so far; the queue is then empty."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means EOF."""
        if self._state is _S_CLOSED:
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA``. After Ready or Closed, that event again."""
        while not self._events:
            if self._terminal is not None:
                return self._terminal
            if not self._step():
                return NEED_DATA
        return self._events.popleft()

    def trailing_data(self) -> bytes:
        """Bytes received after the final option (the start of transmission); then cleared."""
        if self._state is not _State.DONE:
            raise LocalProtocolError("trailing_data() before Ready")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def tls_started(self) -> None:
        """The caller completed the TLS handshake: forget everything negotiated before it."""
        if self._state is not _State.TLS_PENDING:
            raise LocalProtocolError(f"tls_started() in state {self._state.name}")
        self._tls_active = True
        self._structured = False
        self._meta_export = None
        self._meta_contexts = {}
        self._largest_listing = 0
        self._state = _State.OPTIONS

    def start_shutdown(self) -> None:
        """Answer every further option but ABORT with ERR_SHUTDOWN."""
        self._shutting_down = True

    # --- the receive loop ---------------------------------------------------------------------

    def _step(self) -> bool:
        """Consume one unit of input; False when more data is needed."""
        state = self._state
        if state is _S_OPTIONS:
            if self._cur_code is None:
                return self._read_option_header()
            return self._read_option_data()
        if state is _S_CLIENT_FLAGS:
            return self._read_client_flags()
        if state is _S_TLS_PENDING:
            if self._buf:
                self._close("plaintext received after STARTTLS", error=True)
                return True
            if self._eof:
                self._close("EOF before the TLS handshake", error=False)
                return True
            return False
        raise LocalProtocolError(f"no input expected in state {state.name}")  # pragma: no cover

    def _need_more(self, at_boundary: bool) -> bool:
        if self._eof:
            if at_boundary and not self._buf:
                self._close("EOF during negotiation", error=False)
            else:
                self._close("EOF in the middle of a message", error=True)
            return True
        return False

    def _read_client_flags(self) -> bool:
        if len(self._buf) < _CLIENT_FLAGS.size:
            return self._need_more(at_boundary=True)
        (flags,) = _CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[: _CLIENT_FLAGS.size]
        if flags & ~_KNOWN_CLIENT_FLAGS:
            self._close(f"unknown client flags 0x{flags:08x}", error=True)
            return True
        # C_NO_ZEROES is only legal because we always offer NO_ZEROES; the check is the
        # GREETING_FLAGS constant, kept explicit in case the greeting ever changes.
        if flags & _C_NO_ZEROES and not _NO_ZEROES_OFFERED:
            self._close("client set NO_ZEROES that was not offered", error=True)  # pragma: no cover
            return True
        self._fixed_newstyle = bool(flags & _C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & _C_NO_ZEROES)
        self._state = _S_OPTIONS
        return True

    def _read_option_header(self) -> bool:
        if len(self._buf) < _OPTION_HEADER.size:
            return self._need_more(at_boundary=True)
        magic, code, length = _OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            self._close(f"bad option magic 0x{magic:016x}", error=True)
            return True
        del self._buf[: _OPTION_HEADER.size]
        self._options_seen += 1
        limits = self._limits
        budget = limits.max_options + limits.options_per_listed_export * self._largest_listing
        if self._options_seen > budget:
            self._close(f"too many options (budget {budget})", error=True)
            return True
        if length > limits.max_option_length:
            self._close(
                f"{_known_option(code)} length {length} exceeds {limits.max_option_length}",
                error=True,
            )
            return True
        self._dispatch(code, length)
        return True

    def _read_option_data(self) -> bool:
        remaining = self._cur_remaining
        if self._cur_discard:
            n = min(remaining, len(self._buf))
            if n:
                del self._buf[:n]
                remaining = self._cur_remaining = remaining - n
        elif len(self._buf) >= remaining:
            remaining = 0
        if remaining:
            return self._need_more(at_boundary=False)
        data = b""
        if not self._cur_discard:
            data = bytes(self._buf[: self._cur_remaining])
            del self._buf[: self._cur_remaining]
        then = self._cur_then
        code = self._cur_code
        self._cur_code = None
        self._cur_then = None
        self._cur_remaining = 0
        assert then is not None and code is not None
        then(self, code, data)
        return True

    def _expect(
        self,
        code: int,
        length: int,
        then: Callable[[Handshake, int, bytes], None],
        discard: bool,
    ) -> None:
        self._cur_code = code
        self._cur_remaining = length
        self._cur_discard = discard
        self._cur_then = then

    # --- dispatch: decisions that need only the header ----------------------------------------

    def _dispatch(self, code: int, length: int) -> None:
        option = _known_option(code)

        if option is Option.ABORT:
            # Any data is ignored (the spec asks servers to tolerate it), but still consumed.
            self._expect(code, length, Handshake._handle_abort, discard=True)
            return

        refusal = self._header_refusal(option, code, length)
        if refusal is not None:
            reply, detail = refusal
            if option is Option.EXPORT_NAME:
                # No error can be expressed: hard disconnect without reading the name.
                self._events.append(OptionHandled(option, reply, detail))
                self._close(f"{option}: {detail}", error=True)
                return
            self._expect(code, length, partial(_refuse_after, reply, detail), True)
            return

        self._expect(code, length, self._HANDLERS[option], discard=False)

    def _header_refusal(
        self, option: Option | int, code: int, length: int
    ) -> tuple[Reply, str] | None:
        if self._shutting_down:
            return Reply.ERR_SHUTDOWN, "server shutting down"
        if option_needs_tls(self._tls_mode, code, self._tls_active):
            return Reply.ERR_TLS_REQD, "TLS required"
        if option not in self._HANDLERS:
            return Reply.ERR_UNSUP, "unsupported option"
        if option in _NO_DATA_OPTIONS and length:
            return Reply.ERR_INVALID, "option takes no data"
        if option is Option.EXPORT_NAME and length > MAX_STRING:
            return Reply.ERR_INVALID, "export name too long"
        return None

    # --- replies ------------------------------------------------------------------------------

    def _reply(self, code: int, reply: Reply, data: bytes = b"") -> None:
        self._out += _REPLY_HEADER.pack(REPLY_MAGIC, code, reply, len(data))
        self._out += data

    def _refuse(self, code: int, reply: Reply, detail: str, message: str | None = None) -> None:
        """An error reply (with a short message for the client) and its OptionHandled event."""
        self._reply(code, reply, _encode_string(detail if message is None else message))
        self._events.append(OptionHandled(_known_option(code), reply, detail))

    def _ack(self, code: int, detail: str = "") -> None:
        header = _ACK_HEADERS.get(code)
        if header is None:  # pragma: no cover - every acked option is a known one
            header = _REPLY_HEADER.pack(REPLY_MAGIC, code, _ACK, 0)
        self._out += header
        self._events.append(OptionHandled(_known_option(code), _ACK, detail))

    def _close(self, reason: str, error: bool) -> None:
        event = Closed(reason, error)
        self._state = _S_CLOSED
        self._terminal = event
        self._events.append(event)
        self._buf.clear()

    def _ready(self, view: ExportView, block_size_requested: bool, flags: TransmissionFlag) -> None:
        contexts = dict(self._meta_contexts) if self._meta_export == view.name else {}
        event = Ready(
            export=view,
            structured=self._structured,
            meta_contexts=contexts,
            flags=flags,
            no_zeroes=self._no_zeroes,
            tls=self._tls_active,
            block_size_requested=block_size_requested,
        )
        self._state = _S_DONE
        self._terminal = event
        self._events.append(event)

    # --- export resolution --------------------------------------------------------------------

    def _resolve(self, name: str) -> tuple[ExportView | None, Reply, str]:
        """(view, ACK, "") when ``name`` may be opened now, else (None, error, detail)."""
        view = self._lookup(name)
        if view is None:
            return None, Reply.ERR_UNKNOWN, f"unknown export {name!r}"
        if export_needs_tls(self._tls_mode, view.tls_required, self._tls_active):
            return None, Reply.ERR_TLS_REQD, f"TLS required for export {name!r}"
        reason = self._authorize(view)
        if reason is not None:
            return None, Reply.ERR_POLICY, f"not authorized for export {name!r}: {reason}"
        return view, Reply.ACK, ""

    def _visible(self, view: ExportView) -> bool:
        """Whether LIST shows ``view`` (and meta-context options may name it)."""
        if export_needs_tls(self._tls_mode, view.tls_required, self._tls_active):
            return False
        return self._authorize(view) is None

    # --- option handlers (data complete, header checks passed) --------------------------------

    def _handle_abort(self, _code: int, _data: bytes) -> None:
        # ACKed even while shutting down; the client may hang up before reading it.
        self._ack(Option.ABORT)
        self._close("client sent NBD_OPT_ABORT", error=False)

    def _handle_export_name(self, code: int, data: bytes) -> None:
        name = _decode_string(data)
        if name is None:
            view, reply, detail = None, Reply.ERR_INVALID, "export name is not a valid string"
        else:
            view, reply, detail = self._resolve(name)
        if view is None:
            self._events.append(OptionHandled(Option.EXPORT_NAME, reply, detail))
            self._close(f"{Option.EXPORT_NAME}: {detail}", error=True)
            return
        flags = final_transmission_flags(view, self._structured)
        self._out += _EXPORT_NAME_REPLY.pack(view.size, flags)
        if not self._no_zeroes:
            self._out += _PADDING
        self._events.append(OptionHandled(Option.EXPORT_NAME, Reply.ACK, f"export {view.name!r}"))
        self._ready(view, False, flags)

    def _handle_list(self, code: int, _data: bytes) -> None:
        count = 0
        for view in self._listing():
            if not self._visible(view):
                continue
            name = view.name.encode("utf-8")
            self._reply(
                code, Reply.SERVER, _U32.pack(len(name)) + name + _encode_string(view.description)
            )
            count += 1
        self._largest_listing = max(self._largest_listing, count)
        self._ack(code, f"{count} exports listed")

    def _handle_starttls(self, code: int, _data: bytes) -> None:
        if self._tls_active:
            self._refuse(code, Reply.ERR_INVALID, "TLS already active")
            return
        if not tls_possible(self._tls_mode, self._fixed_newstyle):
            if self._tls_mode is TLSMode.NOTLS:
                self._refuse(code, Reply.ERR_POLICY, "TLS not offered by this server")
            else:
                self._refuse(code, Reply.ERR_POLICY, "TLS requires fixed newstyle negotiation")
            return
        if self._buf:
            # The client may not send anything until it has read our ACK: whatever is buffered
            # now is plaintext that must never reach the TLS layer (nbdkit CVE-2021-3716 class).
            self._events.append(
                OptionHandled(Option.STARTTLS, Reply.ERR_INVALID, "data sent after STARTTLS")
            )
            self._close("plaintext received after STARTTLS", error=True)
            return
        self._ack(code, "starting TLS")
        self._events.append(StartTLS())
        self._state = _State.TLS_PENDING

    def _handle_info_go(self, code: int, data: bytes) -> None:
        try:
            name, infos = _parse_info_request(data)
        except _Malformed as exc:
            self._refuse(code, Reply.ERR_INVALID, str(exc))
            return
        view, reply, detail = self._resolve(name)
        if view is None:
            # The reason from authorize() is for our logs only; the client gets a fixed text.
            message = "access denied" if reply is Reply.ERR_POLICY else detail
            self._refuse(code, reply, detail, message)
            return
        flags = final_transmission_flags(view, self._structured)
        # INFO_EXPORT always, and first: qemu never asks for it but fails without it.
        self._out += _INFO_EXPORT_REPLY.pack(
            REPLY_MAGIC, code, _INFO, _INFO_EXPORT.size, Info.EXPORT, view.size, flags
        )
        if Info.NAME in infos:
            self._reply(code, Reply.INFO, _U16.pack(Info.NAME) + _encode_string(view.name))
        if Info.DESCRIPTION in infos:
            self._reply(
                code, Reply.INFO, _U16.pack(Info.DESCRIPTION) + _encode_string(view.description)
            )
        block_size_requested = Info.BLOCK_SIZE in infos
        if block_size_requested:
            self._reply(
                code,
                Reply.INFO,
                _INFO_BLOCK_SIZE.pack(
                    Info.BLOCK_SIZE, view.min_block, view.preferred_block, view.max_block
                ),
            )
        self._ack(code, f"export {view.name!r}")
        if code == _OPT_GO:
            self._ready(view, block_size_requested, flags)

    def _handle_structured_reply(self, code: int, _data: bytes) -> None:
        if self._structured:
            self._refuse(code, Reply.ERR_INVALID, "structured replies already negotiated")
            return
        self._structured = True
        self._ack(code, "structured replies on")

    def _handle_meta_context(self, code: int, data: bytes) -> None:
        is_set = code == Option.SET_META_CONTEXT
        if is_set:
            # SET replaces the selection even when it fails.
            self._meta_export = None
            self._meta_contexts = {}
            if not self._structured:
                self._refuse(code, Reply.ERR_INVALID, "structured replies not negotiated")
                return
        try:
            name, queries = _parse_meta_context_request(data)
        except _Malformed as exc:
            self._refuse(code, Reply.ERR_INVALID, str(exc))
            return
        view = self._lookup(name)
        if view is None or not self._visible(view):
            # TLS-only and unauthorized exports look unknown here: TLS_REQD is not allowed for
            # these options, and UNKNOWN does not reveal that the export exists.
            self._refuse(code, Reply.ERR_UNKNOWN, f"unknown export {name!r}", "unknown export")
            return
        selected = _match_contexts(queries, listing=not is_set)
        if is_set:
            for context in selected:
                self._reply(code, Reply.META_CONTEXT, _U32.pack(BASE_ALLOCATION_ID) + context)
            if selected:
                self._meta_export = view.name
                self._meta_contexts = {BASE_ALLOCATION_ID: META_CONTEXT_BASE_ALLOCATION}
        else:
            for context in selected:
                self._reply(code, Reply.META_CONTEXT, _U32.pack(0) + context)
        self._ack(code, f"{len(selected)} contexts for export {view.name!r}")

    _HANDLERS: dict[Option | int, Callable[[Handshake, int, bytes], None]] = {
        Option.EXPORT_NAME: _handle_export_name,
        Option.LIST: _handle_list,
        Option.STARTTLS: _handle_starttls,
        Option.INFO: _handle_info_go,
        Option.GO: _handle_info_go,
        Option.STRUCTURED_REPLY: _handle_structured_reply,
        Option.LIST_META_CONTEXT: _handle_meta_context,
        Option.SET_META_CONTEXT: _handle_meta_context,
    }


def _refuse_after(reply: Reply, detail: str, hs: Handshake, code: int, _data: bytes) -> None:
    hs._refuse(code, reply, detail)


_OPT_GO = int(Option.GO)
# Reply header and INFO_EXPORT payload in one pack.
_INFO_EXPORT_REPLY = struct.Struct(">QIII" + _INFO_EXPORT.format.lstrip(">"))
_NO_DATA_OPTIONS = frozenset({Option.LIST, Option.STARTTLS, Option.STRUCTURED_REPLY})
_BASE_ALLOCATION = META_CONTEXT_BASE_ALLOCATION.encode()


def _parse_info_request(data: bytes) -> tuple[str, frozenset[int]]:
    """INFO/GO data: u32 namelen, name, u16 n, n x u16 info type."""
    size = len(data)
    if size < 6:
        raise _Malformed("INFO/GO data shorter than 6 bytes")
    (namelen,) = _U32.unpack_from(data)
    if namelen > MAX_STRING:
        raise _Malformed("export name too long")
    if namelen > size - 6:
        raise _Malformed("export name runs past the option")
    (count,) = _U16.unpack_from(data, 4 + namelen)
    if size != 6 + namelen + 2 * count:
        raise _Malformed("INFO/GO length does not match its info requests")
    name = _decode_string(data[4 : 4 + namelen])
    if name is None:
        raise _Malformed("export name is not a valid string")
    # Duplicates are a client error the spec asks us to tolerate: answer each type once.
    infos = frozenset(struct.unpack_from(f">{count}H", data, 6 + namelen))
    return name, infos


def _parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """LIST/SET_META_CONTEXT data: u32 namelen, name, u32 q, q x (u32 len, query)."""
    size = len(data)
    if size < 8:
        raise _Malformed("meta context data shorter than 8 bytes")
    (namelen,) = _U32.unpack_from(data)
    if namelen > MAX_STRING:
        raise _Malformed("export name too long")
    if namelen > size - 8:
        raise _Malformed("export name runs past the option")
    name = _decode_string(data[4 : 4 + namelen])
    if name is None:
        raise _Malformed("export name is not a valid string")
    pos = 4 + namelen
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    # Each query needs at least 4 bytes, so this loop is bounded by the option length even if
    # the claimed count is 2**32 - 1.
    for _ in range(count):
        if size - pos < 4:
            raise _Malformed("query count runs past the option")
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > MAX_STRING:
            raise _Malformed("query too long")
        if qlen > size - pos:
            raise _Malformed("query runs past the option")
        query = _decode_string(data[pos : pos + qlen])
        if query is None:
            raise _Malformed("query is not a valid string")
        queries.append(query)
        pos += qlen
    if pos != size:
        raise _Malformed("trailing bytes after the queries")
    return name, queries


def _match_contexts(queries: list[str], listing: bool) -> list[bytes]:
    """Contexts selected by ``queries``: only base:allocation exists.

    ``base:`` is a wildcard for LIST and must be ignored by SET; anything else that does not
    name base:allocation (unknown leaves, unknown namespaces, odd strings) is silently ignored.
    An empty query list means "everything" for LIST and "nothing" for SET.
    """
    if not queries:
        return [_BASE_ALLOCATION] if listing else []
    for query in queries:
        if query == META_CONTEXT_BASE_ALLOCATION or (listing and query == "base:"):
            return [_BASE_ALLOCATION]
    return []
