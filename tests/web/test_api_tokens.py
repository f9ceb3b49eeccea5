"""API tokens (django-rest-knox): only digests are stored, so a copy of the database hands out
no working token; every token expires and is revoked on its own; `create_api_token` prints the
new token on its last line; tokens of rest_framework.authtoken are moved to digests."""

import importlib
import io
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.test import APIClient

URL = "/api/v1/exports/"


def _client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def _create_api_token(*args: str) -> str:
    out = io.StringIO()
    call_command("create_api_token", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue().splitlines()[-1]


@pytest.mark.django_db
def test_create_api_token_prints_a_working_token_on_its_last_line(superuser):
    token = _create_api_token(superuser.username)
    assert token.startswith("nbdweb_")
    assert _client(token).get(URL).status_code == 200


@pytest.mark.django_db
def test_database_dump_holds_no_working_token(superuser):
    token = _create_api_token(superuser.username)
    dump = io.StringIO()
    call_command("dumpdata", stdout=dump)
    assert token not in dump.getvalue()
    rows = [row for row in json.loads(dump.getvalue()) if row["model"] == "knox.authtoken"]
    assert len(rows) == 1
    # Whatever the dump holds about the token, presented as the token, is refused.
    stored = [rows[0]["pk"], *(v for v in rows[0]["fields"].values() if isinstance(v, str))]
    for value in stored:
        assert _client(value).get(URL).status_code == 401, value
    # The raw table too: the digest is a SHA-512 of the token, not the token.
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM knox_authtoken")
        raw = " ".join(str(value) for row in cursor.fetchall() for value in row)
    assert token not in raw
    assert token[len("nbdweb_") :] not in raw


@pytest.mark.django_db
def test_expired_token_gets_401(superuser):
    token = _create_api_token(superuser.username, "--days", "1")
    assert _client(token).get(URL).status_code == 200
    AuthToken.objects.filter(user=superuser).update(expiry=timezone.now() - timedelta(seconds=1))
    assert _client(token).get(URL).status_code == 401


@pytest.mark.django_db
def test_tokens_expire_by_default_and_no_expiry_is_explicit(superuser, settings):
    _create_api_token(superuser.username)
    _create_api_token(superuser.username, "--no-expiry")
    expiries = sorted(
        AuthToken.objects.filter(user=superuser).values_list("expiry", flat=True),
        key=lambda value: value is None,
    )
    assert expiries[0] is not None
    assert expiries[0] > timezone.now() + timedelta(days=89)
    assert expiries[1] is None


@pytest.mark.django_db
def test_revoked_token_gets_401_and_the_users_other_tokens_still_work(superuser):
    kept = _create_api_token(superuser.username)
    revoked = _create_api_token(superuser.username)
    key = AuthToken.objects.get(token_key=revoked[:15]).token_key
    out = io.StringIO()
    call_command("revoke_api_token", key, stdout=out)
    assert _client(revoked).get(URL).status_code == 401
    assert _client(kept).get(URL).status_code == 200


@pytest.mark.django_db
def test_revoking_every_token_of_a_user(superuser):
    tokens = [_create_api_token(superuser.username) for _ in range(2)]
    call_command("revoke_api_token", "--all-of", superuser.username, stdout=io.StringIO())
    assert [_client(token).get(URL).status_code for token in tokens] == [401, 401]


@pytest.mark.django_db
def test_list_api_tokens_shows_keys_not_tokens(superuser):
    token = _create_api_token(superuser.username)
    out = io.StringIO()
    call_command("list_api_tokens", stdout=out)
    assert token[:15] in out.getvalue()
    assert token not in out.getvalue()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_migration_moves_plaintext_authtoken_tokens_to_digests(django_user_model):
    """A database from before knox: its rest_framework.authtoken tokens keep working, stored
    only as digests, and the plain-text table is gone."""
    user = django_user_model.objects.create_superuser("legacy", password="pw-legacy")
    old_key = "0123456789abcdef0123456789abcdef01234567"
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, "
            "created timestamp with time zone NOT NULL, user_id integer NOT NULL)"
            if connection.vendor == "postgresql"
            else "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, "
            "created datetime NOT NULL, user_id integer NOT NULL)"
        )
        cursor.execute(
            "INSERT INTO authtoken_token (key, created, user_id) VALUES (%s, %s, %s)",
            [old_key, timezone.now() - timedelta(days=3), user.pk],
        )
    migration = importlib.import_module("exports_app.migrations.0004_hash_api_tokens")
    state = MigrationExecutor(connection).loader.project_state(
        ("exports_app", "0004_hash_api_tokens")
    )
    with connection.schema_editor() as editor:
        migration.hash_old_tokens(state.apps, editor)

    assert "authtoken_token" not in connection.introspection.table_names()
    row = AuthToken.objects.get(user=user)
    assert old_key not in (row.digest, row.token_key)
    assert row.expiry is not None
    assert _client(old_key).get(URL).status_code == 200


@pytest.mark.django_db
def test_a_token_deleted_in_the_admin_is_revoked(superuser, client):
    token = _create_api_token(superuser.username)
    row = AuthToken.objects.get(user=superuser)
    client.force_login(superuser)
    listing = client.get("/admin/knox/authtoken/")
    assert listing.status_code == 200
    assert token not in listing.content.decode()
    response = client.post(f"/admin/knox/authtoken/{row.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert _client(token).get(URL).status_code == 401
