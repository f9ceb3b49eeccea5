"""An export's state, changed in one place so it tells the truth and can be watched.

    provisioning ──> ready <──> resizing | verifying      (served while resizing or verifying)
    cloning ───────> ready
    (any) ─────────> deleting ──> (row gone)
    provisioning | cloning | verifying ──> failed         (the job failed; see last_error)

While a job works on the image the export shows that job's state, and what the job changes
(the size of a resize) is stored only when it has succeeded. Jobs of one export run in order:
when one ends, the export shows the state of the next one waiting, else `ready`.

Every change is saved with the model, so the one source of `export.state_changed` events is
the Export model signals in exports_app/event_signals.py: they also see an export made or
deleted, and whatever path saves the state (no second announcement is sent from here).
"""

from __future__ import annotations

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError

from exports_app.choices import ExportState, JobKind, JobState
from exports_app.models import Export, Job

__all__ = [
    "JOB_STATES",
    "SERVED_STATES",
    "StateConflict",
    "check_changeable",
    "job_requested",
    "set_state",
    "state_after_job",
]

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


class StateConflict(ValidationError):
    """Refused because of the export's state, not the input: the API answers 409 Conflict; a
    form or an admin action shows the message like any other refusal."""


def check_changeable(export: Export) -> None:
    """An export being deleted takes no more changes or jobs: its delete job owns it now."""
    if export.state == ExportState.DELETING:
        raise StateConflict({NON_FIELD_ERRORS: ["The export is being deleted."]})


def set_state(export: Export, state: str, fields: tuple[str, ...] | list[str] = ()) -> None:
    """Save `export` with `state` (and `fields`, already set on it). The save is what reports
    the change (exports_app/event_signals.py)."""
    export.state = state
    export.save(update_fields=["state", *fields, "last_updated"])


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
