from django.apps import AppConfig


class ExportsAppConfig(AppConfig):
    name = "exports_app"
    verbose_name = "NBD exports"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connects the signals that publish worker configs after every committed change, and
        # those that emit events (services.events).
        from exports_app import event_signals, signals  # noqa: F401
