"""The dashboard's sections and actions.

Every section is a template partial (`admin/console/_<section>.html`) that the dashboard
includes and that reloads itself every few seconds through htmx (`section_view`). A section
needs the permission that lists the same things in the API; ending a session and renewing a
certificate call the same service functions as the API, with the same permissions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.views.decorators.http import require_POST

from exports_app.admin_status import END_SESSIONS, VIEW_SESSIONS
from exports_app.console import changelog, export_page, overview, wizard
from exports_app.models import Certificate, Export, WorkerNode
from exports_app.services import ca, renewal, workerstatus
from exports_app.validators import parse_object_id

__all__ = [
    "ROUTES",
    "changelog_view",
    "dashboard_context",
    "end_session",
    "export_live_view",
    "export_panel_context",
    "renew_certificate",
    "section_view",
]

# How often the live sections reload themselves.
REFRESH_SECONDS = 2

RENEW_CERTIFICATES = ("exports_app.add_certificate", "exports_app.change_tlspolicy")


def _nodes(request: HttpRequest) -> dict[str, Any]:
    return {"cards": overview.node_cards()}


def _sessions(request: HttpRequest) -> dict[str, Any]:
    try:
        rows, unavailable = overview.session_rows(), False
    except workerstatus.StatusUnavailable:
        rows, unavailable = [], True
    return {
        "sessions": rows,
        "unavailable": unavailable,
        "can_end": request.user.has_perm(END_SESSIONS),
    }


def _jobs(request: HttpRequest) -> dict[str, Any]:
    return {"jobs": overview.job_rows(), "failures": overview.recent_failures()}


def _exports(request: HttpRequest) -> dict[str, Any]:
    return {"summary": overview.export_summary(overview.node_cards())}


def _certificates(request: HttpRequest) -> dict[str, Any]:
    return {
        **overview.expiring_certificates(),
        "can_renew": request.user.has_perms(RENEW_CERTIFICATES),
        "warning_days": settings.NBDWEB_CERT_EXPIRY_WARNING_DAYS,
    }


def _throughput(request: HttpRequest) -> dict[str, Any]:
    return overview.throughput_charts()


def _activity(request: HttpRequest) -> dict[str, Any]:
    return {"entries": changelog.change_entries(request.user, limit=8)}


# section name -> (permission, context builder); "" is any staff user (the entries are filtered
# by each model's view permission).
SECTIONS: dict[str, tuple[str, Callable[[HttpRequest], dict[str, Any]]]] = {
    "nodes": ("exports_app.view_workernode", _nodes),
    "sessions": (VIEW_SESSIONS, _sessions),
    "jobs": ("exports_app.view_job", _jobs),
    "exports": ("exports_app.view_export", _exports),
    "certificates": ("exports_app.view_certificate", _certificates),
    "throughput": ("exports_app.view_workernode", _throughput),
    "activity": ("", _activity),
}


def _section_context(request: HttpRequest, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "section": name,
        "refresh_seconds": REFRESH_SECONDS,
        **SECTIONS[name][1](request),
        **extra,
    }


def dashboard_context(request: HttpRequest) -> dict[str, Any]:
    """The sections this user may see, each with its context, for the admin's home page."""
    sections = {
        name: _section_context(request, name)
        for name, (perm, _) in SECTIONS.items()
        if not perm or request.user.has_perm(perm)
    }
    return {"console_sections": sections, "refresh_seconds": REFRESH_SECONDS}


def _render_section(request: HttpRequest, name: str, **extra: Any) -> TemplateResponse:
    return TemplateResponse(
        request, f"admin/console/_{name}.html", _section_context(request, name, **extra)
    )


def section_view(request: HttpRequest, name: str) -> HttpResponse:
    if name not in SECTIONS:
        raise Http404(name)
    perm = SECTIONS[name][0]
    if perm and not request.user.has_perm(perm):
        raise PermissionDenied
    return _render_section(request, name)


class ChangeLogFilter(forms.Form):
    model = forms.ChoiceField(
        required=False,
        label="Object type",
        choices=[("", "all"), *((n, m._meta.verbose_name) for n, m in changelog.TRACKED.items())],
    )
    q = forms.CharField(required=False, label="Object", max_length=200)
    user = forms.CharField(required=False, label="User or job", max_length=150)
    since = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )
    until = forms.DateTimeField(
        required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"})
    )


