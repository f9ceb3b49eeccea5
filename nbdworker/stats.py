"""The worker's own counters: what ended connections leave behind, and worker-wide events.
Read by the metrics (nbdworker/metrics.py) and the heartbeat (nbdworker/status.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbdworker.configsource import FollowerHealth

__all__ = ["WorkerStats"]


class WorkerStats:
    """Totals the connections hand over when they end, plus worker-wide events.

    Touched only on the event loop thread.
    """

    def __init__(self) -> None:
        self.started = time.time()
        self.generation = 0
        self.connections_opened: dict[str, int] = {}
        self.retired_counts: dict[str, list[int]] = {}
        self.errors: dict[tuple[str, int], int] = {}
        self.handshake_failures: dict[str, int] = {}
        self.config_rejected: dict[str, int] = {}
        # Exports this process would not serve, by reason (nbdworker/imagefile.py).
        self.exports_refused: dict[str, int] = {}
        # The config follower's health (nbdworker/configsource.py); None with --config.
        self.follower: FollowerHealth | None = None

    def export_opened(self, export: str) -> None:
        self.connections_opened[export] = self.connections_opened.get(export, 0) + 1

    def retire(self, export: str, counts: list[int], errors: dict[int, int]) -> None:
        """Fold the counters of an ended connection into its export's totals."""
        total = self.retired_counts.get(export)
        if total is None:
            self.retired_counts[export] = list(counts)
        else:
            for i, n in enumerate(counts):
                if n:
                    total[i] += n
        for errno, n in errors.items():
            self.errors[export, errno] = self.errors.get((export, errno), 0) + n

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def export_refused(self, reason: str) -> None:
        self.exports_refused[reason] = self.exports_refused.get(reason, 0) + 1

    def snapshot_rejected(self, reason: str) -> None:
        self.config_rejected[reason] = self.config_rejected.get(reason, 0) + 1
