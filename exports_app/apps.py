from django.apps import AppConfig


class ExportsAppConfig(AppConfig):
    name = "exports_app"
    verbose_name = "NBD exports"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connects the signals that publish worker configs after every committed change.
        from exports_app import signals  # noqa: F401
