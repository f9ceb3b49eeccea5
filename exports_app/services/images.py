"""Disk work on raw image files: pure functions on open directories and files, no Django.

Every image is named by an `ImagePlace`: an open directory (reached from a storage root without
following symbolic links, exports_app.services.storage) and a file name in it. The functions
touch only files nbdweb made or imported, which it knows by their *identity*: device, inode and
a random token nbdweb writes into the file's `user.nbdweb.image` extended attribute (an inode
number is reused once its file is deleted; the token is not, and only a process that may write
the file can set it; the rule is `nbdworker.contract.imageidentity`, which the worker checks
too). A new image is created exclusively (O_EXCL) and its identity is handed to
`record` before the image takes its name; every later open checks the identity of what it
opened (O_NOFOLLOW, a regular file) before using it. On a filesystem without user extended
attributes the identity is device and inode alone. A file that was already there is never
adopted, overwritten or removed: `ImageNotOwned`.

Every function is safe to run again after it failed or was killed half way (Celery redelivers
a job whose worker died):

- a new image is built in a hidden temporary file beside its final name
  (`.<name>.<random>.partial`) and renamed into place only when complete and fsynced, without
  replacing anything already there; the partial file of a killed attempt is recognised by the
  identity recorded for it and removed by the next attempt;
- resize is one `ftruncate`; remove accepts an image that is already gone.

Long operations report `progress(done, total)` in bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from typing import NamedTuple

from nbdworker.contract.imageidentity import (
    NO_XATTR_ERRNOS,
    OWNER_XATTR,
    identity_mismatch,
    identity_of,
    read_token,
)

__all__ = [
    "CHUNK_SIZE",
    "ImageNotOwned",
    "ImagePlace",
    "Progress",
    "check_importable",
    "clone",
    "create_sparse",
    "data_extents",
    "describe_error",
    "identity_of",
    "open_owned",
    "remove",
    "resize",
    "sha256",
    "take_over",
    "wipe",
]

Progress = Callable[[int, int], None]
Record = Callable[[str], None]

# Unit of copying, hashing and wiping: big enough for throughput, small enough for progress.
CHUNK_SIZE = 1 << 20
_ZEROES = bytes(CHUNK_SIZE)
# <linux/fs.h>: _IOW(0x94, 9, int)
FICLONE = 0x40049409
# Errors that mean "this filesystem (pair) cannot reflink": fall back to copying.
_NO_REFLINK = {
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOTTY,
    errno.ENOSYS,
    errno.EBADF,
}
_PARTIAL_SUFFIX = ".partial"
_REMOVING_SUFFIX = ".removing"
_RENAME_NOREPLACE = 1
# O_NONBLOCK: opening a FIFO put where an image was expected must not wait for a writer.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class ImagePlace(NamedTuple):
    """Where an image lives: `name` in the open directory `parent` (`path` is for messages)."""

    parent: int
    name: str
    path: str


class ImageNotOwned(OSError):
    """The file at the image's name is not the image nbdweb created or imported."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.EPERM, f"{why}; nbdweb leaves it alone", path)


def _no_progress(done: int, total: int) -> None:
    pass


def _no_record(identity: str) -> None:
    pass


