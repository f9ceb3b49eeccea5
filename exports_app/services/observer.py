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
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError

from exports_app.models import Certificate, WorkerNode
from exports_app.services import events, workerstatus
from exports_app.services.publishing import redis_client

__all__ = ["EXPIRY_NOTICE_KEY", "LOCK_KEY", "OBSERVED_KEY", "check_expiry", "observe_workers"]

log = logging.getLogger(__name__)

OBSERVED_KEY = "nbdweb:events:observed"
LOCK_KEY = "nbdweb:events:observer-lock"
EXPIRY_NOTICE_KEY = "nbdweb:events:expiry-notice:{pk}:{not_after}"
LOCK_SECONDS = 30
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


def _diff(before: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> None:
    for name, state in now.items():
        old = before.get(name, {"online": False, "sessions": {}})
        node = {"type": "workernode", "id": None, "name": name}
        if state["online"] and not old["online"]:
            events.emit("node.online", node, {})
        for session_id, session in state["sessions"].items():
            if session_id not in old["sessions"]:
                events.emit(
                    "session.opened",
                    {"type": "session", "id": session_id, "name": session.get("export")},
                    {"node": name, **session},
                )
        for session_id, session in old["sessions"].items():
            if session_id not in state["sessions"]:
                events.emit(
                    "session.ended",
                    {"type": "session", "id": session_id, "name": session.get("export")},
                    {"node": name, **session},
                )
        if old["online"] and not state["online"]:
            events.emit("node.offline", node, {})


def observe_workers() -> bool:
    """Emit the node and session events since the last run; False when another run holds the
    lock or Redis is unreachable."""
    client = redis_client()
    token = secrets.token_hex(8)
    try:
        if not client.set(LOCK_KEY, token, nx=True, ex=LOCK_SECONDS):
            return False
        names = list(WorkerNode.objects.order_by("name").values_list("name", flat=True))
        raw = client.get(OBSERVED_KEY)
        now = _current(names)
        if raw is not None:
            try:
                before = json.loads(raw)
            except ValueError:
                before = None
            if isinstance(before, dict):
                _diff(before, now)
        client.set(OBSERVED_KEY, json.dumps(now, default=str))
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
