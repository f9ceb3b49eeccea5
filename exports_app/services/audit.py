"""The audit trail: who changed what, with the before and after of each field.

Model changes are recorded by django-simple-history on every save (the API's and the admin's,
with the request's user; a job's, with the job as the actor through `job_actor`). Actions that
change no row (ending a session, renewing a certificate on someone's behalf) are recorded as
events with `record_event`, in the admin's log with a plain-text message; the admin's own log
entries of its saves (JSON messages) repeat what the history holds and are left out of the
trail.
"""

from __future__ import annotations

from typing import Any

from django.contrib.admin.models import CHANGE, LogEntry
from django.db import models

__all__ = ["job_actor", "record_event"]


def job_actor(job: Any) -> str:
    """The change reason a job's saves carry: the trail shows the job as their actor."""
    return f"job #{job.pk} ({job.kind})"


def record_event(user: Any, obj: models.Model, message: str) -> None:
    """Record an action on `obj` by `user` (an authenticated user; anonymous ones cannot act)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return
    LogEntry.objects.log_actions(
        user.pk, [obj], CHANGE, change_message=message[:2000], single_object=True
    )