def describe_error(exc: BaseException) -> str:
    """A one-line message for a job's `error` and the export's `last_error`."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _mark(fd: int, path: str) -> str:
    """Write a new owner token into the open file; its identity (token empty where the
    filesystem has no user extended attributes)."""
    token = secrets.token_hex(16)
    try:
        os.setxattr(fd, OWNER_XATTR, token.encode())
    except OSError as exc:
        if exc.errno not in NO_XATTR_ERRNOS:
            raise OSError(exc.errno, exc.strerror, path) from None
        token = ""
    return identity_of(os.fstat(fd), token)


def _is(st: os.stat_result, token_of: Callable[[], str], identity: str) -> bool:
    return identity_mismatch(st, identity, token_of) is None


# -- opening and placing files -------------------------------------------------------------------


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()


def _rename_noreplace(parent: int, source: str, target: str) -> None:
    """Rename `source` to `target` in `parent`, failing with FileExistsError rather than
    replacing what is at `target`."""
    if _renameat2 is not None:
        result = _renameat2(
            parent, os.fsencode(source), parent, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), target)
    # Filesystems without RENAME_NOREPLACE: link() refuses an existing target just the same.
    os.link(source, target, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
    os.unlink(source, dir_fd=parent)


def _open_checked(place: ImagePlace, flags: int, identity: str | None) -> int:
    """Open the file at `place` without following a symbolic link; it must be a regular file
    and, when `identity` is given, that very file."""
    try:
        fd = os.open(place.name, flags | _OPEN_FLAGS, dir_fd=place.parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageNotOwned(place.path, "A symbolic link is at the image's name") from None
        raise OSError(exc.errno, exc.strerror, place.path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageNotOwned(place.path, "Not a regular file")
        if identity is not None and not _is(st, lambda: read_token(fd), identity):
            raise ImageNotOwned(place.path, "Not the image nbdweb created or imported")
        # The image's data is read and written synchronously: blocking I/O again.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_owned(place: ImagePlace, identity: str, writable: bool = False) -> int:
    """A descriptor of the image nbdweb recorded as `identity`; ImageNotOwned for any other
    file at its name, FileNotFoundError when nothing is there."""
    return _open_checked(place, os.O_RDWR if writable else os.O_RDONLY, identity)


def take_over(place: ImagePlace, check: Callable[[str, int], None]) -> str:
    """Take an existing regular file as an image (an explicit import); returns its identity.

    `check(device_inode, size)` may refuse the file by raising, before anything is written.
    Only a file with one name, owned by this process's user, is taken: another name (a hard
    link) would keep a way to the image that nbdweb does not know of, and another user's file
    is not ours to resize or wipe. The file then gets a new owner token, so nbdweb can tell it
    from a file put in its place, and mode 0600 (a 0666 file would let anyone change it).
    """
    fd = _open_checked(place, os.O_RDONLY, None)
    try:
        _check_importable(fd, place, check)
        identity = _mark(fd, place.path)
        os.fchmod(fd, 0o600)
        return identity
    finally:
        os.close(fd)


def check_importable(place: ImagePlace, check: Callable[[str, int], None]) -> None:
    """Whether `take_over` would take the file at `place` (ImageNotOwned, FileNotFoundError or
    what `check` raises if not); writes nothing. For refusing an import when it is asked."""
    fd = _open_checked(place, os.O_RDONLY, None)
    try:
        _check_importable(fd, place, check)
    finally:
        os.close(fd)


def _check_importable(fd: int, place: ImagePlace, check: Callable[[str, int], None]) -> None:
    st = os.fstat(fd)
    check(f"{st.st_dev}:{st.st_ino}", st.st_size)
    if st.st_nlink != 1:
        raise ImageNotOwned(
            place.path, f"It has {st.st_nlink} names (hard links); an import needs one"
        )
    if st.st_uid != os.geteuid():
        raise ImageNotOwned(
            place.path, f"It belongs to uid {st.st_uid}, not to nbdweb's (uid {os.geteuid()})"
        )


def _has_identity(place: ImagePlace, name: str, identity: str) -> bool:
    try:
        st = os.stat(name, dir_fd=place.parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    # getxattr has no dir_fd: the directory's /proc/self/fd entry names it (the file itself is
    # not followed).
    return _is(st, lambda: read_token(f"/proc/self/fd/{place.parent}/{name}"), identity)


def _already_made(place: ImagePlace, owned: str | None) -> bool:
    """Whether an earlier attempt of this job already placed the image recorded as `owned`
    (then there is nothing to do). Any other file at the name is refused: never adopted."""
    try:
        os.stat(place.name, dir_fd=place.parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if owned is not None and _has_identity(place, place.name, owned):
        return True
    raise FileExistsError(
        errno.EEXIST,
        "A file nbdweb did not create is at the image's name (import it explicitly)",
        place.path,
    )


def _remove_own_partials(place: ImagePlace, owned: str | None) -> None:
    """Remove the partial image a killed attempt left, known by the identity it recorded; any
    other file, whatever its name, stays."""
    if owned is None:
        return
    prefix = f".{place.name}."
    with os.scandir(place.parent) as entries:
        names = [e.name for e in entries if e.name.startswith(prefix)]
    for name in names:
        if name.endswith(_PARTIAL_SUFFIX) and _has_identity(place, name, owned):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=place.parent)


@contextlib.contextmanager
def _new_image(place: ImagePlace, record: Record) -> Iterator[int]:
    """Yield the descriptor of a new temporary file beside the image's name, whose identity
    was handed to `record` first; on a clean exit, fsync it and rename it to the name, never
    over an existing file. On any error the temporary file is removed and `record("")` says
    so."""
    temp = f".{place.name}.{secrets.token_hex(6)}{_PARTIAL_SUFFIX}"
    fd = os.open(
        temp,
        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=place.parent,
    )
    try:
        identity = _mark(fd, place.path)
        record(identity)
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            _rename_noreplace(place.parent, temp, place.name)
        except FileExistsError:
            raise FileExistsError(
                errno.EEXIST,
                "A file nbdweb did not create appeared at the image's name",
                place.path,
            ) from None
        # Whoever may write the directory may rename another file over the new name the
        # moment it exists (or, without RENAME_NOREPLACE, between link and unlink): what is
        # there now must be the file just made, or the job fails and records nothing.
        if not _has_identity(place, place.name, identity):
            raise ImageNotOwned(place.path, "Another file took the image's name as it was placed")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=place.parent)
        # Nothing was placed: the identity recorded above names no file any more.
        with contextlib.suppress(Exception):
            record("")
        raise
    os.fsync(place.parent)


# -- extents -------------------------------------------------------------------------------------


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, end) of the ranges of `fd` that may hold data; holes are skipped.

    Where SEEK_DATA is not supported the whole file is one range.
    """
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield offset, size
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _chunks(start: int, end: int) -> Iterator[tuple[int, int]]:
    for offset in range(start, end, CHUNK_SIZE):
        yield offset, min(CHUNK_SIZE, end - offset)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        # The source shrank under us: a copy or hash of it would be wrong.
        raise OSError(errno.EIO, f"short read at offset {offset} (the image changed size)")
    return data


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# -- the operations ------------------------------------------------------------------------------


