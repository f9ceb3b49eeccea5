"""The export page's panel above the form: how to reach the export (URI, client commands), who
may connect, its size on disk, and its live sessions and jobs (reloaded by htmx)."""

from __future__ import annotations

import os
from typing import Any

from django.http import HttpRequest

from exports_app.console import overview
from exports_app.models import Export, Job
from exports_app.services import bundles, throughput, workerstatus

__all__ = ["allocated_bytes", "export_jobs", "export_sessions", "panel_context"]

CLIENT_RULE_WORDS = {
    "common_name": "certificate CN",
    "san": "certificate SAN",
    "fingerprint_sha256": "certificate SHA-256",
}


def allocated_bytes(export: Export) -> int | None:
    """Bytes the image occupies on disk; None when it is not visible from this host."""
    try:
        return os.stat(export.absolute_image_path).st_blocks * 512
    except OSError:
        return None


def export_sessions(export: Export) -> tuple[list[overview.SessionRow], bool]:
    """(the export's live sessions, whether Redis was unreachable)."""
    try:
        rows = overview.session_rows([export.node.name])
    except workerstatus.StatusUnavailable:
        return [], True
    return [row for row in rows if row.export == export.name], False


def export_jobs(export: Export) -> list[overview.JobRow]:
    """Its queued and running jobs, then its last finished ones."""
    active = overview.job_rows(Job.objects.filter(export=export))
    active_ids = {row.job.pk for row in active}
    finished = [
        overview.JobRow(job)
        for job in Job.objects.filter(export=export).exclude(pk__in=active_ids).order_by("-pk")[:5]
    ]
    return [*active, *finished]


def access_rules(export: Export) -> dict[str, Any]:
    policy = export.node.tls_policy
    return {
        "needs_tls": export.needs_tls,
        "policy": policy,
        "clients": [
            (CLIENT_RULE_WORDS.get(kind, kind), value)
            for rule in export.allowed_clients
            for kind, value in rule.items()
        ],
        "networks": list(export.allowed_networks),
    }


def panel_context(request: HttpRequest, export: Export) -> dict[str, Any]:
    return {
        "export": export,
        "commands": bundles.client_commands(export),
        "allocated": allocated_bytes(export),
        "access": access_rules(export),
        "can_view_jobs": request.user.has_perm("exports_app.view_job"),
        "throughput": throughput.series(throughput.export_key(export.node.name, export.name)),
    }
