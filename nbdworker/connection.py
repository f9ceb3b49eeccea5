"""One NBD connection: greeting, handshake under a deadline, then the transmission loop.

The whole connection is one `asyncio.BufferedProtocol`, so the transport never changes hands
(no StreamReader/StreamWriter to keep alive) and a later STARTTLS can wrap the same protocol
with `loop.start_tls`.

Performance notes (measured with nbdcopy and fio against nbdkit, see bench/README.md):

* A plain connection in transmission is served by a thread of its own (_serve): blocking on
  its socket, it parses, dispatches and replies with the same code the event loop runs for TLS
  connections. The GIL is released in every recv, pwrite, sendfile and writev, so the
  connections of a multi-connection client copy on all CPUs at once, as nbdkit's threads do:
  nbdcopy's default (multi-connection) writes went from ~0.87x to ~0.94x nbdkit, reads from
  ~1.0x to ~1.03x, in the same runs.
* Requests are parsed straight out of one receive buffer and dispatched as soon as they are
  complete; replies are written as each request finishes, so many requests are in flight while
  earlier replies are still queued (pipelining). Reading stops only when
  `max_inflight_per_connection` requests (or MAX_INFLIGHT_BYTES) wait on the thread pool, or
  WRITE_HIGH_WATER bytes of replies are unsent.
* Plain connections write replies through their own queue (nbdworker/sockwriter.py): the
  replies of one pass over the receive buffer go out with one writev, large reads with
  sendfile, in order. Over TLS every reply is one transport write: header and data in one
  buffer (small reads, read into place with `preadv`), or `writelines([header, data])` (large
  reads). TCP_NODELAY is on (asyncio and uvloop set it on every TCP transport).
* Small reads try `preadv(RWF_NOWAIT)` first: page-cache hits cost no thread hop; a miss
  finishes in the thread pool. Large reads from the page cache (one-page RWF_NOWAIT probe) go
  out with `os.sendfile` on plain connections (no copy through Python), over TLS with
  `os.pread` (no zero-filled buffer) and `writelines`. Plain writes go to the page cache inline
  (ext4 refuses RWF_NOWAIT for buffered writes, and a thread hop per 4 KiB write costs more
  than the write). FLUSH, FUA, trim, zero, cache and block status always run in the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as host_errno
import fcntl
import logging
import os
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections import deque
from concurrent.futures import Executor
from typing import Protocol

from nbdworker.auth import ExportAuthorizer
from nbdworker.backends import STATE_HOLE, STATE_ZERO, Backend
from nbdworker.contract.config import ExportConfig
from nbdworker.exports import ExportEntry, ServerState
from nbdworker.protocol import (
    NEED_DATA,
    REQUEST_HEADER,
    Closed,
    Command,
    CommandFlag,
    Errno,
    ExportView,
    Handshake,
    HandshakeLimits,
    Option,
    OptionHandled,
    ProtocolError,
    Ready,
    Reply,
    Session,
    StartTLS,
    decode_request,
    encode_block_status,
    encode_error,
    encode_hole_chunk,
    encode_none_chunk,
    encode_read_data_header,
    encode_read_data_header_into,
    encode_simple_reply,
    errno_from_oserror,
    read_data_header_size,
)
from nbdworker.reload import ending_reason
from nbdworker.session import BYTES, HandshakeFailure, SessionRecord, format_peer
from nbdworker.settings import WorkerSettings
from nbdworker.sockwriter import SocketWriter
from nbdworker.spin import IdleSpinner
from nbdworker.tls import check_peer

__all__ = ["ConnectionHost", "NBDConnection"]

log = logging.getLogger("nbdworker.connection")

HEADER = REQUEST_HEADER.size
# Receive buffer for the transmission phase. A write payload that does not fit in what is left
# of it is streamed: written to the backend piece by piece as it arrives, so no payload is ever
# copied inside the worker or held whole (a 32 MiB write costs no 32 MiB buffer). 4 MiB rather
# than 1 MiB halved nbdcopy --connections=1 write time (fewer, larger reads).
RECV_BUFFER = 4 << 20
# An unparsed tail up to this long is moved to the front of the buffer rather than streamed:
# a memmove of a few KiB costs less than the extra pwrite.
MOVE_TAIL = 64 * 1024
# Connections start with one page (a fresh 64 KiB buffer cost ~40 us of page faults and zeroing
# per connection in a socketless connect benchmark: 100 -> 57 us) and grow at the first request
# that does not fit: to 64 KiB for small writes, to RECV_BUFFER for larger ones.
INITIAL_RECV_BUFFER = 4096
SMALL_RECV_BUFFER = 64 * 1024
# The handshake parser keeps its own buffer: this one only has to take each read.
HANDSHAKE_BUFFER = 4096
# The transport stops our reading at this many buffered reply bytes: deep enough for nbdcopy's
# 64 x 256 KiB in flight, bounded per connection.
WRITE_HIGH_WATER = 16 << 20
WRITE_LOW_WATER = 4 << 20
# Payload bytes a connection may hold in thread-pool jobs (cold reads, FUA writes) before it
# stops reading: with the request cap alone, 64 cold 32 MiB reads would pin 2 GiB.
MAX_INFLIGHT_BYTES = 64 << 20
# Structured reads at least this long are checked for holes (two lseeks): below it a hole
# chunk saves nothing worth the syscalls.
SPARSE_READ_MIN = 64 * 1024
# Block status: at most this many descriptors per chunk (spec: SHOULD be <= 2**20), each
# below 2**32 and kept 512-aligned.
MAX_DESCRIPTORS = 1 << 20
MAX_EXTENT = 0xFFFFFFFF & ~511
# Reads up to this size go through preadv(RWF_NOWAIT) into one reply buffer; larger ones
# through os.pread (see _read).
SMALL_READ = 64 * 1024
# Over TLS, replies produced while handling one batch of received requests are written together
# (every transport write is a TLS record and a send()): 4 KiB random reads at queue depth 16 gain
# about 15%. Past this many bytes the batch is written at once, so the transport's high-water
# mark still stops the parsing loop.
TLS_CORK_LIMIT = 256 * 1024
# Over TLS, uvloop encrypts each write at once into its outgoing memory BIO, copies that into a
# new bytes object and hands it to the socket only at the end of the loop iteration. nbdcopy's
# requests arrive in bursts of up to ~60 x 256 KiB per connection, so one iteration could pread,
# encrypt and copy 15 MiB and more before the first byte was sent, every copy out of cache. After
# this many bytes of read replies the remaining requests wait for the next iteration
# (call_soon), so each batch goes out while it is still in cache. nbdcopy reads over TLS
# (4 connections), same run: ~0.95 -> ~0.75 s of worker CPU per GiB, ~1070 -> ~1280 MB/s; with
# 1 MiB batches 0.78 s, 512 KiB 0.90 s, 256 KiB 1.04 s (more, smaller sends), 4 MiB 0.81 s,
# 8 MiB 0.86 s. --connections=1 did not change measurably (~0.85-0.9 s/GiB either way).
TLS_BATCH_BYTES = 2 << 20

# Plain ints for the per-request path: IntFlag arithmetic costs a Python call per operation.
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)
_DF = int(CommandFlag.DF)
_REQ_ONE = int(CommandFlag.REQ_ONE)
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_CMD_READ = int(Command.READ)
_CMD_WRITE = int(Command.WRITE)
_CMD_DISC = int(Command.DISC)
_CMD_FLUSH = int(Command.FLUSH)
_CMD_TRIM = int(Command.TRIM)
_CMD_CACHE = int(Command.CACHE)
_CMD_WRITE_ZEROES = int(Command.WRITE_ZEROES)
_CMD_BLOCK_STATUS = int(Command.BLOCK_STATUS)

_EMPTY = memoryview(b"")
# Where a lingering connection reads what it throws away (contents never looked at, so shared).
_DISCARD = memoryview(bytearray(64 * 1024))

_PHASE_HANDSHAKE = 0
_PHASE_TRANSMISSION = 1
_PHASE_CLOSED = 2
_PHASE_TLS = 3  # STARTTLS acked; the TLS handshake runs
_PHASE_LINGER = 4  # our side is finished (FIN sent); discarding input until the client closes
# Closing a socket whose receive queue holds unread requests makes the kernel send RST, and the
# client's kernel then throws away replies it has not read yet. So a finished connection first
# half-closes, keeps reading and discarding, and closes once its replies are out of the transport
# and nothing unread is left; a client that keeps sending is cut after LINGER_SECONDS.
LINGER_SECONDS = 5.0
LINGER_POLL_SECONDS = 0.02
_EXPORT_OPTIONS = (Option.INFO, Option.GO, Option.EXPORT_NAME)


def _unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the socket's receive queue (0 when that cannot be known)."""
    sock = transport.get_extra_info("socket")
    return _unread(sock.fileno()) if sock is not None else 0


