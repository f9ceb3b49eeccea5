"""What the rest of the worker may know about one connection: `SessionRecord`.

The connection (nbdworker/connection/) fills it in as it goes: the peer at accept, the identity
and TLS version once TLS is up, the export at the start of transmission, and the counters per
request. The server, the reload rules (nbdworker/reload.py), the metrics and the status
publisher read only this record, never the connection's own state.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from nbdworker.auth import ClientIdentity, peer_ip
from nbdworker.exports import ExportEntry, ServerState
from nbdworker.protocol import CMD_READ, CMD_WRITE

__all__ = [
    "BYTES",
    "COUNTS_SIZE",
    "HandshakeFailure",
    "SessionRecord",
    "format_peer",
    "new_counts",
    "new_session_id",
]

# counts[command] = requests, counts[BYTES + command] = bytes (the request's length field).
BYTES = 16
COUNTS_SIZE = 2 * BYTES


class HandshakeFailure:
    """Why a connection ended before transmission (the metric's `reason` label)."""

    TLS_REQUIRED = "tls_required"
    NOT_AUTHORIZED = "not_authorized"
    BAD_CERTIFICATE = "bad_certificate"
    TLS_ERROR = "tls_error"
    TIMEOUT = "timeout"
    # Closed at once: too many connections from its address were still negotiating.
    HANDSHAKE_CAP = "handshake_cap"
    # Closed at once: too many connections (from anyone) were negotiating in this process.
    HANDSHAKE_LIMIT = "handshake_limit"


def new_counts() -> list[int]:
    return [0] * COUNTS_SIZE


# One random draw per process and a counter per session (a draw per session was a getrandom
# syscall on every connect): 16 hex digits, unique across the node's processes and restarts.
_SESSION_PREFIX = secrets.token_hex(4)
_session_numbers = itertools.count(1)


def new_session_id() -> str:
    return f"{_SESSION_PREFIX}{next(_session_numbers) & 0xFFFFFFFF:08x}"


def format_peer(peername: Any) -> str:
    """`host:port` ([v6]:port) of a transport's peername; "unix" for a Unix socket."""
    if isinstance(peername, tuple):
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(eq=False, slots=True)
class SessionRecord:
    peername: Any  # the transport's, as given (a tuple; "" or None for a Unix socket)
    state: ServerState  # the configuration generation the connection negotiates under
    peer: str = "?"  # printable, for logs and the session list
    id: str = field(default_factory=new_session_id)
    connected_at: float = field(default_factory=time.time)
    entry: ExportEntry | None = None  # set at the start of transmission
    identity: ClientIdentity | None = None  # the client certificate's, once TLS is up
    tls_version: str | None = None  # "TLSv1.3", once TLS is up
    # counts[command] = requests, counts[BYTES + command] = bytes (nbdworker/metrics.py)
    counts: list[int] = field(default_factory=new_counts)
    errors: dict[int, int] = field(default_factory=dict)  # NBD errno -> error replies
    handshake_failure: str | None = None  # why the handshake failed (a HandshakeFailure)
    ending: bool = False  # a graceful end has begun: no new request is executed
    _address: str | None | bool = False  # False: not parsed yet

    @property
    def tls(self) -> bool:
        return self.tls_version is not None

    @property
    def address(self) -> str | None:
        """The peer's IP address, normalised (None for Unix sockets); parsed once, when asked."""
        address = self._address
        if address is False:
            address = self._address = peer_ip(self.peername)
        return address  # type: ignore[return-value]

    @property
    def export(self) -> str | None:
        return self.entry.config.name if self.entry is not None else None

    def public_view(self, node: str) -> dict[str, Any]:
        """The session as the web side lists it (nbdworker/status.py); in transmission only."""
        counts = self.counts
        identity = self.identity
        return {
            "id": self.id,
            "node": node,
            "client": self.peer,
            "export": self.export,
            "tls": self.tls,
            "client_identity": None
            if identity is None
            else {
                "common_names": list(identity.common_names),
                "serial": identity.serial,
                "fingerprint_sha256": identity.fingerprint_sha256,
            },
            "reads": counts[CMD_READ],
            "bytes_read": counts[BYTES + CMD_READ],
            "writes": counts[CMD_WRITE],
            "bytes_written": counts[BYTES + CMD_WRITE],
            "requests": sum(counts[:BYTES]),
            "connected_since": _iso(self.connected_at),
        }
