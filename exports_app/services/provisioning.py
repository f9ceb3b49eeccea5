"""Provisioning hooks: the one place where the web side asks for disk work on an export.

The API and the admin call these inside the request's database transaction, right after saving
the export. Today they do no disk work. The jobs (issue 7) replace their bodies: create a Job,
enqueue it on the node's queue (`export.node.celery_queue`) with `transaction.on_commit`, and let
the job move `export.state` (provisioning → ready, or failed with `last_error`).

Contract for callers:
- `request_create(export)`: the export was just created in state PROVISIONING.
- `request_resize(export, old_size, force=False)`: `export.size` already holds the new size.
- `request_delete(export)`: the export must go. Return True if the row is already deleted, False
  if deletion continues in the background (the export is then left in state DELETING and the job
  deletes the row when the image is gone). The API answers 204 or 202 accordingly.
"""

from exports_app.choices import ExportState
from exports_app.models import Export

__all__ = ["request_create", "request_delete", "request_resize"]


def request_create(export: Export) -> None:
    """Ask for the export's image to be created. No-op until the jobs land."""


def request_resize(export: Export, old_size: int, force: bool = False) -> None:
    """Ask for the export's image to be resized to `export.size`. No-op until the jobs land."""


def request_delete(export: Export) -> bool:
    """Delete the export. Until the jobs land, the row goes at once and the image stays on disk."""
    export.state = ExportState.DELETING
    export.save(update_fields=["state", "last_updated"])
    export.delete()
    return True
