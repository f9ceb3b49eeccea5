"""Identities recorded with the image's owner token itself now record its digest
(nbdworker.contract.imageidentity.mark_digest): the identity travels in the config snapshot,
which whoever reads Redis sees, and the token must not."""

import re

from django.db import migrations

_RAW = re.compile(r"^([0-9]{1,20}:[0-9]{1,20}:)([0-9a-f]{32})$")


def digest_tokens(apps, schema_editor):
    from nbdworker.contract.imageidentity import mark_digest

    Export = apps.get_model("exports_app", "Export")
    for export in Export.objects.exclude(image_identity="").only("pk", "image_identity"):
        match = _RAW.match(export.image_identity)
        if match:
            Export.objects.filter(pk=export.pk).update(
                image_identity=match.group(1) + mark_digest(match.group(2))
            )


class Migration(migrations.Migration):
    dependencies = [
        ("exports_app", "0010_pending_publish"),
    ]

    operations = [
        migrations.RunPython(digest_tokens, migrations.RunPython.noop),
    ]
