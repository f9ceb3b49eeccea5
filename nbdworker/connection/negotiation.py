"""The handshake of one connection: drives the sans-IO `Handshake` under its deadline.

Bytes from the client go in (`data`); the Handshake's replies go out through the connection;
its events end the negotiation one of four ways, each handed to the connection (`Negotiator`):
transmission (`Ready`), STARTTLS, a clean end (`Closed`) or a protocol error. Export lookups,
listing and per-export authorization (nbdworker/auth.py) are answered from the configuration
generation the connection was accepted under.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from nbdworker.auth import ClientIdentity, ExportAuthorizer
from nbdworker.connection.host import ConnectionHost
from nbdworker.contract.config import ExportConfig
from nbdworker.exports import ServerState
from nbdworker.protocol import (
    NEED_DATA,
    Closed,
    ExportView,
    Handshake,
    HandshakeLimits,
    Option,
    OptionHandled,
    ProtocolError,
    Ready,
    Reply,
    StartTLS,
)
from nbdworker.session import HandshakeFailure, SessionRecord

__all__ = ["HANDSHAKE_BUFFER", "Negotiation", "Negotiator"]

log = logging.getLogger("nbdworker.connection")

# The handshake parser keeps its own buffer: this one only has to take each read.
HANDSHAKE_BUFFER = 4096
_EXPORT_OPTIONS = (Option.INFO, Option.GO, Option.EXPORT_NAME)


class Negotiator(Protocol):
    """What the negotiation asks of its connection (shell.py)."""

    def negotiating(self) -> bool: ...

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def begin_tls(self) -> None: ...

    def begin_transmission(self, ready: Ready, trailing: bytes) -> None: ...

    def request_spin(self) -> None: ...


class Negotiation:
    def __init__(
        self,
        conn: Negotiator,
        host: ConnectionHost,
        state: ServerState,
        record: SessionRecord,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.conn = conn
        self.host = host
        self.state = state
        self.record = record
        self.peer = record.peer
        self.loop = loop
        self.buffer = memoryview(bytearray(HANDSHAKE_BUFFER))
        self.authorizer = ExportAuthorizer(self._export_config, record.peername)
        self.hs = Handshake(
            lookup=self._lookup,
            listing=self._listing,
            tls_mode=state.tls_mode,
            authorize=self._authorize,
            limits=HandshakeLimits(),
        )
        self.deadline: asyncio.TimerHandle | None = loop.call_later(
            state.config.limits.handshake_timeout, self._expired
        )

    def greet(self) -> None:
        self.conn.send(self.hs.data_to_send())

    def time_left(self) -> float:
        if self.deadline is None:
            return self.state.config.limits.handshake_timeout
        return max(self.deadline.when() - self.loop.time(), 0.001)

    def end(self) -> None:
        """Transmission began or the connection is gone: the deadline no longer applies."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def shutdown(self) -> None:
        self.hs.start_shutdown()

    def tls_started(self, identity: ClientIdentity | None) -> None:
        """TLS is up: options from here on are answered for this identity."""
        self.authorizer.identity = identity
        self.hs.tls_started()

    # -- the Handshake's callbacks ----------------------------------------------------------------

    def _lookup(self, name: str) -> ExportView | None:
        entry = self.state.lookup(name)
        return entry.view if entry is not None else None

    def _listing(self) -> Iterable[ExportView]:
        return [entry.view for entry in self.state.exports.values()]

    def _export_config(self, name: str) -> ExportConfig | None:
        entry = self.state.exports.get(name)
        return entry.config if entry is not None else None

    def _authorize(self, view: ExportView) -> str | None:
        entry = self.state.exports.get(view.name)
        if entry is None:
            return "export is gone"
        # allowed_networks and allowed_clients (against the certificate, once TLS is up).
        reason = self.authorizer(view)
        if reason is not None:
            return reason
        if not self.host.export_slot_free(entry):
            return f"export connection limit ({entry.config.max_connections}) reached"
        return None

    # -- driving it -------------------------------------------------------------------------------

    def _expired(self) -> None:
        self.deadline = None
        log.info("%s: handshake deadline passed: dropping", self.peer)
        self.record.handshake_failure = HandshakeFailure.TIMEOUT
        self.conn.abort()

    def data(self, data: bytes) -> None:
        """Bytes from the client (b"": it closed its side)."""
        hs = self.hs
        conn = self.conn
        try:
            hs.receive_data(data)
            while conn.negotiating():
                event: Any = hs.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, OptionHandled):
                    self._handled(event)
                elif isinstance(event, Ready):
                    conn.send(hs.data_to_send())
                    conn.begin_transmission(event, hs.trailing_data())
                    conn.request_spin()
                    return
                elif isinstance(event, Closed):
                    conn.send(hs.data_to_send())
                    level = logging.INFO if event.error else logging.DEBUG
                    log.log(level, "%s: handshake ended: %s", self.peer, event.reason)
                    conn.close()
                    return
                elif isinstance(event, StartTLS):
                    conn.send(hs.data_to_send())
                    conn.begin_tls()
                    return
        except ProtocolError as exc:
            log.info("%s: protocol error in handshake: %s", self.peer, exc)
            conn.send(hs.data_to_send())
            conn.abort()
            return
        conn.send(hs.data_to_send())
        conn.request_spin()

    def _handled(self, event: OptionHandled) -> None:
        log.debug("%s: %s -> %s %s", self.peer, event.option, event.reply, event.detail)
        if event.reply == Reply.ERR_TLS_REQD:
            self.record.handshake_failure = HandshakeFailure.TLS_REQUIRED
        elif event.reply == Reply.ERR_POLICY:
            self.record.handshake_failure = HandshakeFailure.NOT_AUTHORIZED
            if event.option in _EXPORT_OPTIONS:
                # Each export refusal the client receives (LIST filtering is none).
                log.warning("%s: %s", self.authorizer.describe(), event.detail)
