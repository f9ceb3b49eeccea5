"""Celery tasks: the disk jobs, run by the Celery worker of the export's node.

`run_job(job_id)` is enqueued by exports_app.services.provisioning on the node's queue
(`node.<name>`). It runs one `Job` from start to end:

    queued ──> running ──> succeeded   (export ready / resized / verified / deleted; published)
                      └──> failed      (error on the job and on the export; nothing half-made)

A worker killed as a whole (SIGKILL, OOM, power loss) cannot hand its job back, and the Redis
broker would redeliver the message only after the visibility timeout (hours): when that worker
(the same Celery node name) starts again, it re-queues the jobs it had left `running`
(`requeue_interrupted_jobs`). A pool process killed alone is covered by reject_on_worker_lost.

Jobs of one export run one at a time, in the order they were requested: a job whose export has
an earlier unfinished job waits for it (re-queued with a short countdown). Every job is safe to
run again (tasks are acked late, so a worker that dies mid-job has it redelivered): the disk
functions in exports_app.services.images are idempotent and never leave a partial image behind.

Jobs touch only files under this host's storage roots (exports_app.services.storage), and of
those only the image each export has on record (`Export.image_identity`): the one its create or
clone job made, or the one an import job took over. A file already at an image's name is never
adopted, overwritten or removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from exports_app.choices import ExportState, JobKind, JobState
from exports_app.models import Export, Job, WebhookDelivery, WorkerNode
from exports_app.models.webhooks import DeliveryState
from exports_app.services import (
    events,
    export_states,
    exports,
    images,
    observer,
    publisher,
    storage,
    webhooks,
)
from exports_app.services.audit import job_actor

__all__ = [
    "PROGRESS_MIN_INTERVAL",
    "WAIT_FOR_DATABASE",
    "WAIT_FOR_EARLIER_JOB",
    "check_certificate_expiry",
    "deliver_webhook",
    "fail_job",
    "observe_workers",
    "publish_pending",
    "requeue_interrupted_jobs",
    "run_job",
]

log = logging.getLogger(__name__)

# Progress is written when the whole percent grew and at least this many seconds passed since
# the last write: a 1 TB clone costs ~100 row updates, a fast job one or two.
PROGRESS_MIN_INTERVAL = 1.0
# Seconds a job waits before looking again whether the export's earlier job has finished.
WAIT_FOR_EARLIER_JOB = 1.0
# Seconds before a job that found the database unreachable is tried again.
WAIT_FOR_DATABASE = 2.0


class JobFailed(Exception):
    """The job cannot be done; the message is for the user."""


class ProgressRecorder:
    """`progress(done, total)` for the disk functions; saves the percent on the job, rarely."""

    def __init__(self, job_id: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id = job_id
        self.clock = clock
        self.saved = 0
        self.saved_at = clock()

    def __call__(self, done: int, total: int) -> None:
        # 100 is written with the job's final state, never before the work is really done.
        percent = min(99, done * 100 // total) if total else 0
        now = self.clock()
        if percent > self.saved and now - self.saved_at >= PROGRESS_MIN_INTERVAL:
            Job.objects.filter(pk=self.job_id).update(progress=percent)
            self.saved, self.saved_at = percent, now


# -- the work of each kind -----------------------------------------------------------------------
# Each returns the export fields to save on success (or None when the export row is gone).


@contextlib.contextmanager
def _place(export: Export, create_parents: bool = False) -> Iterator[images.ImagePlace]:
    """The export's image, reached from this host's storage roots (never from a path only the
    database names), each directory opened without following symbolic links."""
    try:
        with storage.image_place(
            export.node.storage_root, export.image_path, create_parents
        ) as place:
            yield place
    except storage.StorageRefused as exc:
        raise JobFailed(f"Bad image path {export.image_path!r}: {exc}") from None


def _recorder(export: Export) -> Callable[[str], None]:
    """Saves the identity of the image a job is creating, before the image takes its name: a
    redelivered job then knows the image (or its partial file) as its own."""

    def record(identity: str) -> None:
        Export.objects.filter(pk=export.pk).update(image_identity=identity, image_imported=False)
        export.image_identity = identity

    return record


def _owned(export: Export, doing: str) -> str:
    if not export.image_identity:
        raise JobFailed(
            f"nbdweb has no image on record for this export, so it {doing} no file "
            "(create the export again, or import the image explicitly)."
        )
    return export.image_identity


def _create(job: Job, export: Export, progress: ProgressRecorder) -> dict:
    with _place(export, create_parents=True) as place:
        images.create_sparse(
            place, job.params["size"], export.image_identity or None, _recorder(export)
        )
    return {"last_error": ""}


def _clone(job: Job, export: Export, progress: ProgressRecorder) -> dict:
    source = Export.objects.select_related("node").filter(pk=job.params["source_id"]).first()
    if source is None:
        raise JobFailed(f"The source export {job.params.get('source_name')!r} no longer exists.")
    if source.node_id != export.node_id:
        raise JobFailed("The source export is on another node.")
    identity = _owned(source, "copies")
    with _place(source) as source_place:
        try:
            source_fd = images.open_owned(source_place, identity)
        except FileNotFoundError:
            raise JobFailed(f"The source image is missing: {source_place.path}") from None
    try:
        with _place(export, create_parents=True) as place:
            images.clone(
                source_fd,
                place,
                job.params["size"],
                export.image_identity or None,
                _recorder(export),
                progress,
            )
    finally:
        os.close(source_fd)
    return {"last_error": ""}


def _resize(job: Job, export: Export, progress: ProgressRecorder) -> dict:
    size = job.params["size"]
    # Asked again now, from the size the image has now (an earlier resize may have run): a
    # client may have connected since the resize was requested.
    try:
        exports.check_resize(export, size, job.params.get("force", False))
    except ValidationError as exc:
        raise JobFailed(" ".join(exc.messages)) from None
    identity = _owned(export, "resizes")
    with _place(export) as place:
        fd = images.open_owned(place, identity, writable=True)
    try:
        images.resize(fd, size)
    finally:
        os.close(fd)
    # The new size is stored only now that the image has it.
    return {"size": size, "last_error": ""}


def _delete(job: Job, export: Export, progress: ProgressRecorder) -> None:
    identity = export.image_identity
    if not identity:
        log.info("job %s: no image on record for %r; no file is touched", job.pk, export.name)
        return None
    wipe = job.params.get("wipe", False)
    if export.image_imported and not wipe:
        # An imported image was the admin's before the export: it outlives it unless wiped.
        return None
    try:
        with _place(export) as place:
            if wipe:
                fd = images.open_owned(place, identity, writable=True)
                try:
                    images.wipe(fd, progress)
                finally:
                    os.close(fd)
            images.remove(place, identity)
    except FileNotFoundError:
        pass  # already gone (a redelivered delete)
    return None


def _verify(job: Job, export: Export, progress: ProgressRecorder) -> dict:
    identity = _owned(export, "hashes")
    with _place(export) as place:
        fd = images.open_owned(place, identity)
    try:
        digest = images.sha256(fd, progress)
    finally:
        os.close(fd)
    return {"content_sha256": digest, "verified_at": timezone.now()}


def _import(job: Job, export: Export, progress: ProgressRecorder) -> dict:
    """Take an existing file under the node's root as the export's image, once checked (the
    same checks as when the import was asked: the file may have changed since)."""
    with transaction.atomic(), _place(export) as place:
        # Imports take turns (every node row locked, in order): two imports of one file
        # cannot both pass the check before either records its identity.
        list(WorkerNode.objects.select_for_update().order_by("pk").values_list("pk", flat=True))
        check = exports.import_check(export, place.path, job.params["size"])
        try:
            identity = images.take_over(place, check)
        except FileNotFoundError:
            raise JobFailed(f"No file to import at {place.path}.") from None
        except exports.ImportRefused as exc:
            raise JobFailed(str(exc)) from None
        Export.objects.filter(pk=export.pk).update(image_identity=identity, image_imported=True)
    return {"last_error": ""}


WORK = {
    JobKind.CREATE: _create,
    JobKind.CLONE: _clone,
    JobKind.RESIZE: _resize,
    JobKind.DELETE: _delete,
    JobKind.VERIFY: _verify,
    JobKind.IMPORT: _import,
}


# -- state changes -------------------------------------------------------------------------------


def _finish_job(job_id: int, state: str, error: str = "") -> None:
    fields = {"state": state, "error": error, "finished": timezone.now()}
    if state == JobState.SUCCEEDED:
        fields["progress"] = 100
    Job.objects.filter(pk=job_id).update(**fields)
    job = Job.objects.filter(pk=job_id).values("kind", "export_id", "export_name").first()
    if job is not None:
        events.emit(
            "job.succeeded" if state == JobState.SUCCEEDED else "job.failed",
            {"type": "job", "id": job_id, "name": f"{job['kind']} {job['export_name']}"},
            {"kind": job["kind"], "export": job["export_id"], "state": state, "error": error},
        )


def fail_job(job_id: int, error: str) -> None:
    """Mark the job failed and put the error on its export.

    A failed create or clone left no image, a failed delete or verify an image in doubt: the
    export becomes `failed`. A failed resize left the image at its old size, which the export
    still has (it stays served); the error goes to `last_error`.
    """
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            return
        _finish_job(job_id, JobState.FAILED, error)
        export = Export.objects.select_for_update().filter(pk=job.export_id).first()
        if export is None:
            return
        export.last_error = error
        export._change_reason = job_actor(job)  # the audit trail's actor
        state = export_states.state_after_job(export, job, succeeded=False)
        export_states.set_state(export, state, ["last_error"])


def _succeed(job: Job, changes: dict | None) -> None:
    with transaction.atomic():
        _finish_job(job.pk, JobState.SUCCEEDED)
        export = Export.objects.select_for_update().filter(pk=job.export_id).first()
        if export is None:
            return
        export._change_reason = job_actor(job)  # the audit trail's actor
        if job.kind == JobKind.DELETE:
            export.delete()
        else:
            for field, value in changes.items():
                setattr(export, field, value)
            state = export_states.state_after_job(export, job, succeeded=True)
            export_states.set_state(export, state, list(changes))


def _has_earlier_unfinished_job(job: Job) -> bool:
    if job.export_id is None:
        return False
    return (
        Job.objects.filter(export_id=job.export_id, pk__lt=job.pk)
        .exclude(state__in=[JobState.SUCCEEDED, JobState.FAILED])
        .exists()
    )


@shared_task(bind=True, name="exports_app.run_job", max_retries=None, acks_late=True)
def run_job(self, job_id: int) -> str:
    """Run job `job_id`; returns its final state (for the Celery result, not used by nbdweb).

    With the database unreachable (stopped, restarting) the job cannot say how it ended, not
    even that it failed: it is tried again later, from the start (every job is safe to repeat),
    instead of being left `running` for good.
    """
    try:
        return _run_job(self, job_id)
    except (OperationalError, InterfaceError) as exc:
        log.warning(
            "job %s: database unreachable (%s): trying again in %.0f s",
            job_id,
            exc,
            WAIT_FOR_DATABASE,
        )
        queue = (self.request.delivery_info or {}).get("routing_key")
        raise self.retry(countdown=WAIT_FOR_DATABASE, queue=queue) from None


def _run_job(self, job_id: int) -> str:
    job = Job.objects.select_related("node").filter(pk=job_id).first()
    if job is None:
        return "missing"
    if job.is_finished:  # a redelivered message of a job that already ended
        return job.state
    if _has_earlier_unfinished_job(job):
        raise self.retry(countdown=WAIT_FOR_EARLIER_JOB, queue=job.node.celery_queue)
    export = Export.objects.select_related("node").filter(pk=job.export_id).first()
    # Neither case says anything about the image, so the export's state is left alone.
    if export is None:
        _finish_job(job.pk, JobState.FAILED, "The export no longer exists.")
        return JobState.FAILED
    if export.state == ExportState.DELETING and job.kind != JobKind.DELETE:
        _finish_job(job.pk, JobState.FAILED, "The export is being deleted.")
        return JobState.FAILED
    Job.objects.filter(pk=job.pk).update(
        state=JobState.RUNNING,
        started=timezone.now(),
        celery_task_id=self.request.id or "",
        worker=self.request.hostname or "",
    )
    log.info("job %s: %s %r on node %s", job.pk, job.kind, job.export_name, job.node.name)
    try:
        changes = WORK[job.kind](job, export, ProgressRecorder(job.pk))
    except (JobFailed, OSError, ValueError) as exc:
        message = images.describe_error(exc)
        log.warning("job %s failed: %s", job.pk, message)
        fail_job(job.pk, message)
        return JobState.FAILED
    except Exception as exc:
        log.exception("job %s: unexpected error", job.pk)
        fail_job(job.pk, f"Internal error: {images.describe_error(exc)}")
        raise
    _succeed(job, changes)
    log.info("job %s succeeded", job.pk)
    return JobState.SUCCEEDED


def requeue_interrupted_jobs(worker: str) -> list[int]:
    """Queue again the jobs that Celery worker `worker` had running when it died.

    Called when that worker starts, before it takes any job: nothing of its own can be running
    yet, so each of those jobs was interrupted. The job keeps its task id; a stale copy of its
    message that the broker redelivers later finds the job finished and does nothing.
    """
    requeued = []
    for job in Job.objects.select_related("node").filter(state=JobState.RUNNING, worker=worker):
        if not Job.objects.filter(pk=job.pk, state=JobState.RUNNING, worker=worker).update(
            state=JobState.QUEUED, worker=""
        ):
            continue
        log.warning("job %s was interrupted on %s (the worker died): queued again", job.pk, worker)
        run_job.apply_async(args=[job.pk], queue=job.node.celery_queue, task_id=job.celery_task_id)
        requeued.append(job.pk)
    return requeued


@worker_ready.connect
def _on_worker_ready(sender, **kwargs) -> None:
    requeue_interrupted_jobs(sender.hostname)


# -- events (exports_app.services.events) -------------------------------------------------------


@shared_task(bind=True, name="exports_app.deliver_webhook", max_retries=None, acks_late=True)
def deliver_webhook(self, delivery_id: int) -> str:
    """One attempt at a webhook delivery; a failed one is retried with backoff until
    settings.NBDWEB_WEBHOOK_MAX_ATTEMPTS."""
    delivery = WebhookDelivery.objects.select_related("subscription").filter(pk=delivery_id).first()
    if delivery is None or delivery.state != DeliveryState.PENDING:
        return "gone" if delivery is None else delivery.state
    if not delivery.subscription.enabled:
        webhooks.finish(delivery, DeliveryState.FAILED)
        return DeliveryState.FAILED
    result = webhooks.attempt_delivery(delivery)
    if result.ok:
        webhooks.finish(delivery, DeliveryState.SUCCEEDED)
        return DeliveryState.SUCCEEDED
    if delivery.attempts >= settings.NBDWEB_WEBHOOK_MAX_ATTEMPTS:
        webhooks.finish(delivery, DeliveryState.FAILED)
        return DeliveryState.FAILED
    raise self.retry(
        countdown=webhooks.retry_delay(delivery.attempts), queue=settings.NBDWEB_EVENTS_QUEUE
    )


@shared_task(name="exports_app.observe_workers", ignore_result=True)
def observe_workers() -> None:
    """Node online/offline and session opened/ended events (Celery beat, every few seconds)."""
    observer.observe_workers()


@shared_task(name="exports_app.publish_pending", ignore_result=True)
def publish_pending() -> None:
    """Publish the nodes whose changes a dead publisher left (Celery beat, every few seconds)."""
    publisher.publish_pending()


@shared_task(name="exports_app.check_certificate_expiry", ignore_result=True)
def check_certificate_expiry() -> None:
    """`certificate.expiring` events (Celery beat, hourly)."""
    observer.check_expiry()
