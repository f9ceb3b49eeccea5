"""Secrets at rest: the data dir is 0700, the SQLite database and every generated secret 0600,
whether the settings create them (any manage.py command) or `make run` does (runstack
--prepare-only), and looser modes left by an older install are tightened."""

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECRET_FILES = ("secret_key", "config_secret", "key_encryption_key")


def _env(data: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "SECRET_KEY", "NBDWEB_CONFIG_SECRET", "NBDWEB_SECRET_FILES"}
        and key != "NBDWEB_KEY_ENCRYPTION_KEY"
    }
    env["NBDWEB_DATA_DIR"] = str(data)
    return env


def _run(env: dict[str, str], *argv: str) -> None:
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_private(data: Path) -> None:
    assert _mode(data) == 0o700
    assert _mode(data / "db.sqlite3") == 0o600
    for name in SECRET_FILES:
        assert _mode(data / name) == 0o600, name
    # SQLite's side files copy the database's mode; nothing in the dir but the public static
    # files is open to others (and the dir itself keeps them out).
    for path in data.iterdir():
        assert _mode(path) & 0o077 == 0 or path.name == "static", (path, oct(_mode(path)))


def test_settings_create_a_private_data_dir_database_and_secrets(tmp_path):
    data = tmp_path / "data"
    _run(_env(data), "manage.py", "migrate", "--no-input", "-v0")
    _assert_private(data)


def test_make_run_setup_leaves_everything_private(tmp_path):
    data = tmp_path / "data"
    _run(_env(data), "scripts/runstack.py", "--prepare-only")
    _assert_private(data)


def test_loose_modes_of_an_older_install_are_tightened(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    for name in (*SECRET_FILES, "db.sqlite3"):
        (data / name).write_text("" if name == "db.sqlite3" else "an-old-secret")
        (data / name).chmod(0o644)
    _run(_env(data), "manage.py", "migrate", "--no-input", "-v0")
    _assert_private(data)
    assert (data / "secret_key").read_text() == "an-old-secret"
