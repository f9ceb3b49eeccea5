"""The export table of one configuration generation: what a connection negotiates against.

`ServerState` is immutable and replaced whole by `NBDServer.apply_config` (nbdworker/server.py):
a connection keeps the generation it was accepted under for its whole life.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from nbdworker.backends import Backend
from nbdworker.contract.config import ExportConfig, WorkerConfig
from nbdworker.protocol import ExportView, TLSMode

__all__ = ["ExportEntry", "ServerState"]


@dataclass(eq=False, slots=True)
class ExportEntry:
    config: ExportConfig
    backend: Backend
    view: ExportView


@dataclass(frozen=True, slots=True)
class ServerState:
    """One configuration generation, with its exports opened."""

    config: WorkerConfig
    exports: dict[str, ExportEntry] = field(default_factory=dict)
    tls_mode: TLSMode = TLSMode.NOTLS
    # The server context of this generation's TLS policy (None: NOTLS, or the policy is unusable).
    tls_context: ssl.SSLContext | None = None

    def lookup(self, name: str) -> ExportEntry | None:
        if name == "" and self.config.default_export is not None:
            name = self.config.default_export
        return self.exports.get(name)
