"""The backend interface the transmission loop calls.

Methods are synchronous and may block; the server decides whether to call them on the event
loop or in a worker thread. Failures are `OSError`s carrying the host errno: the server maps
them to NBD errors (`errno_from_oserror`) and logs the real cause.
"""

from __future__ import annotations

import errno

__all__ = ["STATE_HOLE", "STATE_ZERO", "Backend", "Extent"]

# base:allocation bits; duplicated from the protocol constants so backends do not depend on the
# wire package.
STATE_HOLE = 0x1
STATE_ZERO = 0x2

Extent = tuple[int, int]  # (length, base:allocation flags)


class Backend:
    """Base class: a read-only, non-sparse device of size 0 that supports nothing optional."""

    size: int = 0
    read_only: bool = True
    can_flush: bool = False
    can_fua: bool = False
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_extents: bool = False
    # True when every connection sees one coherent store (no per-connection cache), so
    # CAN_MULTI_CONN may be advertised.
    can_multi_conn: bool = False
    # A descriptor whose bytes at an offset are the export's at that offset, so replies can
    # be sent from it with `os.sendfile`; None when there is none (a RAM disk).
    sendfile_fd: int | None = None

    def pread(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` from `offset`; a short read past the end is an error."""
        raise NotImplementedError

    def pread_nowait(self, buf: memoryview, offset: int) -> int:
        """Read without blocking on storage, as far as possible; return the bytes read.

        The server calls this on the event loop and finishes in a thread when it returns less
        than `len(buf)`. The default never reads inline.
        """
        return 0

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at `offset` into a new bytes object."""
        buf = bytearray(length)
        self.pread(memoryview(buf), offset)
        return bytes(buf)

    def cached(self, offset: int, length: int) -> bool:
        """A cheap guess whether reading the range would not wait for storage."""
        return False

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "read-only backend")

    def flush(self) -> None:
        return None

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        return None

    def zero(
        self, offset: int, length: int, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        """Make the range read as zeroes.

        `may_trim` False (NBD NO_HOLE) keeps the range allocated. `fast` True means fail with
        ENOTSUP instead of doing anything slower than a metadata operation.
        """
        raise OSError(errno.EOPNOTSUPP, "zero not supported")

    def cache(self, offset: int, length: int) -> None:
        return None

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation status of `[offset, offset+length)`, starting exactly at `offset`.

        May describe less than `length` (the client re-asks) but never nothing, and may run
        past `length` only if that is free. The default says "allocated, contents unknown".
        """
        return [(length, 0)]

    def hole_check(self, offset: int, length: int) -> list[Extent] | None:
        """The extents a structured read of the range is checked against for holes, or None
        when checking is not worth it here (a backend that measured it slow); may raise
        OSError."""
        return self.extents(offset, length) if self.can_extents else None

    def sendfile_refused(self, exc: OSError) -> None:
        """`os.sendfile` from `sendfile_fd` failed as unsupported: stop offering it."""

    def fast_paths(self) -> dict[str, str]:
        """What the backend decided about its optional fast paths, {path: state} (metrics:
        `nbdworker_export_fast_path`): hole_check on|off, reads rwf_nowait|measured, sendfile
        on|off. The reasons are in the log."""
        return {}

    def size_changed(self) -> bool:
        """Whether the storage no longer has the size it was opened with (a resize job): the
        server then opens it again for new connections, live ones keep theirs."""
        return False

    def close(self) -> None:
        return None
