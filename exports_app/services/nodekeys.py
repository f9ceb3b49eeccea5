"""The web side's end of per-node keys: the master secret stays here, each node's worker gets
only its own key (nbdworker/contract/nodekey.py).

`node_key(name)` is what a node's snapshot is signed and its private key sealed with
(services/publishing.py), and its worker's status records checked with
(services/workerstatus.py); `write_node_key` puts it where a worker sharing this host's data dir
finds it (``manage.py node_key NODE --write``). `web_key(purpose)` is the web side's own.
"""

from __future__ import annotations

import contextlib
import errno
import os
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

from nbdweb.datadir import data_dir
from nbdworker.contract.nodekey import derive_node_key, node_key_path

__all__ = ["node_key", "web_key", "write_node_key"]


def node_key(node_name: str) -> str:
    """`node_name`'s key, derived from NBDWEB_CONFIG_SECRET (64 hex digits)."""
    return _derived(settings.NBDWEB_CONFIG_SECRET, node_name)


def web_key(purpose: str) -> str:
    """A key of the web side's own for `purpose` (64 hex digits; no worker can derive it): it
    signs what the web side writes to Redis and reads back (events, the observer's state)."""
    return _web_derived(settings.NBDWEB_CONFIG_SECRET, purpose)


@lru_cache(maxsize=16)
def _web_derived(master: str, purpose: str) -> str:
    info = b"nbdweb web key v1\0" + purpose.encode("utf-8")
    return (
        HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info)
        .derive(master.encode("utf-8"))
        .hex()
    )


@lru_cache(maxsize=1024)
def _derived(master: str, node_name: str) -> str:
    # Every status record read is checked with it: derive once per node.
    return derive_node_key(master, node_name)


def write_node_key(node_name: str, directory: Path | None = None) -> Path:
    """Write `node_name`'s key to ``<data dir>/node_keys/<node>`` (0600, its directory 0700),
    replacing the file atomically; return the path. OSError when the directory is another
    user's and others may reach into it."""
    path = node_key_path(directory if directory is not None else data_dir(), node_name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # A directory made by hand may be loose: others could read the key, or plant the
        # temporary file below (0666, theirs) and read the key from it.
        status = os.fstat(dir_fd)
        if status.st_mode & 0o077:
            if status.st_uid != os.geteuid():
                raise OSError(
                    errno.EPERM,
                    f"{path.parent} is mode {status.st_mode & 0o777:o} and not ours: make it 700",
                )
            os.fchmod(dir_fd, 0o700)
        tmp = f".{path.name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(node_key(node_name) + "\n")
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return path
