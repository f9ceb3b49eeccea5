"""The web side's end of per-node keys: the master secret stays here, each node's worker gets
only its own key (nbdworker/contract/nodekey.py).

`node_key(name)` is what a node's snapshot is signed and its private key sealed with
(services/publishing.py); `write_node_key` puts it where a worker sharing this host's data dir
finds it (``manage.py node_key NODE --write``).
"""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings

from nbdweb.datadir import data_dir
from nbdworker.contract.nodekey import derive_node_key, node_key_path

__all__ = ["node_key", "write_node_key"]


def node_key(node_name: str) -> str:
    """`node_name`'s key, derived from NBDWEB_CONFIG_SECRET (64 hex digits)."""
    return derive_node_key(settings.NBDWEB_CONFIG_SECRET, node_name)


def write_node_key(node_name: str, directory: Path | None = None) -> Path:
    """Write `node_name`'s key to ``<data dir>/node_keys/<node>`` (0600, its directory 0700),
    replacing the file atomically; return the path."""
    path = node_key_path(directory if directory is not None else data_dir(), node_name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(node_key(node_name) + "\n")
    os.replace(tmp, path)
    return path
