"""Events nobody calls a function for: nodes going online or offline, NBD sessions opening or
ending (both from what the workers write to Redis, see services.workerstatus), and
certificates nearing their end.

The workers only report state (a heartbeat key that expires, a hash of live sessions); the web
side turns changes of that state into events. `observe_workers()` runs every
`settings.NBDWEB_OBSERVE_INTERVAL` seconds (Celery beat), compares what the workers report now
with what it saw last time (kept in Redis, `OBSERVED_KEY`) and emits the differences. One run
at a time holds `LOCK_KEY`, so two beat schedulers (or a slow run) never emit an event twice.
A session that opens and ends between two runs is not seen; node status is the heartbeat's, so
`node.offline` comes up to the heartbeat's expiry (6 s) plus one interval after the worker died.
The first run after the observed state is lost (a Redis flush) records it and emits nothing.

Bounded whatever is in Redis: the sessions read are only those the workers signed, at most
`workerstatus.MAX_SESSIONS_PER_NODE` per node; one run emits at most `MAX_EVENTS_PER_RUN`
session events (each may mean a webhook delivery per subscription), and the changes beyond are
left for the next runs (not recorded as observed, so none is lost); the observed state is read
up to `MAX_OBSERVED_BYTES` and only if signed by the web side (`nodekeys.web_key`; anything
else counts as lost).
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError, ResponseError

from exports_app.models import Certificate, WorkerNode
from exports_app.services import events, workerstatus
from exports_app.services.nodekeys import web_key
from exports_app.services.publishing import redis_client
from nbdworker.contract.statusrecord import RecordRefused, open_record, sign_record

__all__ = ["EXPIRY_NOTICE_KEY", "LOCK_KEY", "OBSERVED_KEY", "check_expiry", "observe_workers"]

log = logging.getLogger(__name__)

OBSERVED_KEY = "nbdweb:events:observed"
LOCK_KEY = "nbdweb:events:observer-lock"
EXPIRY_NOTICE_KEY = "nbdweb:events:expiry-notice:{pk}:{not_after}"
LOCK_SECONDS = 30
MAX_EVENTS_PER_RUN = 1000
MAX_OBSERVED_BYTES = 64 << 20
_OBSERVED_PURPOSE = "observed state"
_SESSION_FIELDS = ("export", "client", "tls", "client_identity", "connected_since")


def _current(names: list[str]) -> dict[str, dict[str, Any]]:
    statuses = workerstatus.node_statuses(names)
    if any(status["status"] == "unknown" for status in statuses.values()):
        # Redis did not answer: "unknown" must not read as "offline".
        raise workerstatus.StatusUnavailable("node status unknown")
    sessions = workerstatus.list_sessions(names)
    current = {
        name: {"online": status["status"] == "online", "sessions": {}}
        for name, status in statuses.items()
    }
    for session in sessions:
        node = current.get(session["node"])
        if node is not None:
            node["sessions"][str(session["id"])] = {k: session.get(k) for k in _SESSION_FIELDS}
    return current


def _node_state(value: object) -> dict[str, Any]:
    """A node's entry of the observed state as stored (anyone may have written it): online and
    a dict of sessions, else what a node never seen has."""
    if (
        isinstance(value, dict)
        and isinstance(value.get("online"), bool)
        and isinstance(value.get("sessions"), dict)
        and all(isinstance(v, dict) for v in value["sessions"].values())
    ):
        return value
    return {"online": False, "sessions": {}}


def _diff(before: dict[str, Any], now: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Emit the events from `before` to `now`, at most MAX_EVENTS_PER_RUN of the sessions';
    return the state to record as observed (what was emitted: the rest waits)."""
    budget = MAX_EVENTS_PER_RUN
    left = 0
    observed: dict[str, dict[str, Any]] = {}
    for name, state in now.items():
        old = _node_state(before.get(name))
        node = {"type": "workernode", "id": None, "name": name}
        if state["online"] and not old["online"]:
            events.emit("node.online", node, {})
        seen = dict(old["sessions"])
        for session_id, session in state["sessions"].items():
            if session_id in old["sessions"]:
                continue
            if budget <= 0:
                left += 1
                continue
            budget -= 1
            seen[session_id] = session
            events.emit(
                "session.opened",
                {"type": "session", "id": session_id, "name": session.get("export")},
                {"node": name, **session},
            )
        for session_id, session in old["sessions"].items():
            if session_id in state["sessions"]:
                continue
            if budget <= 0:
                left += 1
                continue
            budget -= 1
            del seen[session_id]
            events.emit(
                "session.ended",
                {"type": "session", "id": session_id, "name": session.get("export")},
                {"node": name, **_known_fields(session)},
            )
        if old["online"] and not state["online"]:
            events.emit("node.offline", node, {})
        observed[name] = {"online": state["online"], "sessions": seen}
    if left:
        log.warning(
            "%d session change(s) over the %d events of one run: left for the next run",
            left,
            MAX_EVENTS_PER_RUN,
        )
    return observed