def _unread(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class ConnectionHost(Protocol):
    """What a connection needs of the server that accepted it (nbdworker/server.py)."""

    settings: WorkerSettings
    spinner: IdleSpinner
    executor: Executor  # blocking backend calls: flush, fallocate, cold reads
    serving_threads: Executor  # one serving thread per plain connection in transmission

    @property
    def state(self) -> ServerState:
        """The current configuration generation."""
        ...

    def admit(self, conn: NBDConnection) -> bool: ...

    def handshake_started(self, address: str) -> bool: ...

    def handshake_ended(self, address: str) -> None: ...

    def export_slot_free(self, entry: ExportEntry) -> bool: ...

    def export_opened(self, name: str) -> None: ...

    def export_closed(self, name: str) -> None: ...

    def connection_closed(self, conn: NBDConnection) -> None: ...

    def request_spin(self) -> None: ...


class NBDConnection(asyncio.BufferedProtocol):
    def __init__(self, server: ConnectionHost) -> None:
        self.server = server
        self.state: ServerState = server.state
        # What the server, the metrics and the status publisher may read (nbdworker/session.py).
        self.record = SessionRecord(None, self.state)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        # The address this connection is counted under while it negotiates (handshake cap).
        self.negotiating_from: str | None = None
        self.phase = _PHASE_HANDSHAKE
        self.hs: Handshake | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.linger_until = 0.0
        self.hs_buf = bytearray(HANDSHAKE_BUFFER)
        self.authorizer: ExportAuthorizer | None = None
        # Decrypted bytes that arrive between the end of the TLS handshake and tls_started().
        self.tls_early = bytearray()
        self.tls_eof = False
        self.tls_active = False
        self.cork: list | None = None  # replies held back while a TLS batch is handled
        self.cork_bytes = 0
        self.tls_budget = TLS_BATCH_BYTES  # read-reply bytes left before the batch breaks off
        self.tls_later = False  # a continuation (_tls_continue) is scheduled
        self.tls_task: asyncio.Task | None = None
        # transmission state
        self.entry: ExportEntry | None = None
        self.backend: Backend | None = None
        self.session: Session | None = None
        self.structured = False
        self.read_hlen = 0  # the header before READ data: simple or structured
        self.context_id = 0
        # Plain connections in transmission write their replies through this queue on the
        # socket (nbdworker/sockwriter.py); None during the handshake and over TLS.
        self.writer: SocketWriter | None = None
        self.file_fd: int | None = None  # the export's image, for sendfile replies
        # A plain connection in transmission is served by a thread (_serve); the event loop
        # only asks it to stop (stop_thread, shutting_down) and wakes it through wake_fd.
        self.hand_off = False  # a plain connection not yet handed to its serving thread
        self.threaded = False
        self.stop_thread = False
        self.wake_fd = -1
        self.wake_lock = threading.Lock()
        self.jobs_done: deque = deque()  # thread-pool jobs the serving thread is to answer
        self.start_timer: asyncio.TimerHandle | None = None  # see _start_serving
        self.spin_fd = -1  # watched by the server's IdleSpinner (nbdworker/spin.py)
        self.batch = 0  # requests dispatched in the current pass of _process
        self.rbuf = bytearray()
        self.rview = memoryview(self.rbuf)
        self.start = 0
        self.end = 0
        # The WRITE whose payload is being streamed (see RECV_BUFFER): where its next byte
        # goes, how many are still to come, and the error to answer once they are in (a
        # refused write is drained, a failed piece stops the writing).
        self.stream_req = None
        self.stream_offset = 0
        self.stream_left = 0
        self.stream_error: OSError | tuple[int, str] | None = None
        self.eof = False
        self.inflight = 0
        self.inflight_bytes = 0
        self.max_inflight = self.state.config.limits.max_inflight_per_connection
        self.reading_paused = False
        self.writing_paused = False
        self.disconnecting = False  # DISC received: finish in-flight work, then close
        self.shutting_down = False
        self.counted_export: str | None = None
        self.counts = self.record.counts  # [command] requests, [BYTES + command] bytes
        self.errors = self.record.errors  # NBD errno -> error replies

    # -- asyncio protocol callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # No TCP_NODELAY here: asyncio and uvloop set it on every TCP transport they create,
        # and fetching the socket object first costs a visible share of connect latency.
        peer = transport.get_extra_info("peername")
        self.record.peername = peer
        self.peer = self.record.peer = format_peer(peer)
        if not self.server.admit(self):
            log.warning("%s: refused: connection limit reached or shutting down", self.peer)
            self.phase = _PHASE_CLOSED
            transport.abort()
            return
        address = peer[0] if isinstance(peer, tuple) else None
        if address is not None:
            if not self.server.handshake_started(address):
                log.warning(
                    "%s: refused: %d connections from %s are still negotiating "
                    "(--max-handshakes-per-address)",
                    self.peer,
                    self.server.settings.handshakes_per_address,
                    address,
                )
                self.record.handshake_failure = HandshakeFailure.HANDSHAKE_CAP
                self.phase = _PHASE_CLOSED
                transport.abort()
                return
            self.negotiating_from = address
        self.authorizer = ExportAuthorizer(self._export_config, peer)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[attr-defined]
        limits = self.state.config.limits
        self.hs = Handshake(
            lookup=self._lookup,
            listing=self._listing,
            tls_mode=self.state.tls_mode,
            authorize=self._authorize,
            limits=HandshakeLimits(),
        )
        self.deadline = self.loop.call_later(limits.handshake_timeout, self._handshake_expired)
        log.debug("%s: connected", self.peer)
        self._send(self.hs.data_to_send())
        if self.server.spinner.enabled:
            # After the greeting has gone out (the transport sends at the end of this loop
            # pass): whatever runs here delays it, and connect latency is counted in microseconds.
            self.loop.call_soon(self._watch_for_spin)

    def _watch_for_spin(self) -> None:
        # Watched from the start: a handshake is several round trips, each one a wake-up.
        if self.phase == _PHASE_CLOSED:
            return
        self.spin_fd = self._socket_fd()
        if self.spin_fd >= 0:
            self.server.spinner.watch(self.spin_fd)
            self._request_spin()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.phase == _PHASE_HANDSHAKE or self.phase == _PHASE_TLS:
            return memoryview(self.hs_buf)
        if self.phase == _PHASE_LINGER:
            return _DISCARD
        if not self.rbuf:
            self.rbuf = bytearray(INITIAL_RECV_BUFFER)
            self.rview = memoryview(self.rbuf)
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.rbuf) - self.end < MOVE_TAIL and (
            self.end - self.start <= MOVE_TAIL or self.end == len(self.rbuf)
        ):
            # A partial header or a short request. A longer tail is a payload that fits in
            # place (the parser streams the others).
            self._move_tail()
        return self.rview[self.end :]

    def _move_tail(self) -> None:
        """Move the unparsed tail of rbuf to its front."""
        n = self.end - self.start
        self.rbuf[:n] = self.rview[self.start : self.end]
        self.start, self.end = 0, n

    def buffer_updated(self, nbytes: int) -> None:
        if self.phase == _PHASE_LINGER:
            return  # after our FIN nothing the client sends can be answered
        if self.phase == _PHASE_HANDSHAKE:
            self._handshake_data(bytes(self.hs_buf[:nbytes]))
        elif self.phase == _PHASE_TLS:
            # Only the TLS layer can deliver here (the raw socket stopped reading at the ACK):
            # the client's first options, decrypted before _upgrade() has resumed.
            self.tls_early += self.hs_buf[:nbytes]
        elif self.phase == _PHASE_TRANSMISSION:
            self.end += nbytes
            if self.tls_active:
                self._process_corked()
            else:
                self._process()

    def eof_received(self) -> bool:
        if self.phase == _PHASE_LINGER:
            return False  # the client has closed too: the transport closes now
        if self.phase == _PHASE_HANDSHAKE and self.hs is not None:
            self._handshake_data(b"")
        elif self.phase == _PHASE_TLS:
            self.tls_eof = True
        elif self.phase == _PHASE_TRANSMISSION:
            # EOF between requests without NBD_CMD_DISC is how fio and others hang up.
            log.debug("%s: client closed the connection", self.peer)
            self.eof = True
            if self.tls_active:
                # Answer everything now: the TLS layer stops taking writes once it has seen
                # close_notify and flushed, so a batch deferred to the next iteration would be lost.
                self.tls_budget = 1 << 62
            self._process()
            # Keep the transport until in-flight replies are abandoned (TLS cannot: the TLS layer
            # closes on the client's close_notify whatever is answered here).
            return not self.tls_active
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("%s: connection lost: %s", self.peer, exc)
        self.phase = _PHASE_CLOSED
        self._negotiation_over()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        if self.start_timer is not None:
            self.start_timer.cancel()
            self.start_timer = None
        if self.threaded:
            self._stop_serving()  # the thread closes the writer
        if self.spin_fd >= 0:
            self.server.spinner.forget(self.spin_fd)
            self.spin_fd = -1
        if self.counted_export is not None:
            self.server.export_closed(self.counted_export)
            self.counted_export = None
        self.server.connection_closed(self)

    # Transport flow control: TLS connections and handshakes only (a serving thread writes to
    # the socket itself and watches its own backlog, see _send).
    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()
        if self.phase == _PHASE_TRANSMISSION:
            self._process()

    # -- lifecycle hooks used by the server ------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful: handshakes end now; transmission answers what it has, then closes."""
        if self.phase == _PHASE_HANDSHAKE:
            if self.hs is not None:
                self.hs.start_shutdown()
            self._close()
        elif self.phase == _PHASE_TLS:
            self.abort()
        elif self.phase == _PHASE_TRANSMISSION:
            self.shutting_down = self.record.ending = True
            if self.threaded:
                self._wake()
                return
            self._process()
            self._maybe_close()

    def abort(self) -> None:
        if self.threaded:
            # From the serving thread itself (a protocol error) or from the loop: the thread
            # ends and the loop aborts the transport (_thread_finished).
            self._stop_serving()
            return
        if self.transport is not None:
            self.transport.abort()

    # -- handshake -----------------------------------------------------------------------------

    def _lookup(self, name: str) -> ExportView | None:
        entry = self.state.lookup(name)
        return entry.view if entry is not None else None

    def _listing(self):
        return [entry.view for entry in self.state.exports.values()]

    def _export_config(self, name: str) -> ExportConfig | None:
        entry = self.state.exports.get(name)
        return entry.config if entry is not None else None

    def _authorize(self, view: ExportView) -> str | None:
        entry = self.state.exports.get(view.name)
        if entry is None:
            return "export is gone"
        cfg = entry.config
        # allowed_networks and allowed_clients (against the certificate, once TLS is up).
        reason = self.authorizer(view) if self.authorizer is not None else "no authorizer"
        if reason is not None:
            return reason
        if not self.server.export_slot_free(entry):
            return f"export connection limit ({cfg.max_connections}) reached"
        return None

    def _handshake_expired(self) -> None:
        self.deadline = None
        if self.phase == _PHASE_HANDSHAKE or self.phase == _PHASE_TLS:
            log.info("%s: handshake deadline passed: dropping", self.peer)
            self.record.handshake_failure = HandshakeFailure.TIMEOUT
            self.abort()

    def _handshake_data(self, data: bytes) -> None:
        hs = self.hs
        assert hs is not None
        try:
            hs.receive_data(data)
            while self.phase == _PHASE_HANDSHAKE:
                event = hs.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, OptionHandled):
                    log.debug("%s: %s -> %s %s", self.peer, event.option, event.reply, event.detail)
                    if event.reply == Reply.ERR_TLS_REQD:
                        self.record.handshake_failure = HandshakeFailure.TLS_REQUIRED
                    elif event.reply == Reply.ERR_POLICY:
                        self.record.handshake_failure = HandshakeFailure.NOT_AUTHORIZED
                        if event.option in _EXPORT_OPTIONS and self.authorizer is not None:
                            # Each export refusal the client receives (LIST filtering is none).
                            log.warning("%s: %s", self.authorizer.describe(), event.detail)
                elif isinstance(event, Ready):
                    self._send(hs.data_to_send())
                    self._enter_transmission(event, hs.trailing_data())
                    self._request_spin()
                    return
                elif isinstance(event, Closed):
                    self._send(hs.data_to_send())
                    level = logging.INFO if event.error else logging.DEBUG
                    log.log(level, "%s: handshake ended: %s", self.peer, event.reason)
                    self._close()
                    return
                elif isinstance(event, StartTLS):
                    self._send(hs.data_to_send())
                    self._start_tls()
                    return
        except ProtocolError as exc:
            log.info("%s: protocol error in handshake: %s", self.peer, exc)
            self._send(hs.data_to_send())
            self.abort()
            return
        self._send(hs.data_to_send())
        self._request_spin()

    def _request_spin(self) -> None:
        if self.spin_fd >= 0:
            self.server.request_spin()

    # -- TLS --------------------------------------------------------------------------------------

    def _start_tls(self) -> None:
        """The STARTTLS ACK is written: hand the socket to the TLS layer, as server."""
        hs = self.hs
        assert hs is not None and self.transport is not None
        context = self.state.tls_context
        if context is None or hs.buffered:
            # The Handshake already closes on plaintext pipelined behind STARTTLS; this is the
            # belt to its braces. A missing context was logged when the config was applied.
            log.info(
                "%s: STARTTLS: %s: dropping",
                self.peer,
                "plaintext after STARTTLS" if hs.buffered else "no usable TLS context",
            )
            self.abort()
            return
        # Synchronously, before the loop can read again: whatever the client sends from here on
        # goes to the TLS layer (a ClientHello, or garbage that fails the handshake), never to
        # the option parser as plaintext.
        self.transport.pause_reading()
        self.phase = _PHASE_TLS
        self.tls_task = self.loop.create_task(self._upgrade(context))

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        raw = self.transport
        assert raw is not None and self.hs is not None
        timeout = self.state.config.limits.handshake_timeout
        if self.deadline is not None:
            timeout = max(self.deadline.when() - self.loop.time(), 0.001)
        try:
            transport = await self.loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # No downgrade, no second chance: the connection ends here. A certificate that does
            # not verify is a refusal worth a warning; the rest is noise from broken clients.
            level = (
                logging.WARNING if isinstance(exc, ssl.SSLCertVerificationError) else logging.INFO
            )
            log.log(level, "%s: TLS handshake failed: %s", self.peer, exc or type(exc).__name__)
            self.record.handshake_failure = (
                HandshakeFailure.BAD_CERTIFICATE
                if isinstance(exc, ssl.SSLCertVerificationError)
                else HandshakeFailure.TIMEOUT
                if isinstance(exc, TimeoutError)
                else HandshakeFailure.TLS_ERROR
            )
            raw.abort()
            self.connection_lost(None)
            return
        if self.phase != _PHASE_TLS or transport is None:
            return  # closed meanwhile (deadline, shutdown)
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        peer = check_peer(transport.get_extra_info("ssl_object"), self.state.config.tls)
        who = peer.identity.describe() if peer.identity else "no certificate"
        if peer.refusal is not None:
            # Before any option is answered over TLS.
            log.warning(
                "%s [%s]: refused after the TLS handshake: %s", self.peer, who, peer.refusal
            )
            self.record.handshake_failure = HandshakeFailure.BAD_CERTIFICATE
            self.abort()
            return
        log.info("%s: TLS up (%s, %s) [%s]", self.peer, peer.version, peer.cipher, who)
        if self.authorizer is not None:
            self.authorizer.identity = peer.identity
        self.record.identity = peer.identity
        self.record.tls_version = peer.version or "TLS"
        self.phase = _PHASE_HANDSHAKE
        self.tls_active = True
        self.hs.tls_started()
        early, self.tls_early = bytes(self.tls_early), bytearray()
        if early:
            self._handshake_data(early)
        if self.tls_eof and self.phase == _PHASE_HANDSHAKE:
            self._handshake_data(b"")

    def _negotiation_over(self) -> None:
        if self.negotiating_from is not None:
            self.server.handshake_ended(self.negotiating_from)
            self.negotiating_from = None

    # -- transmission setup ---------------------------------------------------------------------

    def _enter_transmission(self, ready: Ready, trailing: bytes) -> None:
        entry = self.state.exports.get(ready.export.name)
        if entry is None:  # cannot happen: lookup() produced the view
            self.abort()
            return
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self._negotiation_over()
        self.phase = _PHASE_TRANSMISSION
        self.entry = self.record.entry = entry
        self.backend = entry.backend
        self.server.export_opened(entry.config.name)
        self.counted_export = entry.config.name
        if self.state is not self.server.state:
            # The config changed while this client negotiated: it may not keep what the new
            # one withdraws. Ended as a reload ends the others, once the export is set up.
            reason = ending_reason(self.record, self.server.state)
            if reason is not None:
                log.info(
                    "%s: export %r: %s: ending the connection", self.peer, entry.config.name, reason
                )
                self.loop.call_soon(self.shutdown)
        self.session = Session(ready)
        self.structured = ready.structured
        self.read_hlen = read_data_header_size(self.structured)
        self.context_id = next(iter(ready.meta_contexts), 0)
        self.hs = None
        self.hs_buf = bytearray()
        # The receive buffer is allocated when the first request arrives (get_buffer), so the
        # GO reply goes out without waiting for it.
        self.rbuf = bytearray()
        self.rview = memoryview(self.rbuf)
        log.debug(
            "%s: export %r opened (%s replies)",
            self.peer,
            entry.config.name,
            "structured" if self.structured else "simple",
        )
        if trailing:
            self.rbuf = bytearray(max(INITIAL_RECV_BUFFER, 2 * len(trailing)))
            self.rview = memoryview(self.rbuf)
            self.rbuf[: len(trailing)] = trailing
            self.end = len(trailing)
        if not self.tls_active:
            self.file_fd = self.backend.sendfile_fd
            self.hand_off = True
        if trailing:
            self._process()

    # -- transmission: parsing ------------------------------------------------------------------

    def _process(self) -> None:
        """On the event loop (TLS connections, and a plain connection's first requests):
        dispatch every complete request in the buffer, unless paused."""
        self.batch = 0
        if not self._dispatch_requests():
            return
        self._update_reading()
        self._maybe_close()
        if self.hand_off:
            self._hand_off()
        elif (
            self.batch == 1 and self.start == self.end and not self.inflight and not self.tls_later
        ):
            # One request in this pass: a client that waits for each reply (queue depth 1).
            # Clients that pipeline keep the process busy anyway, and a spin would only take
            # CPU from them.
            self._request_spin()

    def _dispatch_requests(self) -> bool:
        """Dispatch what can be; False when the connection stopped parsing for good (aborted)."""
        if self.stream_req is not None and (
            self.phase != _PHASE_TRANSMISSION or not self._stream_payload()
        ):
            return True  # the rest of the payload is still to come
        check = self.session.check
        backend = self.backend
        rbuf = self.rbuf
        counts = self.counts
        while (
            self.phase == _PHASE_TRANSMISSION
            and not self.disconnecting
            and self.inflight < self.max_inflight
            and self.inflight_bytes < MAX_INFLIGHT_BYTES
            and not self.writing_paused
            and self.tls_budget > 0
        ):
            avail = self.end - self.start
            if avail < HEADER:
                break
            start = self.start
            try:
                req = decode_request(rbuf, start)
            except ProtocolError as exc:
                log.info("%s: protocol error: %s: dropping", self.peer, exc)
                self.abort()
                return False
            verdict = check(req)
            if verdict.disconnect:
                log.info("%s: %s: dropping", self.peer, verdict.message or "bad request")
                self.abort()
                return False
            payload = verdict.payload
            if payload:
                if avail < HEADER + payload:
                    if start + HEADER + payload <= len(rbuf):
                        break  # the rest arrives in place
                    if len(rbuf) < RECV_BUFFER:
                        rbuf = self._grow_buffer(HEADER + payload)
                        continue
                    if avail <= MOVE_TAIL and HEADER + payload <= len(rbuf):
                        self._move_tail()
                        break  # the rest arrives in place
                    self._start_stream(req, verdict)
                    if not self._stream_payload():
                        break
                    continue
                data = self.rview[start + HEADER : start + HEADER + payload]
            else:
                data = _EMPTY
            self.start = start + HEADER + payload
            if verdict.error:
                self._reply_error(req, verdict.error, verdict.message)
                continue
            command = req.command
            if self.shutting_down and command != _CMD_DISC:
                self._reply_error(req, Errno.ESHUTDOWN, "server is shutting down")
                continue
            counts[command] += 1
            counts[BYTES + command] += req.length
            self.batch += 1
            # The two hot commands are handled right here: every call saved shows in 4 KiB IOPS.
            try:
                if command == _CMD_WRITE and not req.flags & _FUA:
                    backend.pwrite(data, req.offset)
                    self._send(encode_simple_reply(req.cookie))
                elif command == _CMD_READ:
                    self._read(req)
                else:
                    self._dispatch(req, data)
            except OSError as exc:
                self._reply_oserror(req, exc)
            except Exception as exc:
                # A bug must cost one request, not the connection or the event loop.
                log.exception("%s: internal error in %s", self.peer, req.command)
                self._reply_error(req, Errno.EIO, f"internal error: {type(exc).__name__}")
        return True

    def _grow_buffer(self, need: int) -> bytearray:
        n = self.end - self.start
        small = len(self.rbuf) < SMALL_RECV_BUFFER and need <= SMALL_RECV_BUFFER // 2
        rbuf = bytearray(SMALL_RECV_BUFFER if small else RECV_BUFFER)
        rbuf[:n] = self.rview[self.start : self.end]
        self.rbuf, self.rview = rbuf, memoryview(rbuf)
        self.start, self.end = 0, n
        return rbuf

    def _start_stream(self, req, verdict) -> None:
        """Take the WRITE at self.start, whose payload does not fit in rbuf, as a stream."""
        self.start += HEADER
        self.stream_req = req
        self.stream_offset = req.offset
        self.stream_left = req.length
        if verdict.error:
            self.stream_error = (verdict.error, verdict.message)  # drained, never written
        elif self.shutting_down:
            self.stream_error = (Errno.ESHUTDOWN, "server is shutting down")
        else:
            self.stream_error = None
            self.counts[_CMD_WRITE] += 1
            self.counts[BYTES + _CMD_WRITE] += req.length
            self.batch += 1

    def _stream_payload(self) -> bool:
        """Write what rbuf holds of the streamed payload; True once the request is answered.

        Pieces land in the image before the whole payload is in: harmless, since the client
        can rely on no byte of a write before its reply (and on none at all after an error).
        """
        start = self.start
        avail = self.end - start
        if avail < self.stream_left and self.end < len(self.rbuf) and self.stream_error is None:
            # One pwrite per buffer-full, not one per read: over TLS a read is one 16 KiB
            # record. A drained payload is let go of at once.
            return False
        take = min(avail, self.stream_left)
        if take:
            if self.stream_error is None:
                try:
                    self.backend.pwrite(self.rview[start : start + take], self.stream_offset)
                except OSError as exc:
                    self.stream_error = exc  # the rest is drained
                except Exception as exc:
                    # A bug must cost one request, not the connection or the event loop.
                    log.exception("%s: internal error in a streamed WRITE", self.peer)
                    self.stream_error = (Errno.EIO, f"internal error: {type(exc).__name__}")
            self.start = start + take
            self.stream_offset += take
            self.stream_left -= take
        if self.stream_left:
            return False
        req, error = self.stream_req, self.stream_error
        self.stream_req = self.stream_error = None
        if error is None:
            if req.flags & _FUA:
                self._in_thread(req, self.backend.flush)
            else:
                self._send(encode_simple_reply(req.cookie))
        elif isinstance(error, OSError):
            self._reply_oserror(req, error)
        else:
            self._reply_error(req, *error)
        return True

    # -- transmission: execution ----------------------------------------------------------------

    def _dispatch(self, req, data: memoryview) -> None:
        """Every command but READ and plain WRITE (_dispatch_requests runs those itself)."""
        cmd = req.command
        backend = self.backend
        if cmd == _CMD_WRITE:  # with FUA
            # The payload lives in the receive buffer, which is reused as soon as we return:
            # the thread gets a copy.
            self._in_thread(req, backend.pwrite, bytes(data), req.offset, True)
        elif cmd == _CMD_DISC:
            log.debug("%s: NBD_CMD_DISC", self.peer)
            self.disconnecting = True
        elif cmd == _CMD_FLUSH:
            self._in_thread(req, backend.flush)
        elif cmd == _CMD_TRIM:
            self._in_thread(req, backend.trim, req.offset, req.length, bool(req.flags & _FUA))
        elif cmd == _CMD_WRITE_ZEROES:
            self._in_thread(
                req,
                backend.zero,
                req.offset,
                req.length,
                not req.flags & _NO_HOLE,
                bool(req.flags & _FAST_ZERO),
                bool(req.flags & _FUA),
            )
        elif cmd == _CMD_CACHE:
            self._in_thread(req, backend.cache, req.offset, req.length)
        elif cmd == _CMD_BLOCK_STATUS:
            self._in_thread(req, backend.extents, req.offset, req.length, result=self._block_status)
        else:  # Session.check refuses everything else; keep the stream alive regardless
            self._reply_error(req, Errno.EINVAL, "unsupported command")

    def _in_thread(self, req, func, *args, result=None) -> None:
        # READ results and FUA WRITE payloads are held in memory until the job ends: counted
        # against the connection's byte budget as well as its request budget.
        cost = req.length if req.command == _CMD_READ or req.command == _CMD_WRITE else 0
        if self.threaded:
            job = self.server.executor.submit(func, *args)
            done = self._job_finished  # the serving thread answers it
        else:
            job = self.loop.run_in_executor(self.server.executor, func, *args)
            done = self._thread_done
        self.inflight += 1
        self.inflight_bytes += cost
        job.add_done_callback(lambda f: done(req, f, result, cost))

    def _job_finished(self, req, job, result, cost: int) -> None:
        # In the pool thread: the serving thread answers it (_answer_job).
        self.jobs_done.append((req, job, result, cost))
        self._wake()

    def _thread_done(self, req, fut: asyncio.Future, result, cost: int = 0) -> None:
        self._answer_job(req, fut, result, cost)
        if self.reading_paused or self.shutting_down or self.eof:
            self._process()
        elif self.hand_off:
            self._hand_off()
        elif not self.inflight:
            self._request_spin()
        self._maybe_close()

    def _answer_job(self, req, fut, result, cost: int) -> None:
        self.inflight -= 1
        self.inflight_bytes -= cost
        if self.phase != _PHASE_CLOSED:
            exc = fut.exception()
            if exc is not None:
                if isinstance(exc, OSError):
                    self._reply_oserror(req, exc)
                else:
                    log.error("%s: internal error in %s: %r", self.peer, req.command, exc)
                    self._reply_error(req, Errno.EIO, "internal error")
            elif result is not None:
                result(req, fut.result())
            else:
                self._send(encode_simple_reply(req.cookie))

    def _read(self, req) -> None:
        length = req.length
        if length == 0:
            self._send(
                encode_none_chunk(req.cookie)
                if self.structured
                else encode_simple_reply(req.cookie)
            )
            return
        backend = self.backend
        if (
            self.structured
            and length >= SPARSE_READ_MIN
            and backend.can_extents
            and not req.flags & _DF
        ):
            try:
                extents = backend.extents(req.offset, length)
            except OSError:
                extents = None
            if extents and (len(extents) > 1 or extents[0][1] & STATE_HOLE):
                self._in_thread(req, self._sparse_read, req, extents, result=self._send_reply)
                return
        if self.tls_active:
            self.tls_budget -= length
            if self.tls_budget <= 0 and not self.tls_later:
                self.tls_later = True
                self.loop.call_soon(self._tls_continue)
        offset = req.offset
        if length > SMALL_READ:
            header = encode_read_data_header(req.cookie, offset, length, self.structured)
            # Large reads: `os.pread` returns a new bytes object without zero-filling it first,
            # and `writelines` sends header and data with one writev (uvloop). Measured with
            # nbdcopy this used a quarter less CPU than preadv into a fresh bytearray. The
            # page-cache probe keeps cold reads off the event loop.
            if backend.cached(offset, length):
                if self.file_fd is not None and self.writer is not None:
                    self._send_file(header, offset, length)
                    return
                self._send_lines(req, [header, backend.read_bytes(offset, length)])
            else:
                self._in_thread(
                    req, self._read_job, header, offset, length, result=self._send_lines
                )
            return
        # Small reads: header and data in one new buffer, the header packed in place.
        buf = bytearray(self.read_hlen + length)
        hlen = encode_read_data_header_into(buf, req.cookie, offset, length, self.structured)
        view = memoryview(buf)[hlen:]
        got = backend.pread_nowait(view, offset)
        if got == length:
            self._send(buf)
            return
        self._in_thread(req, self._finish_read, buf, view, offset, got, result=self._send_reply)

    def _tls_continue(self) -> None:
        """The next batch of a TLS connection's requests (see TLS_BATCH_BYTES)."""
        self.tls_later = False
        self.tls_budget = TLS_BATCH_BYTES if not self.eof else 1 << 62  # see eof_received
        if self.phase == _PHASE_TRANSMISSION:
            self._process_corked()

    def _process_corked(self) -> None:
        # Over TLS the replies of one pass go out as one write (see TLS_CORK_LIMIT).
        self.cork = []
        try:
            self._process()
        finally:
            self._uncork()
            self.cork = None

    def _send_file(self, header: bytes, offset: int, length: int) -> None:
        # Straight from the page cache to the socket when the writer gets to it: the two copies
        # of pread + send were ~60% of the worker's CPU on nbdcopy reads.
        writer = self.writer
        writer.write(header)
        writer.write_file(self.file_fd, offset, length)
        if writer.pending > WRITE_HIGH_WATER:
            self.writing_paused = True

    def _hand_off(self) -> None:
        """After a pass on the loop, hand a plain connection to a serving thread of its own.

        Its first requests are served on the loop (the replies through the transport), so a
        client that only connects and disconnects (nbdinfo --size, libnbd's connect latency)
        never costs the thread wake-ups: 0.204 against 0.225 ms per libnbd connect when
        handed over at GO (nbdkit 0.206, bench/README.md).
        """
        if not self._may_hand_off():
            return
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._start_serving()

    def _may_hand_off(self) -> bool:
        # Pool jobs started on the loop answer on the loop: none may be left for the thread to
        # race with. A connection that is ending ends on the loop.
        return (
            self.hand_off
            and self.start_timer is None
            and self.phase == _PHASE_TRANSMISSION
            and not (self.inflight or self.disconnecting or self.eof or self.shutting_down)
        )

    def _start_serving(self) -> None:
        self.start_timer = None
        if not self._may_hand_off():
            self._update_reading()
            return
        transport = self.transport
        if transport.get_write_buffer_size():
            # Replies are still in the transport: nothing may overtake them.
            self.start_timer = self.loop.call_later(0.001, self._start_serving)
            return
        sock_fd = self.spin_fd if self.spin_fd >= 0 else self._socket_fd()
        if sock_fd < 0:
            # No socket to hand over (a stand-in transport): served on the loop, the replies
            # through the transport.
            self.hand_off = False
            self._update_reading()
            return
        peername = self.record.peername
        if not isinstance(peername, tuple):
            family = socket.AF_UNIX
        else:
            family = socket.AF_INET6 if ":" in peername[0] else socket.AF_INET
        self.writer = SocketWriter(sock_fd, family)
        if self.spin_fd >= 0:
            # The thread waits on the socket itself (and spins itself, see _serve_requests).
            self.server.spinner.forget(self.spin_fd)
            self.spin_fd = -1
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.hand_off = False
        self.threaded = True
        try:
            self.server.serving_threads.submit(self._serve)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self.writer.close()
            self._thread_finished("abort")

    def _socket_fd(self) -> int:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        try:
            return sock.fileno() if sock is not None else -1
        except (AttributeError, OSError):
            return -1

    def _read_job(self, header: bytes, offset: int, length: int) -> list[bytes]:
        # Runs in a worker thread: the data may have to come from the disk.
        return [header, self.backend.read_bytes(offset, length)]

    def _send_lines(self, req, lines: list[bytes]) -> None:
        if self.writer is not None:
            for data in lines:
                self._send(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(lines)

    def _finish_read(self, buf: bytearray, view: memoryview, offset: int, got: int) -> bytearray:
        # Runs in a worker thread: the page cache did not have all of it.
        self.backend.pread(view[got:], offset + got)
        return buf

    def _sparse_read(self, req, extents) -> bytes:
        # Runs in a worker thread. One chunk per extent: OFFSET_HOLE for ranges that read as
        # zeroes, OFFSET_DATA otherwise; all sent in one write, the last one flagged DONE.
        pieces: list[tuple[int, int, bool]] = []
        pos, end = req.offset, req.offset + req.length
        for length, flags in extents:
            if pos >= end:
                break
            n = min(length, end - pos)
            hole = bool(flags & STATE_ZERO)
            if pieces and pieces[-1][2] == hole:
                last = pieces.pop()
                pieces.append((last[0], last[1] + n, hole))
            else:
                pieces.append((pos, n, hole))
            pos += n
        if pos < end:
            pieces.append((pos, end - pos, False))
        out = []
        last = len(pieces) - 1
        for i, (off, n, hole) in enumerate(pieces):
            if hole:
                out.append(encode_hole_chunk(req.cookie, off, n, i == last))
            else:
                out.append(encode_read_data_header(req.cookie, off, n, True, i == last))
                data = bytearray(n)
                self.backend.pread(memoryview(data), off)
                out.append(data)
        return b"".join(out)

    def _send_reply(self, req, reply) -> None:
        self._send(reply)

    def _block_status(self, req, extents) -> None:
        out: list[tuple[int, int]] = []
        for length, flags in extents:
            if length <= 0:
                continue
            if length > MAX_EXTENT:
                # A compact descriptor holds < 4 GiB: answer the aligned first part and stop
                # there (the client asks again from the end), rather than repeat the status.
                out.append((MAX_EXTENT, flags))
                break
            out.append((length, flags))
            if len(out) >= MAX_DESCRIPTORS:
                break
        if not out:
            out = [(min(req.length, MAX_EXTENT), 0)]
        if req.flags & _REQ_ONE:
            out = [(min(out[0][0], req.length), out[0][1])]
        self._send(encode_block_status(req.cookie, self.context_id, out))

    # -- replies --------------------------------------------------------------------------------

    def _reply_oserror(self, req, exc: OSError) -> None:
        nbd_errno = errno_from_oserror(exc)
        if exc.errno == host_errno.ENOTSUP and req.flags & _FAST_ZERO:
            nbd_errno = Errno.ENOTSUP
        log.info(
            "%s: %s at %d+%d failed: %s",
            self.peer,
            Command(req.command),
            req.offset,
            req.length,
            exc,
        )
        self._reply_error(req, nbd_errno, exc.strerror or str(exc))

    def _reply_error(self, req, error: int, message: str) -> None:
        self.errors[error] = self.errors.get(error, 0) + 1
        # With structured replies an error chunk carries the message (and READ must use one).
        self._send(encode_error(req.cookie, error, message[:1024], structured=self.structured))

    def _send(self, data) -> None:
        writer = self.writer
        if writer is not None:
            # Queued; the serving thread sends each pass's replies with one writev.
            writer.write(data)
            if writer.pending > WRITE_HIGH_WATER:
                self.writing_paused = True
            return
        if self.cork is not None and data:
            self.cork.append(data)
            self.cork_bytes += len(data)
            if self.cork_bytes >= TLS_CORK_LIMIT:
                self._uncork()
            return
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _uncork(self) -> None:
        out = self.cork
        if not out:
            return
        self.cork = []
        self.cork_bytes = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # -- the serving thread (plain connections in transmission) ---------------------------------

    def _serve(self) -> None:
        """Requests in, replies out, until the connection ends; then the event loop takes the
        transport back (_thread_finished)."""
        outcome = "abort"
        try:
            outcome = self._serve_requests()
        except Exception:
            log.exception("%s: internal error in the serving thread", self.peer)
        finally:
            # Before the transport closes the socket (the duplicate would keep it open).
            self.writer.close()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to hand back
                self.loop.call_soon_threadsafe(self._thread_finished, outcome)

    def _serve_requests(self) -> str:
        """The serving thread's loop; returns "close" (graceful) or "abort"."""
        writer = self.writer
        sock = writer.sock
        sock_fd = sock.fileno()
        poller = select.poll()
        poller.register(self.wake_fd, select.POLLIN)
        watched = 0  # the socket's events in the poller (0: not registered)
        spinner = IdleSpinner(self.server.settings.busy_poll_us)
        if spinner.enabled:
            spinner.watch(sock_fd)
            spinner.watch(self.wake_fd)
        ending_by = 0.0  # the replies of a finished connection must be out by then
        while True:
            if self.stop_thread:
                return "abort"
            while self.jobs_done:
                self._answer_job(*self.jobs_done.popleft())
            self.batch = 0
            if not self._dispatch_requests():
                return "abort"
            try:
                blocked = writer.send_queued()
            except OSError as exc:
                log.info("%s: sending failed: %s: dropping", self.peer, exc)
                return "abort"
            if self.writing_paused and writer.pending <= WRITE_LOW_WATER:
                self.writing_paused = False
                continue  # parse on
            if not self.inflight and (
                self.disconnecting
                or self.eof
                or (
                    self.shutting_down
                    and self.stream_req is None
                    and self.end - self.start < HEADER
                    # Requests still in the socket are read and answered ESHUTDOWN first.
                    and _unread(sock_fd) == 0
                )
            ):
                if not writer.pending:
                    return "close"
                if not ending_by:
                    ending_by = time.monotonic() + LINGER_SECONDS
                elif time.monotonic() >= ending_by:
                    log.info("%s: client does not read its replies: dropping", self.peer)
                    return "abort"
            reading = not (
                self.inflight >= self.max_inflight
                or self.inflight_bytes >= MAX_INFLIGHT_BYTES
                or self.writing_paused
                or self.disconnecting
                or self.eof
            )
            want = (select.POLLIN if reading else 0) | (select.POLLOUT if blocked else 0)
            if want != watched:
                # Not registered at all when nothing is wanted: a hung-up socket would
                # otherwise report POLLHUP on every poll while jobs run.
                if not want:
                    poller.unregister(sock_fd)
                elif watched:
                    poller.modify(sock_fd, want)
                else:
                    poller.register(sock_fd, want)
                watched = want
            if (
                reading
                and spinner.enabled
                and self.batch == 1
                and self.start == self.end
                and not self.inflight
            ):
                # A client waiting for each reply (queue depth 1): see nbdworker/spin.py.
                spinner.spin()
            timeout = None
            if ending_by:
                timeout = max(0, int((ending_by - time.monotonic()) * 1000) + 1)
            ready = poller.poll(timeout)
            for fd, _ in ready:
                if fd == self.wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                elif reading:
                    buf = self.get_buffer(0)
                    if not buf:
                        raise RuntimeError("receive buffer full while reading")
                    try:
                        n = sock.recv_into(buf)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.debug("%s: connection lost: %s", self.peer, exc)
                        return "abort"
                    if n:
                        self.end += n
                    else:
                        # EOF between requests without NBD_CMD_DISC is how fio and others
                        # hang up.
                        log.debug("%s: client closed the connection", self.peer)
                        self.eof = True

    def _wake(self) -> None:
        """Wake the serving thread (from the loop or a pool thread)."""
        with self.wake_lock:
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

    def _stop_serving(self) -> None:
        self.stop_thread = True
        self._wake()

    def _thread_finished(self, outcome: str) -> None:
        """On the loop: the serving thread has ended; the transport is ours again."""
        self.threaded = False
        with self.wake_lock:
            # Under the lock: a pool thread finishing a job may be about to wake us.
            os.close(self.wake_fd)
            self.wake_fd = -1
        if self.phase != _PHASE_TRANSMISSION:
            return
        if outcome == "abort" or self.stop_thread:
            self.abort()
        else:
            self._close()

    # -- flow control and closing ---------------------------------------------------------------

    def _update_reading(self) -> None:
        if self.transport is None or self.phase != _PHASE_TRANSMISSION or self.threaded:
            return
        want_pause = (
            self.inflight >= self.max_inflight
            or self.inflight_bytes >= MAX_INFLIGHT_BYTES
            or self.writing_paused
            or self.disconnecting
            or self.eof
        )
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self.phase != _PHASE_TRANSMISSION or self.inflight or self.tls_later or self.threaded:
            return  # a serving thread decides for itself (_serve_requests)
        if self.disconnecting or (self.eof and not self.writing_paused):
            # After EOF, whatever is left unparsed can never complete.
            self._close()
        elif (
            self.shutting_down
            and self.stream_req is None
            and self.end - self.start < HEADER
            # Requests still in the socket are read and answered ESHUTDOWN first.
            and _unread_bytes(self.transport) == 0
        ):
            self._close()

    def _close(self) -> None:
        self._uncork()
        transport = self.transport
        if transport is None or transport.is_closing() or self.phase == _PHASE_LINGER:
            return
        if self.phase == _PHASE_CLOSED or not transport.can_write_eof():
            # close() sends what is buffered first, so every answered request reaches the client.
            transport.close()
            return
        # Half-close (FIN after the buffered replies), then read and discard until the client
        # closes, so unread requests in the socket never turn our close into a reset.
        self.phase = _PHASE_LINGER
        transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self.linger_until = self.loop.time() + LINGER_SECONDS
        self._linger_check()

    def _linger_check(self) -> None:
        transport = self.transport
        self.linger = None
        if self.phase != _PHASE_LINGER or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() == 0 and _unread_bytes(transport) == 0:
            transport.close()
        elif self.loop.time() >= self.linger_until:
            transport.abort()
        else:
            self.linger = self.loop.call_later(LINGER_POLL_SECONDS, self._linger_check)
