"""A connection in transmission, as the event loop sees it.

Over TLS the whole transmission runs here: each pass over the received bytes drives the
`RequestPump` with the replies corked (sinks.py) and read replies cut into batches
(TLS_BATCH_BYTES). A plain connection's first pass runs here too, then it is handed to a
`ServingThread` (serving.py) and the loop only asks the thread to stop or wakes it. Either way
this class turns the pump's rules into transport calls: pause or resume reading, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from nbdworker.backends import Backend
from nbdworker.connection.host import ConnectionHost
from nbdworker.connection.pump import UNLIMITED, JobFinish, RequestPump
from nbdworker.connection.serving import ServingThread, unread_bytes
from nbdworker.connection.sinks import CorkedTLSSink, SocketWriter, TransportSink
from nbdworker.protocol import Ready
from nbdworker.session import SessionRecord

__all__ = ["LoopTransmission", "socket_fd", "unread_on"]

log = logging.getLogger("nbdworker.connection")

# Over TLS, uvloop encrypts each write at once into its outgoing memory BIO, copies that into a
# new bytes object and hands it to the socket only at the end of the loop iteration. After this
# many bytes of read replies the remaining requests wait for the next iteration (call_soon), so
# each batch goes out while it is still in cache (measurements: bench/README.md, "Over TLS").
TLS_BATCH_BYTES = 2 << 20


def socket_fd(transport: asyncio.BaseTransport | None) -> int:
    sock = transport.get_extra_info("socket") if transport is not None else None
    try:
        return sock.fileno() if sock is not None else -1
    except (AttributeError, OSError):
        return -1


def unread_on(transport: asyncio.BaseTransport | None) -> int:
    """Bytes waiting in the transport's socket (0 when that cannot be known)."""
    fd = socket_fd(transport)
    return unread_bytes(fd) if fd >= 0 else 0


class Connection(Protocol):
    """What the transmission asks of its connection (shell.py)."""

    transport: asyncio.Transport | None

    def in_transmission(self) -> bool: ...

    def take_socket(self) -> int: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def request_spin(self) -> None: ...


