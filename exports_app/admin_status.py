"""Worker status in the admin: status columns on the nodes, and a live sessions page
(``/admin/exports_app/workernode/sessions/``) where a session can be ended.

Read from Redis like `/api/v1/nodes/` and `/api/v1/sessions/` (exports_app.services.workerstatus),
with the same permissions: seeing sessions needs `view_export`, ending one `change_export`.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from exports_app.models import WorkerNode
from exports_app.services import workerstatus

__all__ = ["NodeStatusAdminMixin"]

VIEW_SESSIONS = "exports_app.view_export"
END_SESSIONS = "exports_app.change_export"


class NodeStatusAdminMixin:
    """For the WorkerNode admin: `worker_status` and `live_sessions` columns, the sessions page."""

    def get_urls(self):
        sessions = path(
            "sessions/",
            self.admin_site.admin_view(self.sessions_view),
            name="exports_app_workernode_sessions",
        )
        return [sessions, *super().get_urls()]

    @admin.display(description="worker")
    def worker_status(self, node: WorkerNode) -> str:
        from exports_app.console.overview import node_cards
        from exports_app.templatetags.console import ago, badge

        card = node_cards([node])[0]
        if card.status != "online":
            seen = f" (last seen {ago(card.last_seen)})" if card.last_seen else ""
            return format_html("{}{}", badge(card.status), seen)
        if card.config_state == "behind":
            config = format_html(
                "{}: the latest change ({}) is not applied yet",
                badge("behind", "config behind"),
                ago(card.behind_since),
            )
        else:
            config = badge(card.config_state, f"config {card.config_state}")
        return format_html(
            '{} {} <span class="help">{}</span>', badge("online"), config, card.version
        )

    @admin.display(description="sessions")
    def live_sessions(self, node: WorkerNode) -> str:
        url = reverse("admin:exports_app_workernode_sessions") + f"?node={node.name}"
        return format_html('<a href="{}">live sessions</a>', url)

    def sessions_view(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm(VIEW_SESSIONS):
            raise PermissionDenied
        node = request.GET.get("node") or None
        nodes = WorkerNode.objects.order_by("name")
        if node:
            nodes = nodes.filter(name=node)
        names = list(nodes.values_list("name", flat=True))
        if request.method == "POST":
            if not request.user.has_perm(END_SESSIONS):
                raise PermissionDenied
            session_id = request.POST.get("end", "")
            try:
                found = workerstatus.find_session(session_id, names)
                if found is None:
                    messages.error(request, f"Session {session_id} is not live any more.")
                else:
                    workerstatus.end_session(found, request.user)
                    messages.success(
                        request,
                        f"Session {session_id} on {found['export']!r} asked to end; the worker "
                        "answers its requests in flight, then closes it.",
                    )
            except workerstatus.StatusUnavailable:
                messages.error(request, "Redis is unreachable: nothing was done.")
            return redirect(request.get_full_path())
        try:
            sessions, unavailable = workerstatus.list_sessions(names), False
        except workerstatus.StatusUnavailable:
            sessions, unavailable = [], True
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Live sessions",
            "node": node,
            "sessions": sessions,
            "unavailable": unavailable,
            "can_end": request.user.has_perm(END_SESSIONS),
        }
        return TemplateResponse(request, "admin/exports_app/sessions.html", context)
