"""What a connection needs of the server that accepted it (nbdworker/server.py implements it)."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Protocol

from nbdworker.backendholds import BackendHolds
from nbdworker.exports import ExportEntry, ServerState
from nbdworker.settings import WorkerSettings
from nbdworker.spin import IdleSpinner

__all__ = ["ConnectionHost"]


class ConnectionHost(Protocol):
    settings: WorkerSettings  # the node's own (busy_poll_us for the serving threads)
    spinner: IdleSpinner  # polls the process's sockets before the loop sleeps (spin.py)
    executor: Executor  # blocking backend calls: flush, fallocate, cold reads
    serving_threads: Executor  # one serving thread per plain connection in transmission
    backend_holds: BackendHolds  # a connection holds its generation, then its export's backend

    @property
    def state(self) -> ServerState:
        """The current configuration generation."""
        ...

    # The connection passes itself; the host keeps it only to count it and to end it.
    def admit(self, conn: Any) -> bool: ...

    def connection_closed(self, conn: Any) -> None: ...

    # Connections still negotiating, per client address (--max-handshakes-per-address) and in
    # all (--max-handshakes): None when counted in, else the HandshakeFailure to close with.
    def handshake_started(self, address: str) -> str | None: ...

    def handshake_ended(self, address: str) -> None: ...

    def export_slot_free(self, entry: ExportEntry) -> bool: ...

    def export_opened(self, name: str) -> None: ...

    def export_closed(self, name: str) -> None: ...

    def request_spin(self) -> None: ...
