"""A raw image file or a block device.

Sparse-aware: `SEEK_DATA`/`SEEK_HOLE` answer block status and sparse reads (probed per request,
never over the whole image on open, which would make every connect slow on big images);
`fallocate` punches holes for TRIM and zeroes ranges for WRITE_ZEROES; `fdatasync` makes FLUSH
and FUA durable. The fast paths that a filesystem may refuse or make slow (the hole check of
reads, `RWF_NOWAIT`, `sendfile`) are measured as they are used and given up where they do not
pay (nbdworker/backends/probes.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import threading
import time

from nbdworker.backends.base import STATE_HOLE, STATE_ZERO, Backend, Extent
from nbdworker.backends.probes import NOWAIT_REFUSED, HoleCheckCost, ReadCost, filesystem_type

__all__ = ["FileBackend"]

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Cap on the descriptors one extents() call returns; the server caps the chunk again.
MAX_EXTENTS = 1 << 20
# Zeroes are written in pieces of this size when fallocate cannot do the job.
ZERO_CHUNK = 1 << 20

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_now = time.perf_counter_ns


def _load_fallocate():
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        func = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# Where `FileBackend.cached` reads its probe page. Only how many bytes came back counts, never
# what they are, so every backend and thread shares one page (one of 4 KiB per image was 40 MiB
# at 10,000 exports).
_PROBE = bytearray(4096)


class FileBackend(Backend):
    can_flush = True
    can_fua = True
    can_cache = True
    can_extents = True
    # One page cache behind every file descriptor of the same file, and fdatasync on any of
    # them flushes the file: connections are coherent.
    can_multi_conn = True

    def __init__(self, path: str, read_only: bool = False, fd: int | None = None) -> None:
        """Open `path`, or take `fd`, already opened there (an export's image is opened by
        nbdworker/imagefile.py, which proves where it lies); the backend owns it either way."""
        self.path = path
        self.read_only = read_only
        if fd is None:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            fd = os.open(path, flags)
        self.fd = fd
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if self.is_block:
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
            else:
                raise OSError(errno.EINVAL, f"{path} is neither a regular file nor a block device")
        except BaseException:
            os.close(self.fd)
            raise
        writable = not read_only
        self.can_trim = writable
        self.can_zero = writable
        self.can_fast_zero = writable
        # fallocate modes this file refused; remembered so we stop asking.
        self._punch_ok = True
        self._zero_range_ok = True
        self._seek_ok = True
        self._lock = threading.Lock()
        self._closed = False
        kind = "block device" if self.is_block else filesystem_type(fd)
        self.label = f"{path} ({kind})"  # for the log lines of its decisions
        self._holes = HoleCheckCost(self.label)
        # RWF_NOWAIT until the file refuses it; then reads go by what they cost (ReadCost).
        self._nowait = _RWF_NOWAIT is not None
        self._read_cost: ReadCost | None = None if self._nowait else ReadCost()
        self._sendfile_ok = True

    # -- reads --------------------------------------------------------------------------------

    def pread(self, buf: memoryview, offset: int) -> None:
        cost = self._read_cost
        start = _now() if cost is not None else 0
        done = 0
        want = len(buf)
        while done < want:
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short read: image shrank underneath the export")
            done += n
        if cost is not None:
            cost.took(_now() - start, want)

    def pread_nowait(self, buf: memoryview, offset: int) -> int:
        # RWF_NOWAIT reads only what is already in the page cache and fails with EAGAIN rather
        # than wait for the disk, so the event loop can serve hot data without a thread hop.
        if self._nowait:
            try:
                return os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
            except OSError as exc:
                if exc.errno not in NOWAIT_REFUSED:
                    return 0
                self._nowait_refused(exc)
        return self._read_measured(buf, offset)

    def _read_measured(self, buf: memoryview, offset: int) -> int:
        """Without RWF_NOWAIT: an ordinary read, inline while reads have been fast."""
        cost = self._read_cost
        if cost is None or not cost.inline():
            return 0
        start = _now()
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError:
            return 0  # the pool reads it again and answers the error
        cost.took(_now() - start, n)
        return n

    def _nowait_refused(self, exc: OSError) -> None:
        if self._nowait:
            self._nowait = False
            self._read_cost = ReadCost()
            log.info(
                "%s: RWF_NOWAIT refused (%s): reads go inline or to the pool by what they cost",
                self.label,
                exc.strerror or exc,
            )

    def read_bytes(self, offset: int, length: int) -> bytes:
        cost = self._read_cost
        start = _now() if cost is not None else 0
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            data = self._read_rest(data, offset, length)
        if cost is not None:
            cost.took(_now() - start, length)
        return data

    def _read_rest(self, data: bytes, offset: int, length: int) -> bytes:
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self.fd, length - got, offset + got)
            if not more:
                raise OSError(errno.EIO, "short read: image shrank underneath the export")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def cached(self, offset: int, length: int) -> bool:
        # Probe the last page of the range: readahead fills the cache front to back, so when
        # the tail is resident the rest almost always is too. A miss only costs a thread hop.
        probe = _PROBE
        start = max(offset, offset + length - len(probe))
        if self._nowait:
            try:
                return os.preadv(self.fd, [probe], start, _RWF_NOWAIT) > 0
            except OSError as exc:
                if exc.errno not in NOWAIT_REFUSED:
                    return False
                self._nowait_refused(exc)
        # Without RWF_NOWAIT the probe is an ordinary read of that page, timed: a page copied
        # from memory takes about a microsecond, one read from storage far more.
        cost = self._read_cost
        if cost is None or not cost.inline():
            return False
        began = _now()
        try:
            n = os.preadv(self.fd, [probe], start)
        except OSError:
            return False
        return cost.took(_now() - began, n) and n > 0

    @property
    def sendfile_fd(self) -> int | None:
        return self.fd if self._sendfile_ok else None

    def sendfile_refused(self, exc: OSError) -> None:
        if self._sendfile_ok:
            self._sendfile_ok = False
            log.info("%s: sendfile refused (%s): reads are sent from memory", self.label, exc)

    def fast_paths(self) -> dict[str, str]:
        return {
            "hole_check": "on" if self._holes.enabled and self._seek_ok else "off",
            "reads": "rwf_nowait" if self._read_cost is None else "measured",
            "sendfile": "on" if self._sendfile_ok else "off",
        }

    # -- writes -------------------------------------------------------------------------------

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        done = os.pwrite(self.fd, buf, offset)
        want = len(buf)
        while done < want:  # short writes are rare: only then pay for the slicing
            done += os.pwrite(self.fd, buf[done:], offset + done)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # TRIM is only a hint: when the file system cannot punch holes, doing nothing is correct.
        if self._punch_ok and length:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._punch_ok = False
        if fua:
            os.fdatasync(self.fd)

    def zero(
        self, offset: int, length: int, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        if length and not self._zero_fast(offset, length, may_trim):
            if fast:
                raise OSError(errno.ENOTSUP, "no fast way to zero this range")
            self._write_zeroes(offset, length)
        if fua:
            os.fdatasync(self.fd)

    def _zero_fast(self, offset: int, length: int, may_trim: bool) -> bool:
        # Without NO_HOLE a punched hole reads as zeroes and frees space; with it the range must
        # stay allocated, which ZERO_RANGE guarantees.
        if may_trim and self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._punch_ok = False
        if self._zero_range_ok:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._zero_range_ok = False
        return False

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.pwrite(zeroes[:n], offset)
            offset += n

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    # -- allocation ---------------------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        if offset >= end:
            return [(length, 0)] if length else []
        if not self._seek_ok:
            return [(end - offset, 0)]
        result: list[Extent] = []
        pos = offset
        try:
            while pos < end and len(result) < MAX_EXTENTS:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = self.size  # no data after pos: the rest is a hole
                if data > pos:
                    stop = min(data, end)
                    result.append((stop - pos, STATE_HOLE | STATE_ZERO))
                    pos = stop
                    continue
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                stop = min(hole, end)
                result.append((stop - pos, 0))
                pos = stop
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            # Block devices and some file systems cannot say; "allocated" is always safe.
            self._seek_ok = False
            return [(end - offset, 0)]
        return result

    def hole_check(self, offset: int, length: int) -> list[Extent] | None:
        holes = self._holes
        if not holes.enabled or not self._seek_ok:
            return None
        start = _now()
        extents = self.extents(offset, length)
        holes.took(_now() - start)
        return extents

    def size_changed(self) -> bool:
        # A block device's size is the device's; a file's is whatever a resize job made it.
        if self.is_block:
            return False
        try:
            return os.fstat(self.fd).st_size != self.size
        except OSError:
            return True

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
