"""The data directory, the secrets generated into it on first run, and their file modes.

The data dir is 0700 and every secret and the SQLite database in it 0600: they hold the
Django secret key, the config-signing secret, the key-encryption key and the users' password
hashes, which no other local user may read. Modes looser than that (an install from before
this rule, a directory made by hand) are tightened when the process owns the file.

Standard library only: `make run`'s supervisor and the settings both use it before Django is set up.
"""

import logging
import os
import secrets
from pathlib import Path

__all__ = ["data_dir", "private_file", "secret_files_allowed", "secret_from_env_or_file"]

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

logger = logging.getLogger(__name__)


def _tighten(path: Path, mode: int) -> None:
    """Drop every permission bit of `path` beyond `mode` (never adds any)."""
    status = path.stat()
    if status.st_mode & 0o777 & ~mode == 0:
        return
    if status.st_uid != os.geteuid():
        logger.warning(
            "%s is mode %o and not ours to change: make it %o", path, status.st_mode & 0o777, mode
        )
        return
    os.chmod(path, status.st_mode & 0o777 & mode)


def data_dir() -> Path:
    """`NBDWEB_DATA_DIR`, default `./var` beside manage.py, created 0700 on first use."""
    path = Path(os.environ.get("NBDWEB_DATA_DIR") or BASE_DIR / "var").resolve()
    path.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    _tighten(path, DATA_DIR_MODE)
    return path


def private_file(path: Path) -> None:
    """Make sure `path` exists with mode 0600 (created empty when missing).

    Used for the SQLite database before SQLite opens it: SQLite creates a new database with the
    umask's mode (0644), and its -wal / -shm / -journal files copy the database file's mode.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))
    except FileNotFoundError:
        return  # no such directory: the database's own error will say so
    _tighten(path, PRIVATE_FILE_MODE)


def secret_files_allowed() -> bool:
    """False when `NBDWEB_SECRET_FILES=0`: secrets come from the environment only.

    `make run` sets it for its processes and passes each only the secrets it uses, so a process
    cannot fall back to reading (or creating) a secret it was not given.
    """
    return os.environ.get("NBDWEB_SECRET_FILES", "1").strip() != "0"


def secret_from_env_or_file(env_name: str, filename: str, nbytes: int = 48) -> str:
    """Return the secret from the environment, or from the data dir, creating it once.

    The file is created with mode 0600 and never overwritten, so every process that shares the
    data dir (web, Celery, nbdworker) agrees on the same value. With `NBDWEB_SECRET_FILES=0` a
    secret missing from the environment is empty.
    """
    value = os.environ.get(env_name)
    if value:
        return value
    if not secret_files_allowed():
        return ""
    path = data_dir() / filename
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        _tighten(path, PRIVATE_FILE_MODE)
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(nbytes))
    return path.read_text().strip()
