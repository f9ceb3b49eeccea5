"""Where a connection's replies go: one small class per way of sending.

* `TransportSink`: the event loop's transport (the handshake, and a plain connection's first
  requests before its serving thread takes over);
* `CorkedTLSSink`: the TLS transport, with the replies of one pass over the receive buffer held
  back and written together;
* `SocketSink`: the serving thread's own ordered queue on the socket (`SocketWriter`), which can
  also send file ranges with `sendfile`.

Each is complete replies in, in any order between replies (NBD matches them by cookie). A sink
tells its owner when too much is unsent through `on_full` (the pump stops dispatching).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections import deque
from collections.abc import Callable

__all__ = [
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "CorkedTLSSink",
    "FileRange",
    "ReplySink",
    "SocketSink",
    "SocketWriter",
    "TransportSink",
]

# The transport stops our reading at this many buffered reply bytes: deep enough for nbdcopy's
# 64 x 256 KiB in flight, bounded per connection. The serving thread uses the same marks.
WRITE_HIGH_WATER = 16 << 20
WRITE_LOW_WATER = 4 << 20
# Over TLS, replies produced while handling one batch of received requests are written together
# (every transport write is a TLS record and a send()): 4 KiB random reads at queue depth 16 gain
# about 15%. Past this many bytes the batch is written at once, so the transport's high-water
# mark still stops the parsing loop.
TLS_CORK_LIMIT = 256 * 1024


class ReplySink:
    """The interface: `write` one reply (bytes-like), `write_lines` one reply in pieces,
    `write_file` a reply header and `length` bytes of the file `fd` (only if `sends_files`)."""

    sends_files = False

    def write(self, data) -> None:
        raise NotImplementedError

    def write_lines(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    def write_file(
        self,
        header: bytes,
        fd: int,
        offset: int,
        length: int,
        refused: Callable[[OSError], None] | None = None,
    ) -> None:
        """`refused(exc)` is told when `fd` turns out not to support sendfile (the range is
        then read and sent from memory)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Write what is held back now (before a close)."""


class TransportSink(ReplySink):
    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    def write(self, data) -> None:
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def write_lines(self, lines: list[bytes]) -> None:
        if not self.transport.is_closing():
            self.transport.writelines(lines)


class CorkedTLSSink(TransportSink):
    """Between `cork()` and `uncork()` replies are collected and written as one TLS write."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        super().__init__(transport)
        self.held: list | None = None  # None: not corked
        self.held_bytes = 0

    def cork(self) -> None:
        self.held = []

    def uncork(self) -> None:
        self.flush()
        self.held = None

    def write(self, data) -> None:
        held = self.held
        if held is None or not data:
            TransportSink.write(self, data)
            return
        held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes >= TLS_CORK_LIMIT:
            self.flush()

    def flush(self) -> None:
        out = self.held
        if not out:
            return
        self.held = []
        self.held_bytes = 0
        TransportSink.write(self, out[0] if len(out) == 1 else b"".join(out))


class SocketSink(ReplySink):
    """The serving thread's queue; `on_full` is called past WRITE_HIGH_WATER unsent bytes."""

    sends_files = True

    def __init__(self, writer: SocketWriter, on_full: Callable[[], None]) -> None:
        self.writer = writer
        self.on_full = on_full

    def write(self, data) -> None:
        writer = self.writer
        # Queued; the serving thread sends each pass's replies with one writev.
        writer.write(data)
        if writer.pending > WRITE_HIGH_WATER:
            self.on_full()

    def write_lines(self, lines: list[bytes]) -> None:
        for data in lines:
            self.write(data)

    def write_file(
        self,
        header: bytes,
        fd: int,
        offset: int,
        length: int,
        refused: Callable[[OSError], None] | None = None,
    ) -> None:
        writer = self.writer
        writer.write(header)
        writer.write_file(fd, offset, length, refused)
        if writer.pending > WRITE_HIGH_WATER:
            self.on_full()


