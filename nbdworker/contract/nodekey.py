"""Per-node keys: each worker holds its own node's key, never the master config secret.

The web side keeps the master secret (``NBDWEB_CONFIG_SECRET``) and derives from it one key per
node (`derive_node_key`: HKDF-SHA256, the info naming the node). A node's snapshot is signed,
and its TLS private key sealed, with that node's key (`nbdworker.contract.snapshot`), so a
worker's key neither forges a config another node accepts nor opens another node's private key.

A worker finds its key (`load_node_key`), in this order:

1. ``NBDWEB_NODE_KEY`` (what ``manage.py node_key <node>`` prints);
2. ``$NBDWEB_DATA_DIR/node_keys/<node>`` (what ``manage.py node_key <node> --write`` writes,
   0600; refused when group or others may read it, when another user owns it, or when others
   may write into its directory: whoever writes it chooses the key);
3. the master secret (``NBDWEB_CONFIG_SECRET``, else ``$NBDWEB_DATA_DIR/config_secret``), for a
   single machine whose worker shares the web side's data dir: the worker derives its own key
   from it at once, keeps only that, and logs a warning. Anywhere else, give it only (1) or (2).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nbdworker.contract.snapshot import SecretError, load_secret

__all__ = [
    "NODE_KEYS_DIR",
    "NODE_KEY_ENV",
    "NodeKey",
    "derive_node_key",
    "load_node_key",
    "node_key_path",
]

NODE_KEY_ENV = "NBDWEB_NODE_KEY"
NODE_KEYS_DIR = "node_keys"
# The info names the purpose and the node; the node's name ends it, so no two nodes share one.
_HKDF_INFO_PREFIX = b"nbdweb node key v1\0"
MASTER_SOURCE = "the master config secret (derived from it)"
_NODE_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
# One path component, never "." or "..": the node's name becomes a file name.
_FILE_NAME_RE = re.compile(r"^(?!\.{1,2}$)[^/\0]{1,255}$")


def derive_node_key(master: str | bytes, node: str) -> str:
    """The key of `node` (64 hex digits) derived from the master config secret."""
    raw = master.encode("utf-8") if isinstance(master, str) else master
    if not raw:
        raise SecretError("the config secret is empty")
    info = _HKDF_INFO_PREFIX + node.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(raw).hex()


def node_key_path(data_dir: str | os.PathLike[str], node: str) -> Path:
    """``<data_dir>/node_keys/<node>``; SecretError when the name cannot be a file name."""
    if not _FILE_NAME_RE.match(node):
        raise SecretError(f"node name {node!r} cannot name a key file")
    return Path(data_dir) / NODE_KEYS_DIR / node


class NodeKey(str):
    """A node key, and where it came from (`source`, for the worker's log)."""

    source: str

    @property
    def from_master(self) -> bool:
        """Derived here from the master secret (the single-machine fallback)."""
        return self.source == MASTER_SOURCE

    def __new__(cls, value: str, source: str) -> NodeKey:
        if not _NODE_KEY_RE.match(value):
            raise SecretError(
                f"{source} is not a node key (64 lower-case hex digits, as "
                "`manage.py node_key <node>` prints; not the master config secret)"
            )
        key = super().__new__(cls, value)
        key.source = source
        return key


def _read_key_file(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(f.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise SecretError(f"{path} is not a regular file")
        if status.st_mode & 0o077:
            raise SecretError(
                f"{path} is mode {status.st_mode & 0o777:o}: others may read it; chmod 600 it"
            )
        # Whoever wrote the file chose the key this worker verifies its config with.
        if status.st_uid != os.geteuid():
            raise SecretError(
                f"{path} is owned by uid {status.st_uid}, not this worker's user "
                f"({os.geteuid()}): chown it"
            )
        folder = os.stat(path.parent)
        if folder.st_mode & 0o022:
            raise SecretError(
                f"{path.parent} is mode {folder.st_mode & 0o777:o}: others may write a key "
                "there; chmod 700 it"
            )
        return f.read(256).decode("ascii", "replace").strip()


def load_node_key(node: str, environ: Mapping[str, str] | None = None) -> NodeKey:
    """This node's key from the first of the three places above; SecretError naming them."""
    env = os.environ if environ is None else environ
    value = env.get(NODE_KEY_ENV, "")
    if value:
        return NodeKey(value.strip(), NODE_KEY_ENV)
    data_dir = env.get("NBDWEB_DATA_DIR") or "./var"
    path = node_key_path(data_dir, node)
    value = _read_key_file(path)
    if value is not None:
        return NodeKey(value, str(path))
    try:
        master = load_secret(env)
    except SecretError as exc:
        raise SecretError(
            f"no node key: {NODE_KEY_ENV} is unset, {path} does not exist, and {exc}; "
            f"give this worker its key (`manage.py node_key {node}` on the web side)"
        ) from None
    return NodeKey(derive_node_key(master, node), MASTER_SOURCE)
