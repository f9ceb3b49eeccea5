"""nbdweb's events: the one place that records them, and reads them back.

`emit(kind, obj, data)` appends the event to a Redis stream (`EVENT_STREAM`, capped at about
`settings.NBDWEB_EVENTS_MAX_LENGTH` entries) once the caller's transaction commits, then fans it
out to the webhook subscriptions that want it (`services.webhooks.fan_out`: a delivery row and
a Celery task each). The server-sent-events endpoint and `/api/v1/events/` read the same
stream, so a tool sees the same events whether it holds a connection open or takes webhooks.

An event's ID is its stream ID (`<ms>-<seq>`): it grows, so a reader resumes after the last one
it saw (`Last-Event-ID`). Each entry is signed with a key of the web side's own
(`nodekeys.web_key`): an entry anyone else who can write to Redis adds is skipped when read,
logged and counted (`refused_events`). Emitting never fails the caller: with Redis unreachable
the event is logged, and the webhooks still get it under a local ID.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from redis.exceptions import RedisError

from exports_app.services.nodekeys import web_key
from exports_app.services.publishing import redis_client
from nbdworker.contract.statusrecord import RecordRefused, open_record, sign_record

__all__ = [
    "EVENT_KINDS",
    "EVENT_KIND_CHOICES",
    "EVENT_STREAM",
    "Event",
    "emit",
    "latest_id",
    "parse_event_id",
    "read_after",
    "read_entries",
    "validate_kinds",
    "visible_to",
]

log = logging.getLogger(__name__)

EVENT_STREAM = "nbdweb:events"
_EVENTS_PURPOSE = "events"
# Far above any event nbdweb records; a bigger entry is skipped unparsed.
MAX_EVENT_BYTES = 64 << 10
# Stream entries skipped as not nbdweb's, by reason, since this process started.
refused_events: Counter[str] = Counter()

# kind -> the permission a user needs to see it (the one that lists the object in the API).
EVENT_KINDS: dict[str, str] = {
    "export.state_changed": "exports_app.view_export",
    "job.succeeded": "exports_app.view_job",
    "job.failed": "exports_app.view_job",
    "session.opened": "exports_app.view_export",
    "session.ended": "exports_app.view_export",
    "certificate.revoked": "exports_app.view_certificate",
    "certificate.expiring": "exports_app.view_certificate",
    "node.online": "exports_app.view_workernode",
    "node.offline": "exports_app.view_workernode",
}

EVENT_KIND_CHOICES = [(kind, kind) for kind in EVENT_KINDS]

_EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


@dataclass(frozen=True)
class Event:
    id: str
    kind: str
    time: str
    object: dict[str, Any]
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "time": self.time,
            "object": self.object,
            "data": self.data,
        }


def validate_kinds(kinds: object) -> list[str]:
    """A subscription's event types: a list of known kinds (empty: all), deduplicated."""
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise ValidationError("A list of event kinds.")
    unknown = sorted({k for k in kinds if k not in EVENT_KINDS})
    if unknown:
        raise ValidationError(
            f"Unknown event kind(s): {', '.join(unknown)}. Known: {', '.join(EVENT_KINDS)}."
        )
    return sorted(set(kinds))


def parse_event_id(value: str) -> str:
    """A stream ID given by a client (`Last-Event-ID`); ValueError when malformed."""
    if not _EVENT_ID.match(value):
        raise ValueError("an event ID looks like 1700000000000-0")
    return value


def visible_to(user, kind: str) -> bool:
    perm = EVENT_KINDS.get(kind)
    return perm is not None and user is not None and user.is_active and user.has_perm(perm)


def describe(obj: Any) -> dict[str, Any]:
    """The `object` of an event: type, id and name of a model instance, or a dict as given."""
    if isinstance(obj, dict):
        return obj
    return {
        "type": obj._meta.model_name,
        "id": obj.pk,
        "name": str(getattr(obj, "name", obj)),
    }


