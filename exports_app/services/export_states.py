"""An export's state, changed in one place so it tells the truth and can be watched.

    provisioning ──> ready <──> resizing | verifying      (served while resizing or verifying)
    cloning ───────> ready
    (any) ─────────> deleting ──> (row gone)
    provisioning | cloning | verifying ──> failed         (the job failed; see last_error)

While a job works on the image the export shows that job's state, and what the job changes
(the size of a resize) is stored only when it has succeeded. Jobs of one export run in order:
when one ends, the export shows the state of the next one waiting, else `ready`.

`export_state_changed` is sent (after the transaction commits) for every change made here, with
`export`, `old_state` and `new_state`: the one hook for anything that reports state changes.
"""

from __future__ import annotations

from functools import partial

from django.db import transaction
from django.dispatch import Signal

from exports_app.choices import ExportState, JobKind, JobState
from exports_app.models import Export, Job

__all__ = [
    "JOB_STATES",
    "SERVED_STATES",
    "export_state_changed",
    "job_requested",
    "set_state",
    "state_after_job",
]

# sender=Export; export, old_state, new_state.
export_state_changed = Signal()

# The export's state while a job of each kind runs (or waits to run).
JOB_STATES = {
    JobKind.CREATE: ExportState.PROVISIONING,
    JobKind.CLONE: ExportState.CLONING,
    JobKind.IMPORT: ExportState.PROVISIONING,
    JobKind.RESIZE: ExportState.RESIZING,
    JobKind.VERIFY: ExportState.VERIFYING,
    JobKind.DELETE: ExportState.DELETING,
}
# The image exists and is whole: the worker serves the export.
SERVED_STATES = frozenset({ExportState.READY, ExportState.RESIZING, ExportState.VERIFYING})


def set_state(export: Export, state: str, fields: tuple[str, ...] | list[str] = ()) -> None:
    """Save `export` with `state` (and `fields`, already set on it); announce the change once
    the transaction commits."""
    old_state = Export.objects.filter(pk=export.pk).values_list("state", flat=True).first()
    export.state = state
    export.save(update_fields=["state", *fields, "last_updated"])
    if old_state != state:
        transaction.on_commit(
            partial(
                export_state_changed.send,
                sender=Export,
                export=export,
                old_state=old_state,
                new_state=state,
            )
        )


def _unfinished_jobs(export: Export):
    return Job.objects.filter(export_id=export.pk).exclude(
        state__in=[JobState.SUCCEEDED, JobState.FAILED]
    )


def job_requested(export: Export, job: Job) -> None:
    """A job of `export` was just recorded: the export shows it, unless an earlier job still
    runs (the export shows that one until it ends)."""
    if export.state in (ExportState.DELETING, ExportState.FAILED):
        return
    if _unfinished_jobs(export).filter(pk__lt=job.pk).exists():
        return
    set_state(export, JOB_STATES[job.kind])


def state_after_job(export: Export, job: Job, succeeded: bool) -> str:
    """The export's state once `job` has ended: the next waiting job's, or ready (failed if a
    job that makes or checks the image failed). A delete in progress keeps its state."""
    if job.kind == JobKind.DELETE and not succeeded:
        return ExportState.FAILED
    if export.state == ExportState.DELETING:
        return ExportState.DELETING
    if not succeeded and job.kind != JobKind.RESIZE:
        return ExportState.FAILED
    making = (JobKind.CREATE, JobKind.CLONE, JobKind.IMPORT)
    if export.state == ExportState.FAILED and job.kind not in making:
        return ExportState.FAILED
    following = _unfinished_jobs(export).filter(pk__gt=job.pk).order_by("pk").first()
    return JOB_STATES[following.kind] if following is not None else ExportState.READY
