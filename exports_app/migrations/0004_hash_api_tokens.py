"""Move the plain-text tokens of rest_framework.authtoken (before knox) to knox digests.

Each old token keeps working, now stored only as a digest, and expires after the usual
REST_KNOX TOKEN_TTL from this migration on; the plain-text table is dropped. A fresh database
never had the table: nothing to do.
"""

from django.db import migrations
from django.utils import timezone

OLD_TABLE = "authtoken_token"


def hash_old_tokens(apps, schema_editor) -> None:
    from knox.crypto import hash_token
    from knox.settings import CONSTANTS, knox_settings

    connection = schema_editor.connection
    if OLD_TABLE not in connection.introspection.table_names():
        return
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT key, user_id, created FROM {OLD_TABLE}")
        rows = cursor.fetchall()
    auth_token = apps.get_model("knox", "AuthToken")
    expiry = timezone.now() + knox_settings.TOKEN_TTL
    for key, user_id, created in rows:
        token = auth_token.objects.create(
            digest=hash_token(key),
            token_key=key[: CONSTANTS.TOKEN_KEY_LENGTH],
            user_id=user_id,
            expiry=expiry,
        )
        # `created` is auto_now_add: keep the original date with an update.
        auth_token.objects.filter(pk=token.pk).update(created=created)
    schema_editor.execute(f"DROP TABLE {schema_editor.quote_name(OLD_TABLE)}")


class Migration(migrations.Migration):
    dependencies = [
        ("exports_app", "0003_jobs"),
        ("knox", "0009_extend_authtoken_field"),
    ]

    # Not reversible into plain text: going back leaves the digests where they are.
    operations = [migrations.RunPython(hash_old_tokens, migrations.RunPython.noop)]
