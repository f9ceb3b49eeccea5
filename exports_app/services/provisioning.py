"""Provisioning: the one place where the web side asks for disk work on an export.

Each `request_*` function records a `Job` and enqueues it (exports_app.tasks.run_job) on the
Celery queue of the export's node, `node.<name>`, once the surrounding transaction commits: a
worker never sees a job whose rows a rollback would take back. The job then moves the export's
state (provisioning → ready, or failed with `last_error`) and publishes the node's config.

Contract for callers (`exports_app.services.exports`, which the API and the admin call, uses
these inside its transaction, right after saving the export):
- `request_create(export)`: the export was just created in state PROVISIONING.
- `request_clone(export, source)`: likewise, its image is to be a copy of `source`'s.
- `request_resize(export, new_size, force=False)`: the export keeps its stored size until the
  job has resized the image (exports_app.services.export_states).
- `request_import(export)`: the export was just created in state PROVISIONING; its image is the
  existing file at its image path.
- `request_delete(export, wipe=False)`: the export must go. Returns True if the row is already
  deleted, False if deletion continues in the background (the export is left in state DELETING
  and the job deletes the row when the image is gone). The API answers 204 or 202 accordingly.
- `request_verify(export)`: hash the image and store the digest on the export.
- `retry_job(job)`: request a failed job's work again.
"""

from __future__ import annotations

import logging
import uuid
from functools import partial

from django.db import transaction
from simple_history.models import HistoricalRecords

from exports_app.choices import ExportState, JobKind, JobState
from exports_app.models import Export, Job
from exports_app.services import export_states

__all__ = [
    "JobRefused",
    "request_clone",
    "request_create",
    "request_delete",
    "request_import",
    "request_resize",
    "request_verify",
    "retry_job",
]

log = logging.getLogger(__name__)


class JobRefused(ValueError):
    """The job cannot be requested in the export's current state; the message says why."""


def _requesting_user():
    """The user of the current request, like change logging (simple_history's middleware keeps
    the request in a context variable); None outside a request (Celery, shell)."""
    request = getattr(HistoricalRecords.context, "request", None)
    user = getattr(request, "user", None)
    return user if user is not None and user.is_authenticated else None


def _enqueue(export: Export, kind: str, params: dict | None = None) -> Job:
    job = Job.objects.create(
        kind=kind,
        export=export,
        export_name=export.name,
        node=export.node,
        params=params or {},
        requested_by=_requesting_user(),
        # Chosen here so the row names its Celery task before the message exists.
        celery_task_id=str(uuid.uuid4()),
    )
    transaction.on_commit(partial(_send, job.pk, job.celery_task_id, export.node.celery_queue))
    return job


def _send(job_id: int, task_id: str, queue: str) -> None:
    from exports_app.tasks import run_job

    try:
        run_job.apply_async(args=[job_id], queue=queue, task_id=task_id)
    except Exception as exc:  # broker down: say so on the job instead of leaving it queued
        log.exception("cannot enqueue job %s on %s", job_id, queue)
        from exports_app.tasks import fail_job

        fail_job(job_id, f"Could not queue the job on {queue}: {exc}")


def request_create(export: Export) -> Job:
    """Create the export's image: a sparse file of `export.size` bytes."""
    return _enqueue(export, JobKind.CREATE, {"size": export.size})


def request_clone(export: Export, source: Export) -> Job:
    """Create the export's image as a copy of `source`'s (grown to `export.size`)."""
    params = {"size": export.size, "source_id": source.pk, "source_name": source.name}
    return _enqueue(export, JobKind.CLONE, params)


def request_import(export: Export) -> Job:
    """Take the existing file at the export's image path as its image, once the node's job has
    checked it (a regular file of `export.size` bytes under the root, no other export's)."""
    return _enqueue(export, JobKind.IMPORT, {"size": export.size})


def request_resize(export: Export, new_size: int, force: bool = False) -> Job:
    """Resize the image to `new_size`; the export shows `resizing` and keeps its size until the
    job has succeeded. Whether it may (a shrink needs `force` and no live session) is
    `exports_app.services.exports.check_resize`, asked by the callers and the job."""
    job = _enqueue(
        export, JobKind.RESIZE, {"size": new_size, "old_size": export.size, "force": force}
    )
    export_states.job_requested(export, job)
    return job


def request_verify(export: Export) -> Job:
    """Compute the sha256 of the image's contents into `export.content_sha256`."""
    export_states.check_changeable(export)
    job = _enqueue(export, JobKind.VERIFY)
    export_states.job_requested(export, job)
    return job


def request_delete(export: Export, wipe: bool = False) -> bool:
    """Remove the image (zeroing its data first with `wipe`), then the row. Always background."""
    if export.state == ExportState.DELETING:
        # A second DELETE while the first runs: the queued job will finish it.
        return False
    export_states.set_state(export, ExportState.DELETING)
    _enqueue(export, JobKind.DELETE, {"wipe": wipe})
    return False


def retry_job(job: Job) -> Job:
    """Request a failed job's work again, as a new job. Every job is safe to run twice."""
    if job.state != JobState.FAILED:
        raise JobRefused("Only a failed job can be retried.")
    export = job.export
    if export is None:
        raise JobRefused("The export of this job no longer exists.")
    if export.jobs.filter(pk__gt=job.pk).exists():
        raise JobRefused("A newer job exists for this export; retry that one instead.")
    if job.kind in (JobKind.CREATE, JobKind.CLONE, JobKind.IMPORT):
        export.last_error = ""
        export_states.set_state(export, export_states.JOB_STATES[job.kind], ["last_error"])
        return _enqueue(export, job.kind, job.params)
    if job.kind == JobKind.RESIZE:
        # A failed resize left the size as it was; ask for the new one again.
        return request_resize(export, job.params["size"], force=job.params.get("force", False))
    if job.kind == JobKind.DELETE:
        export_states.set_state(export, ExportState.DELETING)
        return _enqueue(export, JobKind.DELETE, job.params)
    return request_verify(export)
