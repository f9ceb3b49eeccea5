"""The serving thread: a plain connection in transmission, served by a thread of its own.

Blocking on its socket, the thread drives the same `RequestPump` the event loop drives for TLS
connections, and sends the replies through its own queue (`SocketSink` in sinks.py:
one writev per pass, sendfile for large reads). The GIL is released in every recv, pwrite,
sendfile and writev, so the connections of a multi-connection client copy on all CPUs at once,
as nbdkit's threads do (bench/README.md).

The event loop only asks the thread to stop (`stop`) and wakes it through an eventfd; thread-pool
jobs hand their results back the same way (`start`, the pump's `JobRunner`). When the thread
ends, `on_end(outcome)` runs on the event loop, which takes the transport back to close it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from nbdworker.connection.pump import JobFinish, RequestPump
from nbdworker.connection.sinks import WRITE_LOW_WATER, SocketSink, SocketWriter
from nbdworker.spin import IdleSpinner

__all__ = ["LINGER_SECONDS", "ServingThread", "unread_bytes"]

log = logging.getLogger("nbdworker.connection")

# A finished connection's replies must be out this long after it finished (here and in the
# event loop's lingering close, shell.py); a client that does not read them is cut.
LINGER_SECONDS = 5.0


def unread_bytes(fd: int) -> int:
    """Bytes waiting in the socket's receive queue (0 when that cannot be known)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


class ServingThread:
    def __init__(
        self,
        pump: RequestPump,
        writer: SocketWriter,
        pool: Executor,
        busy_poll_us: int,
        on_end: Callable[[str], None],
    ) -> None:
        self.pump = pump
        self.writer = writer
        self.pool = pool
        self.busy_poll_us = busy_poll_us
        self.on_end = on_end  # called from the thread: must hand over to the loop itself
        self.peer = pump.peer
        self.stop_requested = False
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.wake_lock = threading.Lock()
        self.jobs_done: deque = deque()  # (finish, future) of pool jobs the thread is to answer
        # From here on the replies go through the thread's queue and pool jobs come back to it.
        pump.set_sink(SocketSink(writer, self._writing_full))
        pump.jobs = self

    # -- called from the event loop (or a pool thread) --------------------------------------------

    def wake(self) -> None:
        with self.wake_lock:
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

    def stop(self) -> None:
        self.stop_requested = True
        self.wake()

    def release(self) -> None:
        """On the loop, once the thread has ended."""
        with self.wake_lock:
            # Under the lock: a pool thread finishing a job may be about to wake us.
            os.close(self.wake_fd)
            self.wake_fd = -1

    def start(self, func: Callable[..., Any], args: tuple, finish: JobFinish) -> None:
        """The pump's JobRunner while the thread serves: the thread answers the job."""

        def done(job: Future) -> None:
            self.jobs_done.append((finish, job))
            self.wake()

        self.pool.submit(func, *args).add_done_callback(done)

    # -- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        """Requests in, replies out, until the connection ends; then `on_end`."""
        outcome = "abort"
        try:
            outcome = self._serve()
        except Exception:
            log.exception("%s: internal error in the serving thread", self.peer)
        finally:
            # Before the transport closes the socket (the duplicate would keep it open).
            self.writer.close()
            self.on_end(outcome)

    def _serve(self) -> str:
        """The loop; returns "close" (graceful) or "abort"."""
        pump = self.pump
        writer = self.writer
        sock = writer.sock
        sock_fd = sock.fileno()
        poller = select.poll()
        poller.register(self.wake_fd, select.POLLIN)
        watched = 0  # the socket's events in the poller (0: not registered)
        spinner = IdleSpinner(self.busy_poll_us)
        if spinner.enabled:
            spinner.watch(sock_fd)
            spinner.watch(self.wake_fd)
        ending_by = 0.0  # the replies of a finished connection must be out by then

        def unread() -> int:
            return unread_bytes(sock_fd)

        while True:
            if self.stop_requested:
                return "abort"
            while self.jobs_done:
                finish, job = self.jobs_done.popleft()
                finish(job)
            if not pump.dispatch():
                return "abort"
            try:
                blocked = writer.send_queued()
            except OSError as exc:
                log.info("%s: sending failed: %s: dropping", self.peer, exc)
                return "abort"
            if pump.writing_paused and writer.pending <= WRITE_LOW_WATER:
                pump.writing_paused = False
                continue  # parse on
            # A client that closed its side must still read what it was answered.
            if pump.finished(unread) or (pump.eof and not pump.inflight):
                if not writer.pending:
                    return "close"
                if not ending_by:
                    ending_by = time.monotonic() + LINGER_SECONDS
                elif time.monotonic() >= ending_by:
                    log.info("%s: client does not read its replies: dropping", self.peer)
                    return "abort"
            reading = pump.may_read()
            want = (select.POLLIN if reading else 0) | (select.POLLOUT if blocked else 0)
            if want != watched:
                # Not registered at all when nothing is wanted: a hung-up socket would
                # otherwise report POLLHUP on every poll while jobs run.
                if not want:
                    poller.unregister(sock_fd)
                elif watched:
                    poller.modify(sock_fd, want)
                else:
                    poller.register(sock_fd, want)
                watched = want
            if reading and spinner.enabled and pump.waits_for_each_reply():
                # A client waiting for each reply (queue depth 1): see nbdworker/spin.py.
                spinner.spin()
            timeout = None
            if ending_by:
                timeout = max(0, int((ending_by - time.monotonic()) * 1000) + 1)
            for fd, _ in poller.poll(timeout):
                if fd == self.wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                elif reading:
                    buf = pump.buffer()
                    if not buf:
                        raise RuntimeError("receive buffer full while reading")
                    try:
                        n = sock.recv_into(buf)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.debug("%s: connection lost: %s", self.peer, exc)
                        return "abort"
                    if n:
                        pump.received(n)
                    else:
                        # EOF between requests without NBD_CMD_DISC is how fio and others
                        # hang up.
                        log.debug("%s: client closed the connection", self.peer)
                        pump.eof = True

    def _writing_full(self) -> None:
        self.pump.writing_paused = True
