"""What each NBD command does to the backend, and the reply it gets.

`RequestPump` (pump.py) parses and validates a request, then runs plain WRITEs and DISC itself
and hands READ to `Commands.read` and everything else to `Commands.execute`. A new command is
added here (and in the protocol's `Session.check`, nbdworker/protocol/transmission.py, which
decides what is allowed). Blocking calls (FLUSH, FUA, TRIM, zeroing, cache, block status, cold
reads) go to the thread pool through `in_pool`; page-cache reads are answered inline.
"""

from __future__ import annotations

import errno as host_errno
import logging
from collections.abc import Callable
from typing import Any

from nbdworker.backends import STATE_HOLE, STATE_ZERO, Backend, Extent
from nbdworker.connection.sinks import ReplySink
from nbdworker.protocol import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    Command,
    Errno,
    Ready,
    Request,
    encode_block_status,
    encode_error,
    encode_hole_chunk,
    encode_none_chunk,
    encode_read_data_header,
    encode_read_data_header_into,
    encode_simple_reply,
    errno_from_oserror,
    read_data_header_size,
)
from nbdworker.session import SessionRecord

__all__ = ["Commands", "InPool"]

log = logging.getLogger("nbdworker.connection")

# Structured reads at least this long are checked for holes (two lseeks): below it a hole
# chunk saves nothing worth the syscalls.
SPARSE_READ_MIN = 64 * 1024
# Block status: at most this many descriptors per chunk (spec: SHOULD be <= 2**20), each
# below 2**32 and kept 512-aligned.
MAX_DESCRIPTORS = 1 << 20
MAX_EXTENT = 0xFFFFFFFF & ~511
# Reads up to this size go through preadv(RWF_NOWAIT) into one reply buffer; larger ones
# through os.pread (see read).
SMALL_READ = 64 * 1024

# in_pool(req, func, *args, result=None): run func(*args) in the thread pool; when it ends,
# result(req, value) answers (None: a simple OK reply), or its OSError is the error reply.
InPool = Callable[..., None]


