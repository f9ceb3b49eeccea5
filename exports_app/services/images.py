"""Disk work on raw image files: pure functions on paths, no Django, no Celery.

Every function is safe to run again after it failed or was killed half way (Celery redelivers
a job whose worker died):

- a new image is built in a hidden temporary file beside its final path (`.<name>.<random>.partial`)
  and renamed into place only when complete and fsynced, without replacing anything already
  there, so the final path never holds a half-made image; leftovers of a killed attempt are
  removed by the next attempt;
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
from collections.abc import Callable, Iterator

__all__ = [
    "CHUNK_SIZE",
    "Progress",
    "clone",
    "create_sparse",
    "data_extents",
    "describe_error",
    "remove",
    "resize",
    "sha256",
    "wipe",
]

Progress = Callable[[int, int], None]

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
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _no_progress(done: int, total: int) -> None:
    pass


def describe_error(exc: BaseException) -> str:
    """A one-line message for a job's `error` and the export's `last_error`."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


# -- placing files -------------------------------------------------------------------------------


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


def _rename_noreplace(source: str, target: str) -> None:
    """Rename `source` to `target`, failing with FileExistsError rather than replacing it."""
    if _renameat2 is not None:
        result = _renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), target)
    # Filesystems without RENAME_NOREPLACE: link() refuses an existing target just the same.
    os.link(source, target)
    os.unlink(source)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_partials(path: str) -> None:
    directory, name = os.path.split(path)
    prefix = f".{name}."
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name.endswith(_PARTIAL_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def _new_image(path: str) -> Iterator[int]:
    """Yield the descriptor of a temporary file beside `path`; on a clean exit, fsync it and
    rename it to `path`. On any error the temporary file is removed and nothing is at `path`."""
    directory, name = os.path.split(path)
    _remove_stale_partials(path)
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}{_PARTIAL_SUFFIX}")
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        _rename_noreplace(temp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(directory)


def _already_made(path: str, size: int | None) -> bool:
    """Whether an earlier attempt of this job already placed the image (then there is nothing
    to do). Anything else at the path is refused: an image is never overwritten."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if size is not None and st.st_size == size and os.path.isfile(path):
        return True
    raise FileExistsError(errno.EEXIST, "An image already exists at the path", path)


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


def create_sparse(path: str, size: int) -> None:
    """A sparse raw image of `size` bytes at `path` (no data blocks allocated)."""
    if _already_made(path, size):
        return
    with _new_image(path) as fd:
        os.ftruncate(fd, size)


def clone(
    source: str, path: str, size: int | None = None, progress: Progress = _no_progress
) -> bool:
    """Copy the image `source` to a new image at `path`, grown to `size` if that is larger.

    A reflink (FICLONE) shares the blocks where the filesystem can; otherwise only the source's
    data ranges are copied, and all-zero chunks inside them are skipped, so holes stay holes.
    Returns True when a reflink was used.
    """
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = os.fstat(src).st_size
        final_size = total if size is None else size
        if final_size < total:
            raise ValueError(f"A clone cannot be smaller than its source ({total} bytes).")
        if _already_made(path, final_size):
            return False
        with _new_image(path) as dst:
            reflinked = _reflink(src, dst)
            if not reflinked:
                os.ftruncate(dst, total)
                _copy_data(src, dst, total, progress)
            if final_size != total:
                os.ftruncate(dst, final_size)
        progress(total, total)
        return reflinked
    finally:
        os.close(src)


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


def resize(path: str, size: int) -> None:
    """Grow (sparsely) or shrink the image at `path` to `size` bytes."""
    # No O_CREAT: a missing image is an error, never a new empty disk.
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def wipe(path: str, progress: Progress = _no_progress) -> None:
    """Overwrite every data range of the image with zeroes and fsync it.

    Holes hold no data, so they are left alone (writing them would only allocate blocks).
    On copy-on-write filesystems and SSDs the old blocks may survive elsewhere; this is a
    best effort, not a secure erase.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        total = os.fstat(fd).st_size
        for start, end in list(data_extents(fd, total)):
            for offset, length in _chunks(start, end):
                _pwrite_all(fd, _ZEROES[:length], offset)
                progress(offset + length, total)
        os.fsync(fd)
    finally:
        os.close(fd)
    progress(total, total)


def remove(path: str) -> bool:
    """Unlink the image; False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    _fsync_dir(os.path.dirname(path) or ".")
    return True


def sha256(path: str, progress: Progress = _no_progress) -> str:
    """Hex SHA-256 of the image's contents (holes count as zeroes, without reading them)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = os.fstat(fd).st_size
        position = 0
        for start, end in data_extents(fd, total):
            _hash_zeroes(digest, position, start, total, progress)
            for offset, length in _chunks(start, end):
                digest.update(_pread_exact(fd, length, offset))
                progress(offset + length, total)
            position = end
        _hash_zeroes(digest, position, total, total, progress)
    finally:
        os.close(fd)
    progress(total, total)
    return digest.hexdigest()


def _hash_zeroes(digest, start: int, end: int, total: int, progress: Progress) -> None:
    for offset, length in _chunks(start, end):
        digest.update(_ZEROES[:length])
        progress(offset + length, total)
