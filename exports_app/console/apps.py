"""The admin app with the console's site (`exports_app.console.site.ConsoleAdminSite`) as the
default `admin.site`: every `@admin.register` lands on it, and its home page is the dashboard."""

from django.contrib.admin.apps import AdminConfig

__all__ = ["ConsoleAdminConfig"]


class ConsoleAdminConfig(AdminConfig):
    default_site = "exports_app.console.site.ConsoleAdminSite"
