"""Publishing worker configuration: the one entry point every change goes through.

`schedule_publish(node)` is called by the API, the admin and the jobs after they change anything a
node's worker serves. It publishes after the surrounding database transaction commits, never
before. (The config-distribution work fills in the snapshot building, signing and Redis
delivery behind this function.)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["schedule_publish"]


def schedule_publish(nodes: object | Iterable[object]) -> None:
    """Publish the config of `nodes` (a WorkerNode or several) once the transaction commits."""