class Commands:
    """The commands of one connection in transmission, against its export's backend."""

    def __init__(
        self,
        ready: Ready,
        backend: Backend,
        record: SessionRecord,
        sink: ReplySink,
        in_pool: InPool,
        spend: Callable[[int], None] | None,
    ) -> None:
        self.backend = backend
        self.structured = ready.structured
        self.read_hlen = read_data_header_size(self.structured)  # header before READ data
        self.context_id = next(iter(ready.meta_contexts), 0)
        self.peer = record.peer
        self.errors = record.errors
        self.sink = sink  # replaced when a serving thread takes the connection over
        self.in_pool = in_pool
        # Over TLS, read-reply bytes are counted against the pass's budget (sinks.py).
        self.spend = spend

    # -- every command but READ and plain WRITE ---------------------------------------------------

    def execute(self, req: Request, data: memoryview) -> None:
        cmd = req.command
        backend = self.backend
        in_pool = self.in_pool
        if cmd == CMD_WRITE:  # with FUA
            # The payload lives in the receive buffer, which is reused as soon as we return:
            # the thread gets a copy.
            in_pool(req, backend.pwrite, bytes(data), req.offset, True)
        elif cmd == CMD_FLUSH:
            in_pool(req, backend.flush)
        elif cmd == CMD_TRIM:
            in_pool(req, backend.trim, req.offset, req.length, bool(req.flags & FLAG_FUA))
        elif cmd == CMD_WRITE_ZEROES:
            in_pool(
                req,
                backend.zero,
                req.offset,
                req.length,
                not req.flags & FLAG_NO_HOLE,
                bool(req.flags & FLAG_FAST_ZERO),
                bool(req.flags & FLAG_FUA),
            )
        elif cmd == CMD_CACHE:
            in_pool(req, backend.cache, req.offset, req.length)
        elif cmd == CMD_BLOCK_STATUS:
            in_pool(req, backend.extents, req.offset, req.length, result=self._block_status)
        else:  # Session.check refuses everything else; keep the stream alive regardless
            self.reply_error(req, Errno.EINVAL, "unsupported command")

    def _block_status(self, req: Request, extents: list[Extent]) -> None:
        out: list[tuple[int, int]] = []
        for length, flags in extents:
            if length <= 0:
                continue
            if length > MAX_EXTENT:
                # A compact descriptor holds < 4 GiB: answer the aligned first part and stop
                # there (the client asks again from the end), rather than repeat the status.
                out.append((MAX_EXTENT, flags))
                break
            out.append((length, flags))
            if len(out) >= MAX_DESCRIPTORS:
                break
        if not out:
            out = [(min(req.length, MAX_EXTENT), 0)]
        if req.flags & FLAG_REQ_ONE:
            out = [(min(out[0][0], req.length), out[0][1])]
        self.sink.write(encode_block_status(req.cookie, self.context_id, out))

    # -- READ -------------------------------------------------------------------------------------

    def read(self, req: Request) -> None:
        length = req.length
        sink = self.sink
        if length == 0:
            sink.write(
                encode_none_chunk(req.cookie)
                if self.structured
                else encode_simple_reply(req.cookie)
            )
            return
        backend = self.backend
        if self.structured and length >= SPARSE_READ_MIN and not req.flags & FLAG_DF:
            try:
                extents = backend.hole_check(req.offset, length)
            except OSError:
                extents = None
            if extents and (len(extents) > 1 or extents[0][1] & STATE_HOLE):
                self.in_pool(req, self._sparse_read, req, extents, result=self._send_reply)
                return
        if self.spend is not None:
            self.spend(length)
        offset = req.offset
        if length > SMALL_READ:
            header = encode_read_data_header(req.cookie, offset, length, self.structured)
            # Large reads: `os.pread` returns a new bytes object without zero-filling it first,
            # and `writelines` sends header and data with one writev (uvloop). Measured with
            # nbdcopy this used a quarter less CPU than preadv into a fresh bytearray. The
            # page-cache probe keeps cold reads off the event loop.
            if backend.cached(offset, length):
                fd = backend.sendfile_fd
                if fd is not None and sink.sends_files:
                    # Straight from the page cache to the socket: the two copies of pread +
                    # send were ~60% of the worker's CPU on nbdcopy reads.
                    sink.write_file(header, fd, offset, length, backend.sendfile_refused)
                    return
                sink.write_lines([header, backend.read_bytes(offset, length)])
            else:
                self.in_pool(req, self._read_job, header, offset, length, result=self._send_lines)
            return
        # Small reads: header and data in one new buffer, the header packed in place.
        buf = bytearray(self.read_hlen + length)
        hlen = encode_read_data_header_into(buf, req.cookie, offset, length, self.structured)
        view = memoryview(buf)[hlen:]
        got = backend.pread_nowait(view, offset)
        if got == length:
            sink.write(buf)
            return
        self.in_pool(req, self._finish_read, buf, view, offset, got, result=self._send_reply)

    def _read_job(self, header: bytes, offset: int, length: int) -> list[bytes]:
        # Runs in a worker thread: the data may have to come from the disk.
        return [header, self.backend.read_bytes(offset, length)]

    def _finish_read(self, buf: bytearray, view: memoryview, offset: int, got: int) -> bytearray:
        # Runs in a worker thread: the page cache did not have all of it.
        self.backend.pread(view[got:], offset + got)
        return buf

    def _sparse_read(self, req: Request, extents: list[Extent]) -> bytes:
        # Runs in a worker thread. One chunk per extent: OFFSET_HOLE for ranges that read as
        # zeroes, OFFSET_DATA otherwise; all sent in one write, the last one flagged DONE.
        pieces: list[tuple[int, int, bool]] = []
        pos, end = req.offset, req.offset + req.length
        for length, flags in extents:
            if pos >= end:
                break
            n = min(length, end - pos)
            hole = bool(flags & STATE_ZERO)
            if pieces and pieces[-1][2] == hole:
                last = pieces.pop()
                pieces.append((last[0], last[1] + n, hole))
            else:
                pieces.append((pos, n, hole))
            pos += n
        if pos < end:
            pieces.append((pos, end - pos, False))
        out = []
        last = len(pieces) - 1
        for i, (off, n, hole) in enumerate(pieces):
            if hole:
                out.append(encode_hole_chunk(req.cookie, off, n, i == last))
            else:
                out.append(encode_read_data_header(req.cookie, off, n, True, i == last))
                data = bytearray(n)
                self.backend.pread(memoryview(data), off)
                out.append(data)
        return b"".join(out)

    def _send_reply(self, req: Request, reply: Any) -> None:
        self.sink.write(reply)

    def _send_lines(self, req: Request, lines: list[bytes]) -> None:
        self.sink.write_lines(lines)

    # -- replies ----------------------------------------------------------------------------------

    def reply_ok(self, req: Request) -> None:
        self.sink.write(encode_simple_reply(req.cookie))

    def reply_oserror(self, req: Request, exc: OSError) -> None:
        nbd_errno = errno_from_oserror(exc)
        if exc.errno == host_errno.ENOTSUP and req.flags & FLAG_FAST_ZERO:
            nbd_errno = Errno.ENOTSUP
        log.info(
            "%s: %s at %d+%d failed: %s",
            self.peer,
            Command(req.command),
            req.offset,
            req.length,
            exc,
        )
        self.reply_error(req, nbd_errno, exc.strerror or str(exc))

    def reply_error(self, req: Request, error: int, message: str) -> None:
        self.errors[error] = self.errors.get(error, 0) + 1
        # With structured replies an error chunk carries the message (and READ must use one).
        self.sink.write(encode_error(req.cookie, error, message[:1024], structured=self.structured))
