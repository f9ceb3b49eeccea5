"""Migrations apply on a fresh SQLite file and a fresh PostgreSQL database, create the default
node from the settings, and match the models."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_SERVER = os.environ.get("NBDWEB_TEST_PG", "postgres://postgres@127.0.0.1:5432")

CHECK_DEFAULT_NODE = (
    "from exports_app.models import WorkerNode; n = WorkerNode.objects.get(); "
    "print(n.name, n.listen, n.storage_root, n.tls_policy.mode)"
)


def _manage(tmp_path, database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        "NBDWORKER_NODE": "lab-node",
        "NBDWEB_STORAGE_ROOT": "/srv/nbd-images",
        "NBD_LISTEN": "0.0.0.0:10900",
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _migrate_and_check(tmp_path, url: str) -> None:
    result = _manage(tmp_path, url, "migrate", "--no-input")
    assert result.returncode == 0, result.stderr
    result = _manage(tmp_path, url, "shell", "-c", CHECK_DEFAULT_NODE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-4:] == ["lab-node", "0.0.0.0:10900", "/srv/nbd-images", "NOTLS"]
    # Back to zero and forward again: every migration is reversible.
    result = _manage(tmp_path, url, "migrate", "exports_app", "zero", "--no-input")
    assert result.returncode == 0, result.stderr
    result = _manage(tmp_path, url, "migrate", "--no-input")
    assert result.returncode == 0, result.stderr


def test_migrations_apply_on_fresh_sqlite(tmp_path):
    _migrate_and_check(tmp_path, f"sqlite:///{tmp_path / 'fresh.sqlite3'}")


def test_migrations_apply_on_fresh_postgresql(tmp_path):
    name = f"nbdweb_migtest_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_SERVER}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            _migrate_and_check(tmp_path, f"{PG_SERVER}/{name}")
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_models_and_migrations_agree(tmp_path):
    result = _manage(
        tmp_path,
        f"sqlite:///{tmp_path / 'x.sqlite3'}",
        "makemigrations",
        "exports_app",
        "--check",
        "--dry-run",
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db
def test_recorded_owner_tokens_become_their_digests(default_node):
    """0011: the identity in the database (and so in Redis's snapshots) stops carrying the
    image's owner token; the image it names still passes the check."""
    import importlib

    from django.apps import apps as current_apps

    from exports_app.models import Export
    from nbdworker.contract.imageidentity import identity_mismatch, mark_digest

    token = "ab" * 16
    raw = Export.objects.create(
        node=default_node, name="raw", size=1, image_identity=f"66:77:{token}"
    )
    bare = Export.objects.create(node=default_node, name="bare", size=1, image_identity="66:78:")
    migration = importlib.import_module("exports_app.migrations.0011_image_mark_digests")
    migration.digest_tokens(current_apps, None)
    raw.refresh_from_db()
    bare.refresh_from_db()
    assert raw.image_identity == f"66:77:{mark_digest(token)}"
    assert token not in raw.image_identity
    assert bare.image_identity == "66:78:"
    stat = os.stat_result((0o100600, 77, 66, 1, 0, 0, 1, 0, 0, 0))
    assert identity_mismatch(stat, raw.image_identity, lambda: token) is None
