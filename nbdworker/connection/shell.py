"""One NBD connection on the event loop: its phases, from accept to the lingering close.

The whole connection is one `asyncio.BufferedProtocol`, so the transport never changes hands
(no StreamReader/StreamWriter to keep alive) and a later STARTTLS can wrap the same protocol
with `loop.start_tls`. The shell owns the transport and the phase, and hands the bytes to the
part that owns the phase's state:

    handshake     -> Negotiation (negotiation.py), under its deadline
    STARTTLS      -> TLSUpgrade (starttls.py)
    transmission  -> LoopTransmission (transmission.py), which drives the RequestPump (pump.py)
                     on the loop over TLS and for a plain connection's first pass, then hands a
                     plain connection to a ServingThread (serving.py) driving the same pump
    end           -> half-close, discard input until the client closes (at most LINGER_SECONDS)
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from nbdworker.connection.host import ConnectionHost
from nbdworker.connection.negotiation import Negotiation
from nbdworker.connection.serving import LINGER_SECONDS
from nbdworker.connection.sinks import WRITE_HIGH_WATER, WRITE_LOW_WATER
from nbdworker.connection.starttls import TLSUpgrade
from nbdworker.connection.transmission import LoopTransmission, socket_fd, unread_on
from nbdworker.protocol import Ready
from nbdworker.reload import ending_reason
from nbdworker.session import HandshakeFailure, SessionRecord, format_peer

__all__ = ["NBDConnection"]

log = logging.getLogger("nbdworker.connection")

_PHASE_HANDSHAKE = 0
_PHASE_TRANSMISSION = 1
_PHASE_CLOSED = 2
_PHASE_TLS = 3  # STARTTLS acked; the TLS handshake runs
_PHASE_LINGER = 4  # our side is finished (FIN sent); discarding input until the client closes
# Closing a socket whose receive queue holds unread requests makes the kernel send RST, and the
# client's kernel then throws away replies it has not read yet. So a finished connection first
# half-closes, keeps reading and discarding, and closes once its replies are out of the transport
# and nothing unread is left; a client that keeps sending is cut after LINGER_SECONDS.
LINGER_POLL_SECONDS = 0.02

# Where a lingering connection reads what it throws away (contents never looked at, so shared).
_DISCARD = memoryview(bytearray(64 * 1024))


class NBDConnection(asyncio.BufferedProtocol):
    def __init__(self, host: ConnectionHost) -> None:
        self.host = host
        self.state = host.state  # the generation it negotiates under, for its whole life
        # What the server, the metrics and the status publisher may read (nbdworker/session.py).
        self.record = SessionRecord(None, self.state)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.phase = _PHASE_HANDSHAKE
        # The address this connection is counted under while it negotiates (handshake cap).
        self.negotiating_from: str | None = None
        self.negotiation: Negotiation | None = None
        self.tls: TLSUpgrade | None = None
        self.tls_active = False
        self.transmission: LoopTransmission | None = None
        self.spin_fd = -1  # watched by the server's IdleSpinner (nbdworker/spin.py)
        self.linger: asyncio.TimerHandle | None = None
        self.linger_until = 0.0
        self.counted_export: str | None = None

    # -- asyncio protocol callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.state is not self.host.state:
            # A config applied since this protocol was made (an adopted socket): nothing is
            # negotiated yet, so it starts under the current one.
            self.state = self.record.state = self.host.state
        # Held until the end (connection_lost): any export of it may still be opened.
        self.host.backend_holds.hold_state(self.state)
        self.transport = transport  # type: ignore[assignment]
        # No TCP_NODELAY here: asyncio and uvloop set it on every TCP transport they create,
        # and fetching the socket object first costs a visible share of connect latency.
        peer = transport.get_extra_info("peername")
        self.record.peername = peer
        self.peer = self.record.peer = format_peer(peer)
        if not self.host.admit(self):
            log.warning("%s: refused: connection limit reached or shutting down", self.peer)
            self.phase = _PHASE_CLOSED
            transport.abort()
            return
        address = peer[0] if isinstance(peer, tuple) else ""
        refused = self.host.handshake_started(address)
        if refused is not None:
            settings = self.host.settings
            if refused == HandshakeFailure.HANDSHAKE_LIMIT:
                log.warning(
                    "%s: refused: %d connections are still negotiating (--max-handshakes)",
                    self.peer,
                    settings.max_handshakes,
                )
            else:
                log.warning(
                    "%s: refused: %d connections from %s are still negotiating "
                    "(--max-handshakes-per-address)",
                    self.peer,
                    settings.handshakes_per_address,
                    address,
                )
            self.record.handshake_failure = refused
            self.phase = _PHASE_CLOSED
            transport.abort()
            return
        self.negotiating_from = address
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[attr-defined]
        self.negotiation = Negotiation(self, self.host, self.state, self.record, self.loop)
        log.debug("%s: connected", self.peer)
        self.negotiation.greet()
        if self.host.spinner.enabled:
            # After the greeting has gone out (the transport sends at the end of this loop
            # pass): whatever runs here delays it, and connect latency is counted in microseconds.
            self.loop.call_soon(self._watch_for_spin)

    def _watch_for_spin(self) -> None:
        # Watched from the start: a handshake is several round trips, each one a wake-up.
        if self.phase == _PHASE_CLOSED:
            return
        self.spin_fd = socket_fd(self.transport)
        if self.spin_fd >= 0:
            self.host.spinner.watch(self.spin_fd)
            self.request_spin()

    def get_buffer(self, sizehint: int) -> memoryview:
        phase = self.phase
        if phase == _PHASE_TRANSMISSION:
            return self.transmission.pump.buffer()  # type: ignore[union-attr]
        if phase in (_PHASE_HANDSHAKE, _PHASE_TLS):
            return self.negotiation.buffer  # type: ignore[union-attr]
        return _DISCARD

    def buffer_updated(self, nbytes: int) -> None:
        phase = self.phase
        if phase == _PHASE_TRANSMISSION:
            self.transmission.received(nbytes)  # type: ignore[union-attr]
        elif phase == _PHASE_HANDSHAKE:
            self.negotiation.data(bytes(self.negotiation.buffer[:nbytes]))  # type: ignore[union-attr]
        elif phase == _PHASE_TLS:
            # Only the TLS layer can deliver here (the raw socket stopped reading at the ACK):
            # the client's first options, decrypted before _upgrade() has resumed.
            self.tls.early += self.negotiation.buffer[:nbytes]  # type: ignore[union-attr]
        # Lingering: after our FIN nothing the client sends can be answered.

    def eof_received(self) -> bool:
        phase = self.phase
        if phase == _PHASE_HANDSHAKE and self.negotiation is not None:
            self.negotiation.data(b"")
        elif phase == _PHASE_TLS:
            self.tls.eof = True  # type: ignore[union-attr]
        elif phase == _PHASE_TRANSMISSION:
            self.transmission.eof_received()  # type: ignore[union-attr]
            # Keep the transport until in-flight replies are abandoned (TLS cannot: the TLS layer
            # closes on the client's close_notify whatever is answered here).
            return not self.tls_active
        # Lingering: the client has closed too, the transport closes now.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("%s: connection lost: %s", self.peer, exc)
        self.phase = _PHASE_CLOSED
        self._negotiation_over()
        if self.negotiation is not None:
            self.negotiation.end()
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        holds = self.host.backend_holds
        if self.transmission is not None:
            self.transmission.lost()
            backend = self.transmission.pump.backend
            self.transmission.when_done(lambda: holds.release(backend))
        else:
            holds.release_state(self.state)
        if self.spin_fd >= 0:
            self.host.spinner.forget(self.spin_fd)
            self.spin_fd = -1
        if self.counted_export is not None:
            self.host.export_closed(self.counted_export)
            self.counted_export = None
        self.host.connection_closed(self)

    # Transport flow control: TLS connections and a plain one's first pass (a serving thread
    # watches its own queue, sinks.SocketSink).
    def pause_writing(self) -> None:
        if self.transmission is not None:
            self.transmission.pause_writing()

    def resume_writing(self) -> None:
        if self.transmission is not None:
            self.transmission.resume_writing()

    # -- what the server asks -------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful: handshakes end now; transmission answers what it has, then closes."""
        if self.phase == _PHASE_HANDSHAKE:
            if self.negotiation is not None:
                self.negotiation.shutdown()
            self.close()
        elif self.phase == _PHASE_TLS:
            self.abort()
        elif self.phase == _PHASE_TRANSMISSION:
            self.transmission.shutdown()  # type: ignore[union-attr]

    def abort(self) -> None:
        if self.transmission is not None and self.transmission.stop_thread():
            return  # the thread ends, then the transmission aborts the transport
        if self.transport is not None:
            self.transport.abort()

    # -- what the negotiation asks (negotiation.Negotiator) -------------------------------------

    def negotiating(self) -> bool:
        return self.phase == _PHASE_HANDSHAKE

    def send(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def request_spin(self) -> None:
        if self.spin_fd >= 0:
            self.host.request_spin()

    def begin_tls(self) -> None:
        """The STARTTLS ACK is written: hand the socket to the TLS layer, as server."""
        negotiation = self.negotiation
        assert negotiation is not None and self.transport is not None
        context = self.state.tls_context
        buffered = negotiation.hs.buffered
        if context is None or buffered:
            # The Handshake already closes on plaintext pipelined behind STARTTLS; this is the
            # belt to its braces. A missing context was logged when the config was applied.
            log.info(
                "%s: STARTTLS: %s: dropping",
                self.peer,
                "plaintext after STARTTLS" if buffered else "no usable TLS context",
            )
            self.abort()
            return
        # Synchronously, before the loop can read again: whatever the client sends from here on
        # goes to the TLS layer (a ClientHello, or garbage that fails the handshake), never to
        # the option parser as plaintext.
        self.transport.pause_reading()
        self.phase = _PHASE_TLS
        self.tls = TLSUpgrade(self.loop, self.record)
        self.tls.task = self.loop.create_task(self._upgrade(context))

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        tls, negotiation = self.tls, self.negotiation
        assert tls is not None and negotiation is not None and self.transport is not None
        ok, transport = await tls.handshake(self.transport, self, context, negotiation.time_left())
        if not ok:
            self.connection_lost(None)  # the raw transport's protocol is the TLS layer now
            return
        if self.phase != _PHASE_TLS or transport is None:
            return  # closed meanwhile (deadline, shutdown)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if not tls.vet(transport, self.state.config.tls):
            self.abort()
            return
        self.phase = _PHASE_HANDSHAKE
        self.tls_active = True
        negotiation.tls_started(self.record.identity)
        early, eof = tls.take_early()
        if early:
            negotiation.data(early)
        if eof and self.phase == _PHASE_HANDSHAKE:
            negotiation.data(b"")

    def begin_transmission(self, ready: Ready, trailing: bytes) -> None:
        entry = self.state.exports.get(ready.export.name)
        if entry is None:  # cannot happen: lookup() produced the view
            self.abort()
            return
        if self.negotiation is not None:
            self.negotiation.end()
            self.negotiation = None
        self._negotiation_over()
        self.phase = _PHASE_TRANSMISSION
        name = entry.config.name
        self.record.entry = entry
        # From here on only this export's image is used (its hold ends in connection_lost).
        self.host.backend_holds.hold(entry.backend)
        self.host.backend_holds.release_state(self.state)
        self.host.export_opened(name)
        self.counted_export = name
        if self.state is not self.host.state:
            # The config changed while this client negotiated: it may not keep what the new
            # one withdraws. Ended as a reload ends the others, once the export is set up.
            reason = ending_reason(self.record, self.host.state)
            if reason is not None:
                log.info("%s: export %r: %s: ending the connection", self.peer, name, reason)
                self.loop.call_soon(self.shutdown)
        max_inflight = self.state.config.limits.max_inflight_per_connection
        transmission = self.transmission = LoopTransmission(
            self, self.host, self.record, ready, entry.backend, max_inflight, self.tls_active
        )
        log.debug(
            "%s: export %r opened (%s replies)",
            self.peer,
            name,
            "structured" if ready.structured else "simple",
        )
        if trailing:
            transmission.pump.preload(trailing)
            transmission.process()

    def _negotiation_over(self) -> None:
        if self.negotiating_from is not None:
            self.host.handshake_ended(self.negotiating_from)
            self.negotiating_from = None

    def in_transmission(self) -> bool:
        return self.phase == _PHASE_TRANSMISSION

    def take_socket(self) -> int:
        """The socket for a serving thread, which polls (and spins on) it itself."""
        if self.spin_fd >= 0:
            fd, self.spin_fd = self.spin_fd, -1
            self.host.spinner.forget(fd)
            return fd
        return socket_fd(self.transport)

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Graceful: the replies go out first, then a lingering half-close."""
        transmission = self.transmission
        if transmission is not None:
            transmission.sink.flush()
        if self.negotiation is not None:
            self.negotiation.end()  # the handshake is over: its deadline no longer applies
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
        if transmission is not None and transmission.reading_paused:
            transmission.reading_paused = False
            transport.resume_reading()
        self.linger_until = self.loop.time() + LINGER_SECONDS
        self._linger_check()

    def _linger_check(self) -> None:
        transport = self.transport
        self.linger = None
        if self.phase != _PHASE_LINGER or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() == 0 and unread_on(transport) == 0:
            transport.close()
        elif self.loop.time() >= self.linger_until:
            transport.abort()
        else:
            self.linger = self.loop.call_later(LINGER_POLL_SECONDS, self._linger_check)
