"""An image's identity: how nbdweb knows an image file it created or imported again.

``<device>:<inode>:<mark digest>``: the file's device and inode, and a digest of the random
token nbdweb writes into its ``user.nbdweb.image`` extended attribute (an inode number is reused
once its file is deleted; the token is not, and only a process that may write the file can set
it). The identity holds the token's digest, not the token: the identity travels in the config
snapshot, which whoever reads Redis sees, and someone who could also write into the storage
directory would otherwise give a file on the image's freed inode that very token. Identities
recorded with the token itself (32 hex digits, before the digest) are still checked against it.
The last part is empty where the filesystem has no user extended attributes (and for images
recorded before tokens existed): then device and inode alone. The Celery jobs record it
(`exports_app.services.images`) and check it before touching an image; the worker checks the
identity its signed snapshot carries on the descriptor it opened, before serving
(`nbdworker.imagefile`). One rule, here, for both.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable

__all__ = [
    "NO_XATTR_ERRNOS",
    "OWNER_XATTR",
    "identity_mismatch",
    "identity_of",
    "is_identity",
    "mark_digest",
    "read_token",
]

OWNER_XATTR = "user.nbdweb.image"
# errnos of a filesystem that keeps no user extended attributes
NO_XATTR_ERRNOS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
_IDENTITY_RE = re.compile(r"^[0-9]{1,20}:[0-9]{1,20}:[0-9a-f]{0,64}$")
# A token as the jobs write it (secrets.token_hex(16)); an identity whose last part is this long
# holds the token itself (recorded before digests), a MARK_DIGEST_LENGTH one its digest.
_RAW_TOKEN_LENGTH = 32
MARK_DIGEST_LENGTH = 40


def mark_digest(token: str) -> str:
    """What an identity records of the owner token `token` ("" for none)."""
    if not token:
        return ""
    digest = hashlib.sha256(b"nbdweb image mark v1\0" + token.encode("ascii", "replace"))
    return digest.hexdigest()[:MARK_DIGEST_LENGTH]


def identity_of(st: os.stat_result, token: str = "") -> str:
    """`device:inode:digest` of the file `st` describes, whose owner token is `token`."""
    return f"{st.st_dev}:{st.st_ino}:{mark_digest(token)}"


def is_identity(text: str) -> bool:
    return bool(_IDENTITY_RE.match(text))


def read_token(target: int | str) -> str:
    """The owner token of an open file (descriptor) or of a path (not followed); "" when it
    has none or the filesystem keeps no user extended attributes."""
    try:
        if isinstance(target, int):
            value = os.getxattr(target, OWNER_XATTR)
        else:
            value = os.getxattr(target, OWNER_XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in NO_XATTR_ERRNOS or exc.errno == errno.ENODATA:
            return ""
        raise
    return value[:128].decode("ascii", "replace")


def identity_mismatch(st: os.stat_result, identity: str, token_of: Callable[[], str]) -> str | None:
    """Why the file `st` describes is not the image recorded as `identity`, or None when it
    is. `token_of` reads the file's token, only when one was recorded."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    dev_ino, _, token = identity.rpartition(":")
    found = f"{st.st_dev}:{st.st_ino}"
    if found != dev_ino:
        return f"device:inode {found}, recorded {dev_ino}"
    if not token:
        return None
    found_token = token_of()
    found = found_token if len(token) == _RAW_TOKEN_LENGTH else mark_digest(found_token)
    if not found_token or found != token:
        return "its owner mark (user.nbdweb.image) is not the one recorded"
    return None