# -- the serving thread's queue ------------------------------------------------------------------
# The reply queue of a plain (non-TLS) connection in transmission, sent by the connection's
# serving thread, so large reads can always go out with `os.sendfile`.
#
# Why not the transport: bytes written with `os.sendfile` must not overtake bytes the transport
# still holds, so sendfile was only possible while the transport's buffer was empty. With a
# pipelined client the socket is full most of the time, and 83% of nbdcopy's 256 KiB reads
# went through `pread` + `writev` (two copies through Python) instead. Here every reply, small
# or large, waits in one queue in order: bytes go out with `writev` (a whole batch of replies in
# one call) and file ranges with `sendfile`, straight from the page cache.
#
# The serving thread receives and sends on a duplicate of the socket's descriptor while the
# event loop's transport, paused, keeps the original (it takes the connection back to close it).
# The duplicate keeps the socket open, so the owner must `close()` this writer before the
# transport closes the socket (or the FIN would wait for the duplicate).

# writev takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024
_MSG_MORE = getattr(socket, "MSG_MORE", 0)


# sendfile's answer when the file cannot be sent that way (its filesystem has no splice_read).
_SENDFILE_REFUSED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


class FileRange:
    """`length` bytes of the file `fd` from `offset`, to be sent with sendfile; `refused(exc)`
    is told if the file cannot be."""

    __slots__ = ("fd", "length", "offset", "refused")

    def __init__(
        self, fd: int, offset: int, length: int, refused: Callable[[OSError], None] | None
    ) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length
        self.refused = refused

    def __len__(self) -> int:
        return self.length


class SocketWriter:
    """An ordered queue of replies (bytes-like objects and `FileRange`s) for one socket.

    `write` and `write_file` only queue; `send_queued` sends what the socket takes now. The
    serving thread that owns the writer waits for writability itself (serving.py).
    After an error the queue is useless (the reply stream cannot continue after a partial
    reply): the owner drops the connection.
    """

    def __init__(self, sock_fd: int, family: int | None = None) -> None:
        # A socket object for recv_into and sendmsg's flags; it owns the duplicate descriptor.
        # Given the family, Python skips the three syscalls that would detect it (a share of
        # connect time).
        dup = os.dup(sock_fd)
        if family is None:
            self.sock = socket.socket(fileno=dup)
        else:
            self.sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=dup)
        self._fd = self.sock.fileno()
        self._queue: deque = deque()
        self.pending = 0  # bytes queued, file ranges included
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data) -> None:
        if self._closed or not data:
            return
        self._queue.append(data)
        self.pending += len(data)

    def write_file(
        self,
        fd: int,
        offset: int,
        length: int,
        refused: Callable[[OSError], None] | None = None,
    ) -> None:
        if self._closed or length <= 0:
            return
        self._queue.append(FileRange(fd, offset, length, refused))
        self.pending += length

    def close(self) -> None:
        """Drop whatever is queued and release the duplicate descriptor."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self.pending = 0
        self.sock.close()

    def send_queued(self) -> bool:
        """Write from the head of the queue until it is empty (False) or the socket is full
        (True); raises OSError."""
        queue = self._queue
        fd = self._fd
        while queue:
            head = queue[0]
            if type(head) is FileRange:
                try:
                    n = os.sendfile(fd, head.fd, head.offset, head.length)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    if exc.errno not in _SENDFILE_REFUSED:
                        raise
                    queue[0] = _read_range(head)
                    if head.refused is not None:
                        head.refused(exc)
                    continue
                if n == 0:
                    # The file ended early (the image shrank underneath the export): the reply
                    # header is already out, so the stream cannot be completed.
                    raise OSError(5, "image shorter than the read being sent")
                self.pending -= n
                if n < head.length:
                    head.offset += n
                    head.length -= n
                    return True
                queue.popleft()
                continue
            iov = []
            more = False
            for item in queue:
                if type(item) is FileRange:
                    more = True
                    break
                if len(iov) == _IOV_MAX:
                    break
                iov.append(item)
            try:
                # MSG_MORE before a sendfile: the reply header leaves in the same segment as
                # the data rather than as a tiny packet of its own.
                n = self.sock.sendmsg(iov, (), _MSG_MORE) if more else os.writev(fd, iov)
            except BlockingIOError:
                return True
            self.pending -= n
            for item in iov:
                size = len(item)
                if n >= size:
                    n -= size
                    queue.popleft()
                else:
                    queue[0] = memoryview(item)[n:]
                    return True
        return False


def _read_range(head: FileRange) -> bytes:
    """The bytes of a range that sendfile refused; raises OSError."""
    parts = []
    offset, left = head.offset, head.length
    while left:
        data = os.pread(head.fd, left, offset)
        if not data:
            raise OSError(errno.EIO, "image shorter than the read being sent")
        parts.append(data)
        offset += len(data)
        left -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