class LoopTransmission:
    def __init__(
        self,
        conn: Connection,
        host: ConnectionHost,
        record: SessionRecord,
        ready: Ready,
        backend: Backend,
        max_inflight: int,
        tls: bool,
    ) -> None:
        self.conn = conn
        self.host = host
        self.record = record
        self.loop = asyncio.get_running_loop()
        self.peer = record.peer
        transport = conn.transport
        assert transport is not None
        self.transport = transport
        self.tls = tls
        self.sink = CorkedTLSSink(transport) if tls else TransportSink(transport)
        # This object is the pump's JobRunner while the loop serves it (start()).
        self.pump = RequestPump(ready, backend, record, max_inflight, self.sink, self, tls)
        self.tls_later = False  # the next TLS batch is scheduled (_tls_continue)
        if tls:
            self.pump.budget = TLS_BATCH_BYTES
            self.pump.on_budget_spent = self._budget_spent
        self.hand_off = not tls  # a plain connection not yet handed to its serving thread
        self.serving: ServingThread | None = None  # set while a serving thread has it
        self.start_timer: asyncio.TimerHandle | None = None  # see _start_serving
        self.reading_paused = False
        self.on_done: Callable[[], None] | None = None  # see when_done

    # -- what the connection passes on ----------------------------------------------------------

    def received(self, nbytes: int) -> None:
        self.pump.received(nbytes)
        if self.tls:
            self._process_corked()
        else:
            self.process()

    def eof_received(self) -> None:
        # EOF between requests without NBD_CMD_DISC is how fio and others hang up.
        log.debug("%s: client closed the connection", self.peer)
        self.pump.eof = True
        if self.tls:
            # Answer everything now: the TLS layer stops taking writes once it has seen
            # close_notify and flushed, so a batch deferred to the next iteration would be lost.
            self.pump.budget = UNLIMITED
        self.process()

    def pause_writing(self) -> None:
        if self.serving is not None:
            return  # see resume_writing
        self.pump.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        if self.serving is not None:
            # A late call from the transport (its last write completed after the hand-over):
            # the serving thread owns the pump and its own queue decides (serving.py); a
            # dispatch here would race with the thread's.
            return
        self.pump.writing_paused = False
        self._update_reading()
        if self.conn.in_transmission():
            self.process()

    def shutdown(self) -> None:
        self.record.ending = True
        self.pump.start_shutdown()
        if self.serving is not None:
            self.serving.wake()
            return
        self.process()
        self._maybe_close()

    def stop_thread(self) -> bool:
        """Ask a serving thread to end (the loop aborts the transport then); False if none."""
        if self.serving is None:
            return False
        self.serving.stop()
        return True

    def lost(self) -> None:
        if self.start_timer is not None:
            self.start_timer.cancel()
            self.start_timer = None
        self.pump.stopped = True
        if self.serving is not None:
            self.serving.stop()  # the thread closes its writer

    def when_done(self, callback: Callable[[], None]) -> None:
        """After `lost`: `callback()` on the loop once nothing of this connection touches its
        backend any more (its serving thread has ended and none of its pool jobs runs)."""
        self.on_done = callback
        loop = self.loop

        def idle() -> None:  # in a pool thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to close
                loop.call_soon_threadsafe(self._check_done)

        self.pump.on_pool_idle = idle
        self._check_done()

    def _check_done(self) -> None:
        if self.on_done is None or self.serving is not None:
            return
        with self.pump.pool_lock:
            if self.pump.pool_running:
                return
        callback, self.on_done = self.on_done, None
        callback()

    # -- passes on the loop ---------------------------------------------------------------------

    def process(self) -> None:
        """On the event loop (TLS connections, and a plain connection's first requests):
        dispatch every complete request in the buffer, unless paused."""
        pump = self.pump
        if not pump.dispatch():
            self.conn.abort()
            return
        self._update_reading()
        self._maybe_close()
        if self.hand_off:
            self._hand_off()
        elif pump.waits_for_each_reply() and not self.tls_later:
            # Clients that pipeline keep the process busy anyway, and a spin would only take
            # CPU from them.
            self.conn.request_spin()

    def _process_corked(self) -> None:
        # Over TLS the replies of one pass go out as one write (sinks.CorkedTLSSink).
        sink = self.sink
        assert isinstance(sink, CorkedTLSSink)
        sink.cork()
        try:
            self.process()
        finally:
            sink.uncork()

    def _budget_spent(self) -> None:
        if not self.tls_later:
            self.tls_later = True
            self.loop.call_soon(self._tls_continue)

    def _tls_continue(self) -> None:
        """The next batch of a TLS connection's requests (see TLS_BATCH_BYTES)."""
        self.tls_later = False
        self.pump.budget = TLS_BATCH_BYTES if not self.pump.eof else UNLIMITED  # see eof_received
        if self.conn.in_transmission():
            self._process_corked()

    def start(self, func: Callable[..., Any], args: tuple, finish: JobFinish) -> None:
        """The pump's JobRunner on the loop: the loop answers the job."""
        job = self.loop.run_in_executor(self.host.executor, func, *args)
        job.add_done_callback(lambda f: self._job_done(finish, f))

    def _job_done(self, finish: JobFinish, job: Future) -> None:
        finish(job)
        if self.reading_paused or self.record.ending or self.pump.eof:
            self.process()
        elif self.hand_off:
            self._hand_off()
        elif not self.pump.inflight:
            self.conn.request_spin()
        self._maybe_close()

    def _update_reading(self) -> None:
        if self.serving is not None or not self.conn.in_transmission():
            return
        want_pause = not self.pump.may_read()
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self.tls_later or self.serving is not None or not self.conn.in_transmission():
            return  # a serving thread decides for itself (serving.py)
        if self.pump.finished(lambda: unread_on(self.transport)):
            self.conn.close()

    # -- handing a plain connection to its serving thread ---------------------------------------

    def _hand_off(self) -> None:
        """After a pass on the loop, hand a plain connection to a serving thread of its own.

        Its first requests are served on the loop (the replies through the transport), so a
        client that only connects and disconnects (nbdinfo --size, libnbd's connect latency)
        never costs the thread wake-ups (bench/README.md).
        """
        if not self._may_hand_off():
            return
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._start_serving()

    def _may_hand_off(self) -> bool:
        # Pool jobs started on the loop answer on the loop: none may be left for the thread to
        # race with. A connection that is ending ends on the loop.
        pump = self.pump
        return (
            self.hand_off
            and self.start_timer is None
            and self.conn.in_transmission()
            and not (pump.inflight or pump.disconnecting or pump.eof or self.record.ending)
        )

    def _start_serving(self) -> None:
        self.start_timer = None
        if not self._may_hand_off():
            self._update_reading()
            return
        if self.transport.get_write_buffer_size():
            # Replies are still in the transport: nothing may overtake them.
            self.start_timer = self.loop.call_later(0.001, self._start_serving)
            return
        if not self.reading_paused:
            # Resumed while the transport drained (resume_writing): the thread alone may read
            # the socket from here on, or a request read by the transport would be answered into
            # the thread's queue with no one to wake it.
            self.reading_paused = True
            self.transport.pause_reading()
        sock_fd = self.conn.take_socket()
        if sock_fd < 0:
            # No socket to hand over (a stand-in transport): served on the loop, the replies
            # through the transport.
            self.hand_off = False
            self._update_reading()
            return
        peername = self.record.peername
        if not isinstance(peername, tuple):
            family = socket.AF_UNIX
        else:
            family = socket.AF_INET6 if ":" in peername[0] else socket.AF_INET
        writer = SocketWriter(sock_fd, family)
        self.hand_off = False
        self.serving = ServingThread(
            self.pump, writer, self.host.executor, self.host.settings.busy_poll_us, self._ended
        )
        try:
            self.host.serving_threads.submit(self.serving.run)
        except RuntimeError:  # the pool is shut down: the server is stopping
            writer.close()
            self._thread_finished("abort")

    def _ended(self, outcome: str) -> None:
        # In the serving thread, its last act.
        with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to hand back
            self.loop.call_soon_threadsafe(self._thread_finished, outcome)

    def _thread_finished(self, outcome: str) -> None:
        """On the loop: the serving thread has ended; the transport is ours again."""
        serving = self.serving
        assert serving is not None
        self.serving = None
        serving.release()
        self._check_done()
        if not self.conn.in_transmission():
            return
        if outcome == "abort" or serving.stop_requested:
            self.conn.abort()
        else:
            self.conn.close()
