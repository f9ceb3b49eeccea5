"""Jobs: disk work on an export's image, run by the Celery worker of the export's node."""

from django.conf import settings
from django.db import models

from exports_app.choices import JobKind, JobState

__all__ = ["Job"]


class Job(models.Model):
    kind = models.CharField(max_length=8, choices=JobKind.choices, editable=False)
    # SET_NULL: a finished delete job outlives its export; export_name keeps it readable.
    export = models.ForeignKey(
        "exports_app.Export",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="jobs",
        editable=False,
    )
    export_name = models.TextField(editable=False)
    node = models.ForeignKey(
        "exports_app.WorkerNode", on_delete=models.CASCADE, related_name="jobs", editable=False
    )
    state = models.CharField(
        max_length=10, choices=JobState.choices, default=JobState.QUEUED, editable=False
    )
    progress = models.PositiveSmallIntegerField(default=0, editable=False, help_text="Percent.")
    error = models.TextField(blank=True, editable=False)
    params = models.JSONField(default=dict, blank=True, editable=False)
    celery_task_id = models.CharField(max_length=64, blank=True, editable=False)
    # The Celery worker (its node name, e.g. celery@host) running the job: when that worker
    # starts again after dying mid-job, it re-queues its jobs left `running` (tasks.py).
    worker = models.CharField(max_length=255, blank=True, editable=False)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        editable=False,
    )
    created = models.DateTimeField(auto_now_add=True)
    started = models.DateTimeField(null=True, blank=True, editable=False)
    finished = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-pk"]
        indexes = [models.Index(fields=["export", "state"], name="job_export_state")]
        permissions = [("retry_job", "Can retry a failed job")]

    def __str__(self) -> str:
        name = self.export_name if len(self.export_name) <= 60 else self.export_name[:57] + "..."
        return f"{self.kind} {name} #{self.pk}"

    @property
    def is_finished(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED)