def create_sparse(
    place: ImagePlace, size: int, owned: str | None = None, record: Record = _no_record
) -> str:
    """A sparse raw image of `size` bytes (no data blocks allocated); returns its identity.

    `owned` is the identity an earlier attempt recorded, if any: its image is kept.
    """
    if _already_made(place, owned):
        return owned
    _remove_own_partials(place, owned)
    made: list[str] = []
    with _new_image(place, lambda identity: (made.append(identity), record(identity))) as fd:
        os.ftruncate(fd, size)
    return made[0]


def clone(
    source: int,
    place: ImagePlace,
    size: int | None = None,
    owned: str | None = None,
    record: Record = _no_record,
    progress: Progress = _no_progress,
) -> bool:
    """Copy the open image `source` to a new image at `place`, grown to `size` if larger.

    A reflink (FICLONE) shares the blocks where the filesystem can; otherwise only the source's
    data ranges are copied, and all-zero chunks inside them are skipped, so holes stay holes.
    Returns True when a reflink was used.
    """
    total = os.fstat(source).st_size
    final_size = total if size is None else size
    if final_size < total:
        raise ValueError(f"A clone cannot be smaller than its source ({total} bytes).")
    if _already_made(place, owned):
        return False
    _remove_own_partials(place, owned)
    with _new_image(place, record) as dst:
        reflinked = _reflink(source, dst)
        if not reflinked:
            os.ftruncate(dst, total)
            _copy_data(source, dst, total, progress)
        if final_size != total:
            os.ftruncate(dst, final_size)
    progress(total, total)
    return reflinked


def _reflink(src: int, dst: int) -> bool:
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as exc:
        if exc.errno in _NO_REFLINK:
            return False
        raise
    return True


def _copy_data(src: int, dst: int, total: int, progress: Progress) -> None:
    for start, end in data_extents(src, total):
        for offset, length in _chunks(start, end):
            data = _pread_exact(src, length, offset)
            if data != _ZEROES[:length]:
                _pwrite_all(dst, data, offset)
            progress(offset + length, total)


def resize(fd: int, size: int) -> None:
    """Grow (sparsely) or shrink the open image to `size` bytes."""
    os.ftruncate(fd, size)
    os.fsync(fd)


def wipe(fd: int, progress: Progress = _no_progress) -> None:
    """Overwrite every data range of the open image with zeroes and fsync it.

    Holes hold no data, so they are left alone (writing them would only allocate blocks).
    On copy-on-write filesystems and SSDs the old blocks may survive elsewhere; this is a
    best effort, not a secure erase.
    """
    total = os.fstat(fd).st_size
    for start, end in list(data_extents(fd, total)):
        for offset, length in _chunks(start, end):
            _pwrite_all(fd, _ZEROES[:length], offset)
            progress(offset + length, total)
    os.fsync(fd)
    progress(total, total)


def remove(place: ImagePlace, identity: str) -> bool:
    """Unlink the image recorded as `identity`; False when it was already gone.

    The name is first moved aside, and what was moved is checked again: a file swapped in
    after the check is put back, not removed.
    """
    try:
        os.close(open_owned(place, identity))
    except FileNotFoundError:
        return False
    aside = f".{place.name}.{secrets.token_hex(6)}{_REMOVING_SUFFIX}"
    try:
        _rename_noreplace(place.parent, place.name, aside)
    except FileNotFoundError:
        return False
    if not _has_identity(place, aside, identity):
        with contextlib.suppress(OSError):
            _rename_noreplace(place.parent, aside, place.name)
        raise ImageNotOwned(place.path, "The file changed while it was being removed")
    os.unlink(aside, dir_fd=place.parent)
    os.fsync(place.parent)
    return True


def sha256(fd: int, progress: Progress = _no_progress) -> str:
    """Hex SHA-256 of the open image's contents (holes count as zeroes, without reading them)."""
    digest = hashlib.sha256()
    total = os.fstat(fd).st_size
    position = 0
    for start, end in data_extents(fd, total):
        _hash_zeroes(digest, position, start, total, progress)
        for offset, length in _chunks(start, end):
            digest.update(_pread_exact(fd, length, offset))
            progress(offset + length, total)
        position = end
    _hash_zeroes(digest, position, total, total, progress)
    progress(total, total)
    return digest.hexdigest()


def _hash_zeroes(digest, start: int, end: int, total: int, progress: Progress) -> None:
    for offset, length in _chunks(start, end):
        digest.update(_ZEROES[:length])
        progress(offset + length, total)