def emit(kind: str, obj: Any, data: dict[str, Any] | None = None) -> None:
    """Record an event about `obj` (a model instance or an `{"type", "id", "name"}` dict) once
    the current transaction commits; nothing on rollback."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    body = {
        "kind": kind,
        "time": timezone.now().isoformat(),
        "object": describe(obj),
        "data": data or {},
    }
    transaction.on_commit(lambda: _record(body), robust=True)


def _record(body: dict[str, Any]) -> None:
    # Imported here: webhooks imports this module for the kinds.
    from exports_app.services import webhooks

    # Plain JSON values only (what the signature covers), then signed: anyone who can write
    # to Redis can add entries to the stream, and those are not listed (`_parse`).
    body = json.loads(json.dumps(body, default=str))
    encoded = sign_record(web_key(_EVENTS_PURPOSE), "web", "event", body)
    try:
        event_id = redis_client().xadd(
            EVENT_STREAM,
            {"event": encoded},
            maxlen=settings.NBDWEB_EVENTS_MAX_LENGTH,
            approximate=True,
        )
    except RedisError as exc:
        event_id = f"local-{uuid.uuid4().hex}"
        log.warning("event %s not recorded in Redis (%s); webhooks get it as %s", body["kind"],
                    exc, event_id)  # fmt: skip
    log.info("event %s %s: %s", event_id, body["kind"], body["object"])
    webhooks.fan_out(Event(id=event_id, **body))


def _parse(event_id: str, fields: dict[str, str] | None) -> Event | None:
    if fields is None:
        refused_events["too_large"] += 1
        log.warning("event %s in %s is over %d bytes: skipped unread",
                    event_id, EVENT_STREAM, _MAX_ENTRY_BYTES)  # fmt: skip
        return None
    try:
        body = open_record(
            web_key(_EVENTS_PURPOSE), "web", "event", fields["event"], MAX_EVENT_BYTES
        )
    except (KeyError, TypeError, RecordRefused) as exc:
        refused_events[getattr(exc, "reason", "malformed")] += 1
        log.warning("event %s in %s is not one nbdweb recorded (%s); skipped",
                    event_id, EVENT_STREAM, exc)  # fmt: skip
        return None
    try:
        return Event(
            id=event_id,
            kind=str(body["kind"]),
            time=str(body["time"]),
            object=dict(body["object"]),
            data=dict(body["data"]),
        )
    except (KeyError, TypeError, ValueError):
        log.warning("event %s in %s is malformed; skipped", event_id, EVENT_STREAM)
        return None


def parse_entries(entries: Iterable[tuple[str, dict[str, str] | None]]) -> list[Event]:
    return [e for e in (_parse(i, f) for i, f in entries) if e is not None]


# Reading the stream with XRANGE or XREAD sends every entry whole, whatever someone else put
# there. These run in Redis and send an entry's fields only when they fit in ARGV[n]; a bigger
# entry comes back as its ID and size (one entry at a time inside the script, too).
_BOUNDED_RANGE = """
local out, start, max = {}, ARGV[1], tonumber(ARGV[3])
for _ = 1, tonumber(ARGV[2]) do
  local got = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1)
  if #got == 0 then break end
  local id, fields, size = got[1][1], got[1][2], 0
  for _, part in ipairs(fields) do size = size + #part end
  if size > max then out[#out + 1] = {id, {}, size} else out[#out + 1] = {id, fields} end
  start = '(' .. id
end
return out
"""
_NEWEST_ID = """
local got = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #got == 0 then return '0-0' end
return got[1][1]
"""
# Room for the entry's field name beside an event of MAX_EVENT_BYTES.
_MAX_ENTRY_BYTES = MAX_EVENT_BYTES + 64


def latest_id(client=None) -> str:
    """The ID of the newest event, "0-0" when there is none. Raises RedisError."""
    return str((client or redis_client()).eval(_NEWEST_ID, 1, EVENT_STREAM))


def read_entries(after: str, limit: int, client=None) -> list[tuple[str, dict[str, str] | None]]:
    """Up to `limit` stream entries after ID `after`, oldest first: (ID, fields), fields None for
    an entry too big to be one of ours (not read). Raises RedisError."""
    replies = (client or redis_client()).eval(
        _BOUNDED_RANGE, 1, EVENT_STREAM, f"({after}", limit, _MAX_ENTRY_BYTES
    )
    entries: list[tuple[str, dict[str, str] | None]] = []
    for reply in replies:
        entry_id, flat = str(reply[0]), reply[1]
        fields = None if len(reply) > 2 else dict(zip(flat[::2], flat[1::2], strict=True))
        entries.append((entry_id, fields))
    return entries


def read_after(after: str, limit: int) -> list[Event]:
    """Up to `limit` events after ID `after`, oldest first. Raises RedisError."""
    return parse_entries(read_entries(after, limit))