def changelog_view(request: HttpRequest) -> HttpResponse:
    """Every change and event, newest first, filterable by object, user and time."""
    form = ChangeLogFilter(request.GET or None)
    filters = form.cleaned_data if form.is_valid() else {}
    entries = changelog.change_entries(
        request.user,
        model=filters.get("model") or "",
        query=filters.get("q") or "",
        username=filters.get("user") or "",
        since=filters.get("since"),
        until=filters.get("until"),
    )
    context = {
        **admin.site.each_context(request),
        "title": "Change log",
        "form": form,
        "entries": entries,
    }
    return TemplateResponse(request, "admin/console/changelog.html", context)


def _export_live_context(request: HttpRequest, export: Export) -> dict[str, Any]:
    sessions, unavailable = export_page.export_sessions(export)
    can_view_jobs = request.user.has_perm("exports_app.view_job")
    return {
        "export": export,
        "sessions": sessions,
        "unavailable": unavailable,
        "can_end": request.user.has_perm(END_SESSIONS),
        "can_view_jobs": can_view_jobs,
        "jobs": export_page.export_jobs(export) if can_view_jobs else [],
        "refresh_seconds": REFRESH_SECONDS,
    }


def export_panel_context(request: HttpRequest, export: Export) -> dict[str, Any]:
    """The panel above the export's change form (ExportAdmin.change_view)."""
    return {
        **export_page.panel_context(request, export),
        **_export_live_context(request, export),
    }


def _render_export_live(request: HttpRequest, export: Export, **extra: Any) -> TemplateResponse:
    return TemplateResponse(
        request,
        "admin/console/_export_live.html",
        {**_export_live_context(request, export), **extra},
    )


def export_live_view(request: HttpRequest, pk: int) -> HttpResponse:
    if not request.user.has_perm(VIEW_SESSIONS):
        raise PermissionDenied
    return _render_export_live(request, get_object_or_404(Export, pk=pk))


@require_POST
def end_session(request: HttpRequest, node: str, session_id: str) -> HttpResponse:
    """Ask the session's worker to end it (like DELETE /api/v1/sessions/<id>/)."""
    if not request.user.has_perms([VIEW_SESSIONS, END_SESSIONS]):
        raise PermissionDenied
    get_object_or_404(WorkerNode, name=node)
    try:
        found = workerstatus.find_session(session_id, [node])
        if found is None:
            notice = f"Session {session_id} is not live any more."
        else:
            workerstatus.end_session(found, request.user)
            notice = (
                f"Session {session_id} ({found.get('export')!r} from {found.get('client')}) "
                "asked to end: the worker answers its requests in flight, then closes it."
            )
    except workerstatus.StatusUnavailable:
        notice = "Redis is unreachable: nothing was done."
    export_pk = request.POST.get("export", "")
    export_id = parse_object_id(export_pk)
    if export_id is not None:  # asked from the export's page: answer with its live part
        export = get_object_or_404(Export, pk=export_id)
        return _render_export_live(request, export, notice=notice)
    return _render_section(request, "sessions", notice=notice)


@require_POST
def renew_certificate(request: HttpRequest, pk: int) -> HttpResponse:
    if not request.user.has_perms(RENEW_CERTIFICATES):
        raise PermissionDenied
    certificate = get_object_or_404(Certificate, pk=pk)
    try:
        successor = renewal.renew_certificate(certificate, request.user)
        notice = f"{certificate.name} renewed as {successor.name}."
    except ca.CertificateError as exc:
        notice = f"{certificate.name}: {exc}"
    return _render_section(request, "certificates", notice=notice)


ROUTES = [
    ("section/<slug:name>/", section_view, "console_section"),
    ("sessions/<str:node>/<str:session_id>/end/", end_session, "console_end_session"),
    ("certificates/<int:pk>/renew/", renew_certificate, "console_renew_certificate"),
    ("exports/<int:pk>/live/", export_live_view, "console_export_live"),
    ("changes/", changelog_view, "console_changelog"),
    ("exports/new/", wizard.wizard_view, "console_export_wizard"),
    ("exports/new/<int:pk>/", wizard.wizard_progress_view, "console_export_wizard_progress"),
]
