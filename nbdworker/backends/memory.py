"""A RAM disk for tests and labs: a sparse dict of pages, so a large export costs only what
has been written to it."""

from __future__ import annotations

import errno
import threading

from nbdworker.backends.base import STATE_HOLE, STATE_ZERO, Backend, Extent

__all__ = ["PAGE_SIZE", "MemoryBackend"]

PAGE_SIZE = 65536


class MemoryBackend(Backend):
    can_flush = True
    can_fua = True
    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_cache = True
    can_extents = True
    can_multi_conn = True

    def __init__(self, size: int, read_only: bool = False) -> None:
        self.size = size
        self.read_only = read_only
        if read_only:
            self.can_trim = self.can_zero = self.can_fast_zero = False
        self._pages: dict[int, bytearray] = {}
        # Reads and writes may run in worker threads and a request can span pages.
        self._lock = threading.Lock()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, "range outside the export")

    def pread(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        pos = 0
        with self._lock:
            while pos < len(buf):
                page_no, in_page = divmod(offset + pos, PAGE_SIZE)
                n = min(PAGE_SIZE - in_page, len(buf) - pos)
                page = self._pages.get(page_no)
                if page is None:
                    buf[pos : pos + n] = bytes(n)
                else:
                    buf[pos : pos + n] = page[in_page : in_page + n]
                pos += n

    def pread_nowait(self, buf: memoryview, offset: int) -> int:
        self.pread(buf, offset)
        return len(buf)

    def cached(self, offset: int, length: int) -> bool:
        return True

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only export")
        self._check(offset, len(buf))
        pos = 0
        with self._lock:
            while pos < len(buf):
                page_no, in_page = divmod(offset + pos, PAGE_SIZE)
                n = min(PAGE_SIZE - in_page, len(buf) - pos)
                page = self._pages.get(page_no)
                if page is None:
                    page = self._pages[page_no] = bytearray(PAGE_SIZE)
                page[in_page : in_page + n] = buf[pos : pos + n]
                pos += n

    def _discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        end = offset + length
        with self._lock:
            pos = offset
            while pos < end:
                page_no, in_page = divmod(pos, PAGE_SIZE)
                n = min(PAGE_SIZE - in_page, end - pos)
                page = self._pages.get(page_no)
                if page is not None:
                    if n == PAGE_SIZE:
                        del self._pages[page_no]
                    else:
                        page[in_page : in_page + n] = bytes(n)
                pos += n

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only export")
        self._discard(offset, length)

    def zero(
        self, offset: int, length: int, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only export")
        # Memory has no allocation to preserve: NO_HOLE is satisfied by zero-filled pages that
        # are dropped, since a later write simply allocates again and cannot fail for space.
        self._discard(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        result: list[Extent] = []
        pos = offset
        with self._lock:
            while pos < end:
                page_no, in_page = divmod(pos, PAGE_SIZE)
                n = min(PAGE_SIZE - in_page, end - pos)
                flags = 0 if page_no in self._pages else STATE_HOLE | STATE_ZERO
                if result and result[-1][1] == flags:
                    result[-1] = (result[-1][0] + n, flags)
                else:
                    result.append((n, flags))
                pos += n
        return result or [(length, 0)]

    def close(self) -> None:
        self._pages.clear()