def _known_fields(session: dict[str, Any]) -> dict[str, Any]:
    return {k: session.get(k) for k in _SESSION_FIELDS}


def _load_observed(client) -> dict[str, Any] | None:
    """What the last run recorded, if this web side signed it; None (lost: this run records
    and emits nothing) for anything else: it would otherwise invent `session.ended` events."""
    try:
        # One byte over the bound is enough to refuse it.
        raw = client.getrange(OBSERVED_KEY, 0, MAX_OBSERVED_BYTES)
    except ResponseError as exc:  # another type stored there: overwritten by this run
        log.warning("the observed state is unreadable (%s): taken as lost", exc)
        return None
    if not raw:
        return None
    try:
        return open_record(
            web_key(_OBSERVED_PURPOSE), "web", "observed", raw, max_bytes=MAX_OBSERVED_BYTES
        )
    except RecordRefused as exc:
        log.warning("the observed state is refused (%s): taken as lost", exc)
        return None


def observe_workers() -> bool:
    """Emit the node and session events since the last run; False when another run holds the
    lock or Redis is unreachable."""
    client = redis_client()
    token = secrets.token_hex(8)
    try:
        if not client.set(LOCK_KEY, token, nx=True, ex=LOCK_SECONDS):
            return False
        names = list(WorkerNode.objects.order_by("name").values_list("name", flat=True))
        before = _load_observed(client)
        now = _current(names)
        if before is not None:
            now = _diff(before, now)
        client.set(OBSERVED_KEY, sign_record(web_key(_OBSERVED_PURPOSE), "web", "observed", now))
    except (RedisError, workerstatus.StatusUnavailable) as exc:
        log.warning("cannot observe the workers: %s", exc)
        return False
    finally:
        try:
            # Only our own lock: a run that outlived LOCK_SECONDS must not free the next one's.
            if client.get(LOCK_KEY) == token:
                client.delete(LOCK_KEY)
        except RedisError:
            pass
    return True


def check_expiry() -> int:
    """Emit `certificate.expiring` once for each certificate (not revoked, not yet expired)
    that ends within settings.NBDWEB_CERT_EXPIRY_WARNING_DAYS; returns how many."""
    now = timezone.now()
    soon = Certificate.objects.filter(
        revoked_at__isnull=True,
        not_after__gt=now,
        not_after__lte=now + timedelta(days=settings.NBDWEB_CERT_EXPIRY_WARNING_DAYS),
    )
    client = redis_client()
    emitted = 0
    for certificate in soon:
        key = EXPIRY_NOTICE_KEY.format(
            pk=certificate.pk, not_after=int(certificate.not_after.timestamp())
        )
        keep = int((certificate.not_after - now).total_seconds()) + 86400
        try:
            first = client.set(key, "1", nx=True, ex=keep)
        except RedisError as exc:
            log.warning("cannot check certificate expiry notices: %s", exc)
            return emitted
        if first:
            events.emit(
                "certificate.expiring",
                certificate,
                {
                    "not_after": certificate.not_after.isoformat(),
                    "serial": certificate.serial,
                    "common_name": certificate.common_name,
                },
            )
            emitted += 1
    return emitted
