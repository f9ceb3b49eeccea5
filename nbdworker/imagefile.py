"""Opening an export's image so that the file opened is proven to lie under a storage root.

Anyone who can write into a storage directory can put a symlink, a FIFO, a device or a socket
where an image is expected, add a hard link to a file from elsewhere, or flip a directory into a
symlink to outside between a check and an open. So a path is never resolved first and opened
afterwards (two steps a race can split). The opener starts from a descriptor of the storage root
and opens one component at a time relative to the one before, with ``O_NOFOLLOW``: no symlink
is followed anywhere beneath the root, whatever the directory does meanwhile. The image itself
is opened with ``O_NONBLOCK`` (a FIFO without a writer cannot block it, nor the worker) and
``O_NOCTTY``; then the descriptor itself is checked: a regular file, one link only, and, where
``/proc`` is mounted, a path under the root. When the signed snapshot carries the image's
identity (device, inode and owner token, `nbdworker.contract.imageidentity`), the descriptor
must be that very file: another file renamed over the image's name inside the root (an
impostor) is refused.

Each refusal is an `ImageRefused` with a short `reason` (the metric's label) and a message for
the log.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from nbdworker.contract.imageidentity import identity_mismatch, read_token

__all__ = ["ImageRefused", "RefusalReason", "open_image"]

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_IMAGE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class RefusalReason:
    """The `reason` of an `ImageRefused` (label of ``nbdworker_exports_refused_total``)."""

    BAD_PATH = "bad_path"  # relative, or with "." / ".." components
    OUTSIDE_ROOTS = "outside_roots"
    SYMLINK = "symlink"  # a symlink anywhere beneath the root
    NOT_REGULAR = "not_regular"  # a FIFO, device, socket or directory
    HARD_LINK = "hard_link"
    MISSING = "missing"
    OPEN_FAILED = "open_failed"  # permissions, I/O errors
    NOT_OWNED = "not_owned"  # not the file nbdweb recorded as the image (an impostor)


class ImageRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_image(
    path: str,
    roots: Iterable[tuple[str, str]],
    writable: bool,
    identity: str | None = None,
) -> int:
    """Open the image at `path` for reading (and writing when `writable`); return its
    descriptor, blocking and close-on-exec. Raise `ImageRefused`.

    `roots` are (spelling, real path) pairs: `path` must start with one of the spellings (the
    operator's, or its real path); the root's own real path is trusted, nothing beneath it is.
    `identity`, when given, is the image's recorded identity: the file opened must be it.
    """
    if not path.startswith("/"):
        raise ImageRefused(RefusalReason.BAD_PATH, f"{path} is not an absolute path")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ImageRefused(RefusalReason.BAD_PATH, f"{path} has a '.' or '..' component")
    roots = list(roots)
    for spelling, real in roots:
        for prefix in dict.fromkeys((spelling, real)):
            root_parts = [p for p in prefix.split("/") if p]
            if len(parts) > len(root_parts) and parts[: len(root_parts)] == root_parts:
                return _open_beneath(real, parts[len(root_parts) :], writable, path, identity)
    shown = ", ".join(real for _, real in roots)
    raise ImageRefused(RefusalReason.OUTSIDE_ROOTS, f"{path} is not under a storage root ({shown})")


def _open_beneath(
    root: str, names: list[str], writable: bool, path: str, identity: str | None
) -> int:
    try:
        dir_fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise ImageRefused(
            RefusalReason.OPEN_FAILED, f"cannot open the storage root {root}: {exc.strerror}"
        ) from None
    try:
        for name in names[:-1]:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                raise _refusal(exc, dir_fd, name, path, directory=True) from None
            os.close(dir_fd)
            dir_fd = fd
        access = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(names[-1], access | _IMAGE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise _refusal(exc, dir_fd, names[-1], path, directory=False) from None
    finally:
        os.close(dir_fd)
    try:
        _check_opened(fd, root, path)
        if identity is not None:
            _check_identity(fd, path, identity)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(exc: OSError, dir_fd: int, name: str, path: str, directory: bool) -> ImageRefused:
    """What an open beneath the root failed on, named for the log and the metric."""
    code = exc.errno
    if code in (errno.ENOTDIR, errno.ELOOP):
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            mode = 0
        # The entry may have changed again since: the name only says what the open met, most
        # likely; the refusal itself does not depend on it.
        if code == errno.ELOOP or stat.S_ISLNK(mode):
            return ImageRefused(
                RefusalReason.SYMLINK, f"{path}: {name!r} is a symlink (none are followed)"
            )
        return ImageRefused(RefusalReason.NOT_REGULAR, f"{path}: {name!r} is not a directory")
    if code == errno.ENOENT:
        what = "directory" if directory else "image"
        return ImageRefused(RefusalReason.MISSING, f"{path}: no such {what} {name!r}")
    if code in (errno.ENXIO, errno.EISDIR, errno.ENODEV):
        return ImageRefused(
            RefusalReason.NOT_REGULAR, f"{path} is not a regular file ({exc.strerror})"
        )
    return ImageRefused(RefusalReason.OPEN_FAILED, f"cannot open {path}: {exc.strerror}")


def _check_opened(fd: int, root: str, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        raise ImageRefused(
            RefusalReason.NOT_REGULAR, f"{path} is {kind}: only regular files are served"
        )
    if st.st_nlink > 1:
        raise ImageRefused(
            RefusalReason.HARD_LINK,
            f"{path} has {st.st_nlink} hard links: the same file may be reachable from outside "
            "the storage roots",
        )
    # Belt and braces: the kernel's own name for the descriptor (a directory renamed out of the
    # root while it was walked would show here).
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return
    if not actual.startswith(root.rstrip("/") + "/"):
        raise ImageRefused(
            RefusalReason.OUTSIDE_ROOTS, f"{path} was opened as {actual}, outside {root}"
        )


def _check_identity(fd: int, path: str, identity: str) -> None:
    try:
        why = identity_mismatch(os.fstat(fd), identity, lambda: read_token(fd))
    except OSError as exc:
        raise ImageRefused(
            RefusalReason.OPEN_FAILED, f"cannot read the owner mark of {path}: {exc.strerror}"
        ) from None
    if why is not None:
        raise ImageRefused(
            RefusalReason.NOT_OWNED,
            f"{path} is not the image nbdweb recorded ({why}): another file took its name",
        )
