"""The data directory and the secrets generated into it on first run.

Standard library only: `make run`'s supervisor and the settings both use it before Django is set up.
"""

import os
import secrets
from pathlib import Path

__all__ = ["data_dir", "secret_from_env_or_file"]

BASE_DIR = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """`NBDWEB_DATA_DIR`, default `./var` beside manage.py, created on first use."""
    path = Path(os.environ.get("NBDWEB_DATA_DIR") or BASE_DIR / "var").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def secret_from_env_or_file(env_name: str, filename: str, nbytes: int = 48) -> str:
    """Return the secret from the environment, or from the data dir, creating it once.

    The file is created with mode 0600 and never overwritten, so every process that shares the
    data dir (web, Celery, nbdworker) agrees on the same value.
    """
    value = os.environ.get(env_name)
    if value:
        return value
    path = data_dir() / filename
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(nbytes))
    return path.read_text().strip()
