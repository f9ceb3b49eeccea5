"""The admin site of nbdweb: the stock admin, with the dashboard as its home page and the
console's pages and partials under /admin/console/."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import include, path

__all__ = ["ConsoleAdminSite"]


class ConsoleAdminSite(admin.AdminSite):
    site_header = "nbdweb console"
    site_title = "nbdweb"
    index_title = "Dashboard"
    index_template = "admin/console/index.html"
    # The width goes to the lists (they must fit 1400 px); the home page links every model.
    enable_nav_sidebar = False

    def get_urls(self):
        from exports_app.console import views

        console = [
            path(route, self.admin_view(view), name=name) for route, view, name in views.ROUTES
        ]
        return [path("console/", include(console)), *super().get_urls()]

    def index(self, request: HttpRequest, extra_context=None) -> TemplateResponse:
        from exports_app.console import views

        return super().index(request, {**views.dashboard_context(request), **(extra_context or {})})
