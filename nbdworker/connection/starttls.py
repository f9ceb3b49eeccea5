"""STARTTLS: the TLS handshake on an acknowledged connection, and vetting the client after it.

The connection (shell.py) stops reading the raw socket with the ACK, so whatever the client sends
next goes to the TLS layer. `TLSUpgrade.handshake` runs `loop.start_tls` as server under what is
left of the negotiation deadline; `vet` checks the client certificate against the policy's
revocations (nbdworker/tls.py) and records who the client is. No downgrade, no second chance:
a failure ends the connection. See docs/tls.md.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from nbdworker.contract.config import TLSConfig
from nbdworker.session import HandshakeFailure, SessionRecord
from nbdworker.tls import check_peer

__all__ = ["TLSUpgrade"]

log = logging.getLogger("nbdworker.connection")


class TLSUpgrade:
    def __init__(self, loop: asyncio.AbstractEventLoop, record: SessionRecord) -> None:
        self.loop = loop
        self.record = record
        self.peer = record.peer
        # Decrypted bytes that arrive between the end of the TLS handshake and the moment the
        # negotiation takes them (the client's first options), and whether it closed meanwhile.
        self.early = bytearray()
        self.eof = False
        self.task: asyncio.Task | None = None

    def take_early(self) -> tuple[bytes, bool]:
        early, self.early = bytes(self.early), bytearray()
        return early, self.eof

    async def handshake(
        self,
        raw: asyncio.BaseTransport,
        protocol: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        timeout: float,
    ) -> tuple[bool, asyncio.Transport | None]:
        """(True, the TLS transport), or (False, None) when the handshake failed: logged,
        counted, the raw transport aborted."""
        try:
            transport = await self.loop.start_tls(
                raw,  # type: ignore[arg-type]
                protocol,
                context,
                server_side=True,
                ssl_handshake_timeout=timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # A certificate that does not verify is a refusal worth a warning; the rest is
            # noise from broken clients.
            bad_certificate = isinstance(exc, ssl.SSLCertVerificationError)
            level = logging.WARNING if bad_certificate else logging.INFO
            log.log(level, "%s: TLS handshake failed: %s", self.peer, exc or type(exc).__name__)
            self.record.handshake_failure = (
                HandshakeFailure.BAD_CERTIFICATE
                if bad_certificate
                else HandshakeFailure.TIMEOUT
                if isinstance(exc, TimeoutError)
                else HandshakeFailure.TLS_ERROR
            )
            raw.abort()  # type: ignore[attr-defined]
            return False, None
        return True, transport

    def vet(self, transport: asyncio.BaseTransport, policy: TLSConfig) -> bool:
        """Whether the client may go on (before any option is answered over TLS); records its
        identity and TLS version."""
        peer = check_peer(transport.get_extra_info("ssl_object"), policy)
        who = peer.identity.describe() if peer.identity else "no certificate"
        if peer.refusal is not None:
            log.warning(
                "%s [%s]: refused after the TLS handshake: %s", self.peer, who, peer.refusal
            )
            self.record.handshake_failure = HandshakeFailure.BAD_CERTIFICATE
            return False
        log.info("%s: TLS up (%s, %s) [%s]", self.peer, peer.version, peer.cipher, who)
        self.record.identity = peer.identity
        self.record.tls_version = peer.version or "TLS"
        return True
