from django.apps import AppConfig


class ExportsAppConfig(AppConfig):
    name = "exports_app"
    verbose_name = "NBD exports"
    default_auto_field = "django.db.models.BigAutoField"
