"""What the command line, the config source, the status publisher and the metrics drive: one
serving process (`NBDServer`, nbdworker/server.py) or a supervisor of several
(`Supervisor`, nbdworker/supervisor.py). Both implement this one interface."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from nbdworker.contract.config import WorkerConfig
from nbdworker.stats import WorkerStats

__all__ = ["Worker"]


class Worker(Protocol):
    stats: WorkerStats

    async def start(self) -> list[str]:
        """Serve; return the listeners' printable addresses."""
        ...

    async def serve_forever(self) -> None:
        """Until SIGINT/SIGTERM, then a graceful shutdown (a second signal forces it)."""
        ...

    async def shutdown(self) -> None: ...

    def apply_config(self, config: WorkerConfig, changed: Collection[str] | None = None) -> None:
        """Serve `config`; `changed`: the export names it may differ in from the config
        applied (None: any)."""
        ...

    async def apply_changes(self, config: WorkerConfig, changed: Collection[str]) -> None:
        """`apply_config(config, changed)`, what may block (opening images) off the loop."""
        ...

    async def session_report(self, node: str) -> dict[str, dict]:
        """Session id -> public view of each connection in transmission."""
        ...

    async def end_sessions(self, ids: set[str]) -> None:
        """End, gracefully, the sessions an administrator kicked."""
        ...

    async def metric_totals(self) -> dict[str, Any]:
        """The counters for Prometheus (nbdworker/metrics.py)."""
        ...
