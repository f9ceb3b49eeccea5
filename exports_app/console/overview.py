"""What the dashboard shows, read from the database and from the workers' reports in Redis
(`services.workerstatus`): plain data for the templates, no HTML.

Each section is one function, so that the dashboard and its partial updates (`views`) render
the same thing, and each section needs the same permission as the API that lists it.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from redis.exceptions import RedisError

from exports_app.choices import ExportState, JobState
from exports_app.models import Certificate, CertificateAuthority, Export, Job, WorkerNode
from exports_app.services import throughput, workerstatus
from exports_app.services.publishing import redis_client

__all__ = [
    "ExportTrouble",
    "JobRow",
    "NodeCard",
    "SessionRow",
    "expiring_certificates",
    "export_summary",
    "job_rows",
    "node_cards",
    "recent_failures",
    "session_rows",
    "throughput_charts",
]

# The web side remembers when it last saw each node online, so that an offline card can say
# since when (the heartbeat itself expires with the node).
LAST_SEEN_KEY = "nbdweb:console:last-seen:{node}"
# Per session: the last two distinct counter samples, for its current throughput.
RATE_KEY = "nbdweb:console:rate:{node}:{session}"
RATE_TTL = 120
# Counters unchanged for longer than this (two missed heartbeats): the session is idle.
IDLE_AFTER = 5.0


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_datetime(value)
    except ValueError:  # well-formed, but no date ("2026-13-45T99:99:99Z")
        return None


# Ten years: an uptime beyond is no uptime (a timedelta overflows long before a float does).
MAX_UPTIME_SECONDS = 10 * 365 * 86400


def _count(value: Any, limit: float) -> float | None:
    """`value` when it is a number from 0 to `limit` (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if 0 <= value <= limit else None


def _generation_time(generation: int | None) -> datetime | None:
    """When a generation was published (generations are milliseconds since the epoch); None
    for one no clock reaches (anyone can write the published generation in Redis)."""
    if generation is None:
        return None
    try:
        return datetime.fromtimestamp(generation / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _storage_view(storage: Any) -> list[dict[str, Any]]:
    """The heartbeat's storage roots: a root's name and error as text, sizes only as byte
    counts, a use percentage only from those."""
    if not isinstance(storage, list):
        return []
    roots = []
    for entry in storage[:64]:
        if not isinstance(entry, dict):
            continue
        root: dict[str, Any] = {"root": str(entry.get("root", ""))}
        if "error" in entry:
            root["error"] = str(entry["error"])
        for name in ("total", "used", "free"):
            value = _count(entry.get(name), 1 << 62)
            if isinstance(value, int):
                root[name] = value
        if root.get("total"):
            root["used_percent"] = round(100 * root.get("used", 0) / root["total"])
        roots.append(root)
    return roots


# -- nodes ---------------------------------------------------------------------------------------


@dataclass
class NodeCard:
    node: WorkerNode
    status: str  # online, offline, unknown (Redis unreachable)
    last_seen: datetime | None
    config_state: str  # current, behind, unknown
    behind_since: datetime | None
    version: str
    uptime: timedelta | None
    storage: list[dict[str, Any]]
    exports: int
    sessions: int
    policy_mode: str


def node_cards(nodes: list[WorkerNode] | None = None) -> list[NodeCard]:
    if nodes is None:
        nodes = list(
            WorkerNode.objects.select_related("tls_policy").with_export_count().order_by("name")
        )
    statuses = workerstatus.node_statuses([n.name for n in nodes])
    last_seen = _remember_last_seen(statuses)
    cards = []
    for node in nodes:
        status = statuses[node.name]
        heartbeat = status["heartbeat"] or {}
        if status["current"] is None:
            config_state, behind_since = "unknown", None
        elif status["current"]:
            config_state, behind_since = "current", None
        else:
            # Generations are the publish time in milliseconds: the oldest change not applied
            # is at most this old.
            config_state = "behind"
            behind_since = _generation_time(status["generation_published"])
        # What a worker says about itself is signed by its own key, no more: a compromised
        # worker can sign anything there, and the console shows only what makes sense.
        uptime = _count(heartbeat.get("uptime"), MAX_UPTIME_SECONDS)
        storage = _storage_view(heartbeat.get("storage"))
        cards.append(
            NodeCard(
                node=node,
                status=status["status"],
                last_seen=_parse_time(heartbeat.get("time")) or last_seen.get(node.name),
                config_state=config_state,
                behind_since=behind_since,
                version=str(heartbeat.get("version", "")),
                uptime=timedelta(seconds=int(uptime)) if uptime is not None else None,
                storage=storage,
                exports=getattr(node, "export_count", None) or node.exports.count(),
                sessions=int(_count(heartbeat.get("sessions"), 1 << 32) or 0),
                policy_mode=node.tls_policy.mode,
            )
        )
    return cards


def _remember_last_seen(statuses: dict[str, dict[str, Any]]) -> dict[str, datetime]:
    """Store the heartbeat time of the online nodes; return the stored time of the others."""
    try:
        client = redis_client()
        with client.pipeline(transaction=False) as pipe:
            for name, status in statuses.items():
                heartbeat = status["heartbeat"]
                if heartbeat and heartbeat.get("time"):
                    pipe.set(LAST_SEEN_KEY.format(node=name), heartbeat["time"])
                else:
                    # A time is short; whatever else someone put there is not read whole.
                    pipe.getrange(LAST_SEEN_KEY.format(node=name), 0, 63)
            replies = pipe.execute()
    except RedisError:
        return {}
    seen = {}
    for (name, status), reply in zip(statuses.items(), replies, strict=True):
        if not status["heartbeat"] and isinstance(reply, bytes | str):
            parsed = _parse_time(reply.decode() if isinstance(reply, bytes) else reply)
            if parsed is not None:
                seen[name] = parsed
    return seen


# -- sessions ------------------------------------------------------------------------------------


@dataclass
class SessionRow:
    id: str
    node: str
    export: str
    client: str
    tls: bool
    identity: str
    connected_since: datetime | None
    bytes_read: int
    bytes_written: int
    read_rate: float | None  # bytes per second; None until two samples exist
    write_rate: float | None


def session_rows(node_names: list[str] | None = None) -> list[SessionRow]:
    """Every live session, oldest first. Raises workerstatus.StatusUnavailable."""
    if node_names is None:
        node_names = list(WorkerNode.objects.order_by("name").values_list("name", flat=True))
    sessions = workerstatus.list_sessions(node_names)
    rates = _session_rates(sessions)
    rows = []
    for s in sessions:
        identity = s.get("client_identity") or {}
        names = ", ".join(identity.get("common_names", []))
        read_rate, write_rate = rates.get((s["node"], s["id"]), (None, None))
        rows.append(
            SessionRow(
                id=str(s["id"]),
                node=s["node"],
                export=str(s.get("export", "")),
                client=str(s.get("client", "")),
                tls=bool(s.get("tls")),
                identity=f"{names} (serial {identity.get('serial', '?')})" if identity else "",
                connected_since=_parse_time(s.get("connected_since")),
                bytes_read=int(s.get("bytes_read", 0) or 0),
                bytes_written=int(s.get("bytes_written", 0) or 0),
                read_rate=read_rate,
                write_rate=write_rate,
            )
        )
    return rows


MAX_RATE_SAMPLES_BYTES = 256


def _rate_samples(raw: object) -> list[list]:
    """The stored samples, [[time, read, written], ...] (at most two); [] for anything else
    (a value of another type, too long, not that shape: anyone can write to Redis)."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_RATE_SAMPLES_BYTES:
        return []
    try:
        samples = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(samples, list) or len(samples) > 2:
        return []
    for sample in samples:
        if not (
            isinstance(sample, list)
            and len(sample) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in sample)
            and math.isfinite(sample[0])
        ):
            return []
    return samples


def _session_rates(
    sessions: list[dict[str, Any]],
) -> dict[tuple[str, str], tuple[float | None, float | None]]:
    """Throughput from the last two distinct counter samples each session showed here.

    The worker reports cumulative counters every 2 s; a sample is kept (in Redis, so every web
    process and browser shares it) when the counters move, and the rate is the difference of the
    last two over the time between them, or zero once they stop moving.
    """
    if not sessions:
        return {}
    now = time.time()
    keys = [RATE_KEY.format(node=s["node"], session=s["id"]) for s in sessions]
    try:
        client = redis_client()
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                # Two samples are short; whatever else someone put there is not read whole.
                pipe.getrange(key, 0, MAX_RATE_SAMPLES_BYTES)
            stored = pipe.execute(raise_on_error=False)
    except RedisError:
        return {}
    rates: dict[tuple[str, str], tuple[float | None, float | None]] = {}
    updates = {}
    for s, key, raw in zip(sessions, keys, stored, strict=True):
        counters = [int(s.get("bytes_read", 0) or 0), int(s.get("bytes_written", 0) or 0)]
        samples = _rate_samples(raw)
        if not samples or samples[-1][1:] != counters:
            samples = [*samples[-1:], [now, *counters]]
            updates[key] = json.dumps(samples)
        if len(samples) < 2:
            rates[s["node"], s["id"]] = (None, None)
            continue
        (t0, r0, w0), (t1, r1, w1) = samples
        if now - t1 > IDLE_AFTER or t1 <= t0:
            rates[s["node"], s["id"]] = (0.0, 0.0)
        else:
            rates[s["node"], s["id"]] = ((r1 - r0) / (t1 - t0), (w1 - w0) / (t1 - t0))
    if updates:
        try:
            with client.pipeline(transaction=False) as pipe:
                for key, value in updates.items():
                    pipe.set(key, value, ex=RATE_TTL)
                pipe.execute()
        except RedisError:
            pass
    return rates


# -- jobs ----------------------------------------------------------------------------------------


@dataclass
class JobRow:
    job: Job
    rate: float | None = None  # bytes per second, for jobs that go through the image
    eta: timedelta | None = None


def job_rows(queryset=None) -> list[JobRow]:
    """Queued and running jobs, running first, with throughput and ETA from their progress."""
    if queryset is None:
        queryset = Job.objects.all()
    jobs = (
        queryset.filter(state__in=[JobState.RUNNING, JobState.QUEUED])
        .select_related("export", "node", "requested_by")
        .order_by("-state", "pk")[:50]
    )
    now = timezone.now()
    rows = []
    for job in jobs:
        row = JobRow(job)
        if job.state == JobState.RUNNING and job.started and 0 < job.progress < 100:
            elapsed = (now - job.started).total_seconds()
            if elapsed > 0:
                row.eta = timedelta(seconds=round(elapsed * (100 - job.progress) / job.progress))
                size = job.export.size if job.export is not None else 0
                if size:
                    row.rate = size * job.progress / 100 / elapsed
        rows.append(row)
    return rows


def recent_failures(queryset=None, limit: int = 5) -> list[Job]:
    if queryset is None:
        queryset = Job.objects.all()
    return list(
        queryset.filter(state=JobState.FAILED)
        .select_related("export", "node")
        .order_by("-finished", "-pk")[:limit]
    )


# -- exports -------------------------------------------------------------------------------------


@dataclass
class ExportTrouble:
    export: Export
    problems: list[str] = field(default_factory=list)


def export_summary(cards: list[NodeCard] | None = None) -> dict[str, Any]:
    """Counts by state, and the exports in trouble: failed, on an offline node, or served with a
    certificate that expires soon."""
    counts = Counter(dict(Export.objects.values_list("state").annotate(n=Count("pk"))))
    offline = {c.node.pk for c in (cards or []) if c.status != "online"}
    soon = timezone.now() + timedelta(days=settings.NBDWEB_CERT_EXPIRY_WARNING_DAYS)
    candidates = (
        Export.objects.filter(
            Q(state=ExportState.FAILED)
            | Q(node__in=offline, enabled=True)
            | Q(
                node__tls_policy__server_certificate__not_after__lte=soon,
                node__tls_policy__mode__in=["FORCEDTLS", "SELECTIVETLS", "OPTIONALTLS"],
            )
        )
        .select_related("node__tls_policy__server_certificate")
        .order_by("name")[:50]
    )
    troubles = []
    for export in candidates:
        trouble = ExportTrouble(export)
        if export.state == ExportState.FAILED:
            trouble.problems.append(f"failed: {export.last_error[:200] or 'no error recorded'}")
        if export.node_id in offline and export.enabled:
            trouble.problems.append(f"node {export.node.name} is offline")
        cert = export.node.tls_policy.server_certificate
        if cert is not None and export.node.tls_policy.uses_tls and cert.not_after <= soon:
            trouble.problems.append(
                f"server certificate {cert.name} expires {cert.not_after:%Y-%m-%d}"
            )
        if trouble.problems:
            troubles.append(trouble)
    return {
        "counts": [(state, label, counts.get(state, 0)) for state, label in ExportState.choices],
        "total": sum(counts.values()),
        "troubles": troubles,
    }


# -- certificates --------------------------------------------------------------------------------


def expiring_certificates() -> dict[str, list]:
    """Certificates and CAs that are not revoked and expire within the warning window."""
    soon = timezone.now() + timedelta(days=settings.NBDWEB_CERT_EXPIRY_WARNING_DAYS)
    return {
        "certificates": list(
            Certificate.objects.filter(revoked_at__isnull=True, not_after__lte=soon)
            .select_related("authority")
            .order_by("not_after")[:50]
        ),
        "authorities": list(
            CertificateAuthority.objects.filter(not_after__lte=soon).order_by("not_after")[:20]
        ),
    }


# -- throughput ----------------------------------------------------------------------------------

# Exports charted on the dashboard: the busiest of the last hour.
TOP_EXPORTS = 6
# Ring buffers scanned for them (bounded by the exports with traffic in the last two hours).
MAX_EXPORT_SERIES = 500


def throughput_charts() -> dict[str, Any]:
    """Per node, and for the busiest exports, the last hour's points (services.throughput)."""
    nodes = list(WorkerNode.objects.order_by("name").values_list("name", flat=True))
    node_series = [(name, throughput.series(throughput.node_key(name))) for name in nodes]
    exports = []
    try:
        client = redis_client()
        prefix = throughput.export_key("", "")
        keys = []
        for key in client.scan_iter(match=f"{prefix[:-2]}*", count=500):
            keys.append(key.decode() if isinstance(key, bytes) else key)
            if len(keys) >= MAX_EXPORT_SERIES:
                break
        for key in keys:
            points = throughput.series(key, client=client)
            total = sum(r + w for _, r, w in points)
            if total:
                node, _, export = key[len(prefix) - 1 :].partition(":")
                exports.append((total, node, export, points))
    except RedisError:
        pass
    exports.sort(key=lambda item: item[0], reverse=True)
    return {
        "node_series": node_series,
        "export_series": [(n, e, p) for _, n, e, p in exports[:TOP_EXPORTS]],
    }
