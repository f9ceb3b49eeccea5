"""The global change log: every tracked model's history (field-by-field diffs, the user or the
job that made the change) and the recorded events (`services.audit`), newest first, filtered
by object, user and time; a user sees the changes of the models they may view."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib.admin.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.urls import NoReverseMatch, reverse

from exports_app.models import Certificate, CertificateAuthority, Export, TLSPolicy, WorkerNode
from exports_app.validators import parse_object_id

__all__ = ["TRACKED", "ChangeEntry", "change_entries"]

# Models whose history the log shows, by the name the filter uses.
TRACKED: dict[str, type[models.Model]] = {
    "export": Export,
    "workernode": WorkerNode,
    "tlspolicy": TLSPolicy,
    "certificate": Certificate,
    "certificateauthority": CertificateAuthority,
}
# Long values (PEM blocks) are cut in the diff.
VALUE_CHARS = 120
# Fields whose change says nothing by itself.
QUIET_FIELDS = {"last_updated", "name_digest"}
ACTIONS = {"+": "created", "~": "changed", "-": "deleted"}


@dataclass
class ChangeEntry:
    time: datetime
    actor: str
    model: str  # verbose name
    object_repr: str
    object_url: str | None
    action: str  # created, changed, deleted, event
    changes: list[tuple[str, str, str]] = field(default_factory=list)
    message: str = ""


def _short(value: Any) -> str:
    if isinstance(value, datetime):
        value = value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    text = "-" if value in (None, "") else str(value)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"


def _url(model: type[models.Model], pk: Any) -> str | None:
    try:
        return reverse(f"admin:exports_app_{model._meta.model_name}_change", args=[pk])
    except NoReverseMatch:
        return None


def _label(model: type[models.Model], name: str) -> str:
    try:
        return str(model._meta.get_field(name).verbose_name)
    except Exception:
        return name


def _related(record: Any, name: str, key: Any) -> str:
    """A foreign key by its object's name (its id when the object is gone)."""
    if key is None:
        return "-"
    try:
        return str(getattr(record, name))
    except Exception:
        return f"#{key}"


def _other_end(row: Any, own: str) -> str:
    """One m2m through-row ({'tlspolicy': 1, 'certificateauthority': 2}) as the other end's id."""
    if isinstance(row, dict):
        others = [v for k, v in row.items() if k != own]
        return f"#{others[0]}" if others else str(row)
    return str(row)


def _diff(model: type[models.Model], old: Any, new: Any) -> list[tuple[str, str, str]]:
    """Field by field, non-editable fields included (simple-history's own diff skips them, and
    the state, errors and revocation fields are all non-editable)."""
    changes = []
    for f in new.tracked_fields:
        if f.name in QUIET_FIELDS:
            continue
        before, after = getattr(old, f.attname), getattr(new, f.attname)
        if before != after:
            if f.is_relation:
                before, after = _related(old, f.name, before), _related(new, f.name, after)
            changes.append((_label(model, f.name), _short(before), _short(after)))
    m2m = [f.name for f in getattr(new, "_history_m2m_fields", [])]
    if m2m:
        for change in new.diff_against(old, included_fields=m2m).changes:
            own = model._meta.model_name
            before = ", ".join(_other_end(v, own) for v in change.old) or "-"
            after = ", ".join(_other_end(v, own) for v in change.new) or "-"
            changes.append((_label(model, change.field), _short(before), _short(after)))
    return changes


def _history_entries(
    model: type[models.Model],
    *,
    query: str,
    username: str,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[ChangeEntry]:
    records = model.history.select_related("history_user").order_by("-history_date", "-pk")
    if query:
        # An object's ID in ASCII digits and within range ("²".isdigit() is true too).
        object_id = parse_object_id(query)
        records = (
            records.filter(id=object_id)
            if object_id is not None
            else records.filter(name__icontains=query)
        )
    if username:
        if username.startswith("job"):
            records = records.filter(history_change_reason__startswith=username)
        else:
            records = records.filter(history_user__username=username)
    if since is not None:
        records = records.filter(history_date__gte=since)
    if until is not None:
        records = records.filter(history_date__lte=until)
    entries = []
    for record in records[:limit]:
        changes = []
        if record.history_type == "~":
            previous = record.prev_record
            if previous is not None:
                changes = _diff(model, previous, record)
        if record.history_user is not None:
            actor = record.history_user.get_username()
        else:
            actor = record.history_change_reason or "system"
        entries.append(
            ChangeEntry(
                time=record.history_date,
                actor=actor,
                model=str(model._meta.verbose_name),
                object_repr=str(getattr(record, "name", record.id))[:200],
                object_url=_url(model, record.id) if record.history_type != "-" else None,
                action=ACTIONS.get(record.history_type, record.history_type),
                changes=changes,
                message=record.history_change_reason
                if record.history_user is not None and record.history_change_reason
                else "",
            )
        )
    return entries


def _event_entries(
    models_: list[type[models.Model]],
    *,
    query: str,
    username: str,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> list[ChangeEntry]:
    types = ContentType.objects.get_for_models(*models_)
    events = (
        LogEntry.objects.filter(content_type__in=types.values())
        # The admin's own entries of its saves hold a JSON list; events hold plain text.
        .exclude(change_message__startswith="[")
        .exclude(change_message="")
        .select_related("user", "content_type")
        .order_by("-action_time", "-pk")
    )
    if query:
        events = (
            events.filter(object_id=query)
            if parse_object_id(query) is not None
            else events.filter(object_repr__icontains=query)
        )
    if username:
        events = events.filter(user__username=username)
    if since is not None:
        events = events.filter(action_time__gte=since)
    if until is not None:
        events = events.filter(action_time__lte=until)
    entries = []
    for event in events[:limit]:
        model = event.content_type.model_class()
        entries.append(
            ChangeEntry(
                time=event.action_time,
                actor=event.user.get_username(),
                model=str(model._meta.verbose_name) if model else event.content_type.model,
                object_repr=event.object_repr,
                object_url=_url(model, event.object_id) if model else None,
                action="event",
                message=event.change_message,
            )
        )
    return entries


def change_entries(
    user: Any,
    *,
    model: str = "",
    query: str = "",
    username: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 200,
) -> list[ChangeEntry]:
    """The newest `limit` changes and events the user may see, matching the filters."""
    chosen = [
        m
        for name, m in TRACKED.items()
        if (not model or model == name) and user.has_perm(f"exports_app.view_{name}")
    ]
    filters = {"query": query.strip(), "username": username.strip(), "since": since,
               "until": until, "limit": limit}  # fmt: skip
    entries: list[ChangeEntry] = []
    for m in chosen:
        entries += _history_entries(m, **filters)
    if chosen and not filters["username"].startswith("job"):
        entries += _event_entries(chosen, **filters)
    entries.sort(key=lambda e: e.time, reverse=True)
    return entries[:limit]
