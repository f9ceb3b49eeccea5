"""What the console adds to the model admins (exports_app.admin): the export page's panel and
form layout, and state badges and progress bars in the lists."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from exports_app.models import Export, Job, WorkerNode
from exports_app.templatetags.console import badge

__all__ = ["ExportPageAdminMixin", "JobListAdminMixin"]

_ACCESS = ["tls_required", "read_only", "allowed_clients", "allowed_networks", "max_connections"]
_ADVANCED = [
    "enabled",
    "image_path",
    "flush",
    "fua",
    "trim",
    "write_zeroes",
    "fast_zero",
    "cache",
    "multi_conn",
    "min_block_size",
    "preferred_block_size",
    "max_block_size",
]


class ExportPageAdminMixin:
    """For ExportAdmin: the add form asks what a person must decide (name, node, size, access)
    and defaults the node to the only one; the change page shows the console's panel (how to
    connect, who may, sessions and jobs) above the form, and only the status fields that say
    something."""

    def get_fieldsets(self, request: HttpRequest, obj: Export | None = None):
        if obj is None:
            return [
                (None, {"fields": ["name", "node", "size", "description"]}),
                ("Who may connect", {"fields": _ACCESS}),
                ("Advanced", {"classes": ["collapse"], "fields": _ADVANCED}),
            ]
        status = ["state", "uri", "absolute_image_path", "created", "last_updated"]
        if obj.last_error:
            status.insert(1, "last_error")
        if obj.verified_at:
            status[-2:-2] = ["content_sha256", "verified_at"]
        return [
            (None, {"fields": ["name", "node", "size", "force", "description"]}),
            ("Who may connect", {"fields": _ACCESS}),
            ("Status", {"fields": status}),
            ("Advanced", {"classes": ["collapse"], "fields": _ADVANCED}),
        ]

    def get_changeform_initial_data(self, request: HttpRequest) -> dict:
        initial = super().get_changeform_initial_data(request)
        if "node" not in initial:
            nodes = list(WorkerNode.objects.values_list("pk", flat=True)[:2])
            if len(nodes) == 1:
                initial["node"] = nodes[0]
        return initial

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        from exports_app.console.views import export_panel_context

        extra_context = dict(extra_context or {})
        export = self.get_object(request, object_id)
        if export is not None:
            extra_context["export_panel"] = export_panel_context(request, export)
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="state", ordering="state")
    def state_badge(self, export: Export) -> str:
        return badge(export.state, export.get_state_display())


class JobListAdminMixin:
    """For JobAdmin: the state as a badge and the progress as a bar."""

    @admin.display(description="state", ordering="state")
    def state_badge(self, job: Job) -> str:
        return badge(job.state, job.get_state_display())

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, job: Job) -> str:
        return format_html(
            '<progress value="{}" max="100" aria-valuenow="{}">{}%</progress> {}%',
            job.progress,
            job.progress,
            job.progress,
            job.progress,
        )
