"""Create the default worker node (settings.NBDWORKER_NODE) with a NOTLS policy."""

from django.conf import settings
from django.db import migrations


def create_default_node(apps, schema_editor):
    TLSPolicy = apps.get_model("exports_app", "TLSPolicy")
    WorkerNode = apps.get_model("exports_app", "WorkerNode")
    policy, _ = TLSPolicy.objects.get_or_create(
        name="default", defaults={"mode": "NOTLS", "description": "Created by migrate."}
    )
    WorkerNode.objects.get_or_create(
        name=settings.NBDWORKER_NODE,
        defaults={
            "listen": settings.NBD_LISTEN,
            "storage_root": str(settings.NBDWEB_STORAGE_ROOT),
            "tls_policy": policy,
            "description": "Created by migrate.",
        },
    )


class Migration(migrations.Migration):
    dependencies = [("exports_app", "0001_initial")]

    operations = [migrations.RunPython(create_default_node, migrations.RunPython.noop)]
