"""The reply queue of a plain (non-TLS) connection in transmission, sent by the connection's
serving thread, so large reads can always go out with `os.sendfile`.

Why not the transport: bytes written with `os.sendfile` must not overtake bytes the transport
still holds, so sendfile was only possible while the transport's buffer was empty. With a
pipelined client the socket is full most of the time, and 83% of nbdcopy's 256 KiB reads
went through `pread` + `writev` (two copies through Python) instead. Here every reply, small
or large, waits in one queue in order: bytes go out with `writev` (a whole batch of replies in
one call) and file ranges with `sendfile`, straight from the page cache.

The serving thread receives and sends on a duplicate of the socket's descriptor while the
event loop's transport, paused, keeps the original (it takes the connection back to close it).
The duplicate keeps the socket open, so the owner must `close()` this writer before the
transport closes the socket (or the FIN would wait for the duplicate).
"""

from __future__ import annotations

import os
import socket
from collections import deque

__all__ = ["FileRange", "SocketWriter"]

# writev takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024
_MSG_MORE = getattr(socket, "MSG_MORE", 0)


class FileRange:
    """`length` bytes of the file `fd` from `offset`, to be sent with sendfile."""

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


class SocketWriter:
    """An ordered queue of replies (bytes-like objects and `FileRange`s) for one socket.

    `write` and `write_file` only queue; `send_queued` sends what the socket takes now. The
    serving thread that owns the writer waits for writability itself (nbdworker/connection.py).
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

    def write_file(self, fd: int, offset: int, length: int) -> None:
        if self._closed or length <= 0:
            return
        self._queue.append(FileRange(fd, offset, length))
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
