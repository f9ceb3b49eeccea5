"""The request pump: one connection's transmission phase, with no asyncio and no threads.

Bytes in (`buffer` / `received`), replies out (a sink, sinks.py), backend calls in between.
The pump owns the receive buffer, the streaming of WRITE payloads that do not fit in it, the
accounting of requests in the thread pool, and the two rules everything else asks:

* `may_read()`: whether more requests may be read now;
* `finished()`: whether the connection has nothing left to do but send what it has replied.

The event loop (shell.py) and a serving thread (serving.py) both drive the same pump; they
differ only in how they wait, which sink takes the replies and which `JobRunner` runs pool jobs.

Requests are parsed straight out of the one buffer and dispatched as soon as they are complete;
replies are written as each request finishes, so many requests are in flight while earlier
replies are still queued. Reading stops when `max_inflight_per_connection` requests (or
MAX_INFLIGHT_BYTES) wait on the pool, or the sink has too much unsent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from nbdworker.backends import Backend
from nbdworker.connection.commands import Commands
from nbdworker.connection.sinks import ReplySink
from nbdworker.protocol import (
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    FLAG_FUA,
    REQUEST_HEADER,
    Errno,
    ProtocolError,
    Ready,
    Request,
    Session,
    decode_request,
    encode_simple_reply,
)
from nbdworker.session import BYTES, SessionRecord

__all__ = ["HEADER", "UNLIMITED", "JobFinish", "JobRunner", "RequestPump"]

log = logging.getLogger("nbdworker.connection")

HEADER = REQUEST_HEADER.size
# Receive buffer for the transmission phase. A write payload that does not fit in what is left
# of it is streamed: written to the backend piece by piece as it arrives, so no payload is ever
# copied inside the worker or held whole (a 32 MiB write costs no 32 MiB buffer). 4 MiB rather
# than 1 MiB halved nbdcopy --connections=1 write time (fewer, larger reads).
RECV_BUFFER = 4 << 20
# An unparsed tail up to this long is moved to the front of the buffer rather than streamed:
# a memmove of a few KiB costs less than the extra pwrite.
MOVE_TAIL = 64 * 1024
# Connections start with one page (a fresh 64 KiB buffer cost ~40 us of page faults and zeroing
# per connection in a socketless connect benchmark: 100 -> 57 us) and grow at the first request
# that does not fit: to 64 KiB for small writes, to RECV_BUFFER for larger ones.
INITIAL_RECV_BUFFER = 4096
SMALL_RECV_BUFFER = 64 * 1024
# Payload bytes a connection may hold in thread-pool jobs (cold reads, FUA writes) before it
# stops reading: with the request cap alone, 64 cold 32 MiB reads would pin 2 GiB.
MAX_INFLIGHT_BYTES = 64 << 20
UNLIMITED = 1 << 62

_EMPTY = memoryview(b"")


JobFinish = Callable[[Future], None]


class JobRunner(Protocol):
    """Runs `func(*args)` in the thread pool and calls `finish(future)` when it is done, on the
    thread that drives the pump (the event loop's runner is in shell.py, the serving thread's in
    serving.py)."""

    def start(
        self, func: Callable[..., Any], args: tuple, finish: Callable[[Future], None]
    ) -> None: ...


class RequestPump:
    def __init__(
        self,
        ready: Ready,
        backend: Backend,
        record: SessionRecord,
        max_inflight: int,
        sink: ReplySink,
        jobs: JobRunner,
        budgeted: bool,
    ) -> None:
        self.session = Session(ready)
        self.backend = backend
        self.peer = record.peer
        self.counts = record.counts
        self.jobs = jobs
        # Over TLS a pass stops after `budget` bytes of read replies (`spend`, shell.py).
        self.budget = UNLIMITED
        self.on_budget_spent: Callable[[], None] = lambda: None
        self.commands = Commands(
            ready, backend, record, sink, self.in_pool, self.spend if budgeted else None
        )
        self.sink = sink
        # The receive buffer is allocated when the first request arrives (buffer()), so the GO
        # reply goes out without waiting for it.
        self.rbuf = bytearray()
        self.rview = memoryview(self.rbuf)
        self.start = 0
        self.end = 0
        # The WRITE whose payload is being streamed (see RECV_BUFFER): where its next byte
        # goes, how many are still to come, and the error to answer once they are in (a
        # refused write is drained, a failed piece stops the writing).
        self.stream_req: Request | None = None
        self.stream_offset = 0
        self.stream_left = 0
        self.stream_error: OSError | tuple[int, str] | None = None
        self.inflight = 0
        self.inflight_bytes = 0
        self.max_inflight = max_inflight
        # Pool jobs still running (counted down in the pool thread, when the job itself ends,
        # however its answer is delivered): the backend may be closed only at 0.
        self.pool_running = 0
        self.pool_lock = threading.Lock()
        self.on_pool_idle: Callable[[], None] | None = None  # from a pool thread
        self.writing_paused = False  # the sink has too much unsent
        self.eof = False  # the client closed its side
        self.disconnecting = False  # DISC received: finish in-flight work, then close
        self.stopped = False  # closed or aborted: nothing more is executed or answered
        self.batch = 0  # requests dispatched in the current pass

    def set_sink(self, sink: ReplySink) -> None:
        self.sink = self.commands.sink = sink

    # -- the rules --------------------------------------------------------------------------------

    def may_read(self) -> bool:
        """Whether to read more from the client now."""
        return not (
            self.inflight >= self.max_inflight
            or self.inflight_bytes >= MAX_INFLIGHT_BYTES
            or self.writing_paused
            or self.disconnecting
            or self.eof
        )

    def finished(self, unread: Callable[[], int]) -> bool:
        """Whether every request is answered and none can come: DISC, EOF (after EOF whatever
        is left unparsed can never complete; what paused writing held back is answered first),
        or a graceful end once the requests still in the socket (`unread()` bytes) are in."""
        if self.inflight:
            return False
        if self.disconnecting or (self.eof and not self.writing_paused):
            return True
        return (
            self.session.shutting_down
            and self.stream_req is None
            and self.end - self.start < HEADER
            # Requests still in the socket are read and answered ESHUTDOWN first.
            and unread() == 0
        )

    def waits_for_each_reply(self) -> bool:
        """One request in this pass and nothing else pending: a client at queue depth 1
        (worth a busy poll, nbdworker/spin.py)."""
        return self.batch == 1 and self.start == self.end and not self.inflight

    def start_shutdown(self) -> None:
        # Every further request but DISC is refused with ESHUTDOWN (Session.check).
        self.session.start_shutdown()

    # -- bytes in ---------------------------------------------------------------------------------

    def buffer(self) -> memoryview:
        """Where the next bytes from the client go."""
        if not self.rbuf:
            self.rbuf = bytearray(INITIAL_RECV_BUFFER)
            self.rview = memoryview(self.rbuf)
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.rbuf) - self.end < MOVE_TAIL and (
            self.end - self.start <= MOVE_TAIL or self.end == len(self.rbuf)
        ):
            # A partial header or a short request. A longer tail is a payload that fits in
            # place (the parser streams the others).
            self._move_tail()
        return self.rview[self.end :]

    def received(self, nbytes: int) -> None:
        self.end += nbytes

    def preload(self, data: bytes) -> None:
        """Requests that arrived with the end of the handshake."""
        self.rbuf = bytearray(max(INITIAL_RECV_BUFFER, 2 * len(data)))
        self.rview = memoryview(self.rbuf)
        self.rbuf[: len(data)] = data
        self.end = len(data)

    def _move_tail(self) -> None:
        """Move the unparsed tail of rbuf to its front."""
        n = self.end - self.start
        self.rbuf[:n] = self.rview[self.start : self.end]
        self.start, self.end = 0, n

    def _grow_buffer(self, need: int) -> bytearray:
        n = self.end - self.start
        small = len(self.rbuf) < SMALL_RECV_BUFFER and need <= SMALL_RECV_BUFFER // 2
        rbuf = bytearray(SMALL_RECV_BUFFER if small else RECV_BUFFER)
        rbuf[:n] = self.rview[self.start : self.end]
        self.rbuf, self.rview = rbuf, memoryview(rbuf)
        self.start, self.end = 0, n
        return rbuf

    # -- dispatch ---------------------------------------------------------------------------------

    def dispatch(self) -> bool:
        """Dispatch every complete request that may be; False when the stream cannot go on (a
        protocol error: the caller aborts the connection)."""
        self.batch = 0
        if self.stream_req is not None and (self.stopped or not self._stream_payload()):
            return True  # the rest of the payload is still to come
        check = self.session.check
        backend = self.backend
        commands = self.commands
        read = commands.read
        send = self.sink.write
        rbuf = self.rbuf
        counts = self.counts
        while (
            not self.stopped
            and not self.disconnecting
            and self.inflight < self.max_inflight
            and self.inflight_bytes < MAX_INFLIGHT_BYTES
            and not self.writing_paused
            and self.budget > 0
        ):
            avail = self.end - self.start
            if avail < HEADER:
                break
            start = self.start
            try:
                req = decode_request(rbuf, start)
            except ProtocolError as exc:
                log.info("%s: protocol error: %s: dropping", self.peer, exc)
                return False
            verdict = check(req)
            if verdict.disconnect:
                log.info("%s: %s: dropping", self.peer, verdict.message or "bad request")
                return False
            payload = verdict.payload
            if payload:
                if avail < HEADER + payload:
                    if start + HEADER + payload <= len(rbuf):
                        break  # the rest arrives in place
                    if len(rbuf) < RECV_BUFFER:
                        rbuf = self._grow_buffer(HEADER + payload)
                        continue
                    if avail <= MOVE_TAIL and HEADER + payload <= len(rbuf):
                        self._move_tail()
                        break  # the rest arrives in place
                    self._start_stream(req, verdict.error, verdict.message)
                    if not self._stream_payload():
                        break
                    continue
                data = self.rview[start + HEADER : start + HEADER + payload]
            else:
                data = _EMPTY
            self.start = start + HEADER + payload
            if verdict.error:
                commands.reply_error(req, verdict.error, verdict.message)
                continue
            command = req.command
            counts[command] += 1
            counts[BYTES + command] += req.length
            self.batch += 1
            # The two hot commands are handled right here: every call saved shows in 4 KiB IOPS.
            try:
                if command == CMD_WRITE and not req.flags & FLAG_FUA:
                    backend.pwrite(data, req.offset)
                    send(encode_simple_reply(req.cookie))
                elif command == CMD_READ:
                    read(req)
                elif command == CMD_DISC:
                    log.debug("%s: NBD_CMD_DISC", self.peer)
                    self.disconnecting = True
                else:
                    commands.execute(req, data)
            except OSError as exc:
                commands.reply_oserror(req, exc)
            except Exception as exc:
                # A bug must cost one request, not the connection or the event loop.
                log.exception("%s: internal error in %s", self.peer, req.command)
                commands.reply_error(req, Errno.EIO, f"internal error: {type(exc).__name__}")
        return True

    def _start_stream(self, req: Request, error: int, message: str) -> None:
        """Take the WRITE at self.start, whose payload does not fit in rbuf, as a stream."""
        self.start += HEADER
        self.stream_req = req
        self.stream_offset = req.offset
        self.stream_left = req.length
        if error:
            self.stream_error = (error, message)  # drained, never written
        else:
            self.stream_error = None
            self.counts[CMD_WRITE] += 1
            self.counts[BYTES + CMD_WRITE] += req.length
            self.batch += 1

    def _stream_payload(self) -> bool:
        """Write what rbuf holds of the streamed payload; True once the request is answered.

        Pieces land in the image before the whole payload is in: harmless, since the client
        can rely on no byte of a write before its reply (and on none at all after an error).
        """
        start = self.start
        avail = self.end - start
        if avail < self.stream_left and self.end < len(self.rbuf) and self.stream_error is None:
            # One pwrite per buffer-full, not one per read: over TLS a read is one 16 KiB
            # record. A drained payload is let go of at once.
            return False
        take = min(avail, self.stream_left)
        if take:
            if self.stream_error is None:
                try:
                    self.backend.pwrite(self.rview[start : start + take], self.stream_offset)
                except OSError as exc:
                    self.stream_error = exc  # the rest is drained
                except Exception as exc:
                    # A bug must cost one request, not the connection or the event loop.
                    log.exception("%s: internal error in a streamed WRITE", self.peer)
                    self.stream_error = (Errno.EIO, f"internal error: {type(exc).__name__}")
            self.start = start + take
            self.stream_offset += take
            self.stream_left -= take
        if self.stream_left:
            return False
        req, error = self.stream_req, self.stream_error
        self.stream_req = self.stream_error = None
        assert req is not None
        if error is None:
            if req.flags & FLAG_FUA:
                self.in_pool(req, self.backend.flush)
            else:
                self.commands.reply_ok(req)
        elif isinstance(error, OSError):
            self.commands.reply_oserror(req, error)
        else:
            self.commands.reply_error(req, *error)
        return True

    # -- the thread pool --------------------------------------------------------------------------

    def in_pool(self, req: Request, func: Callable[..., Any], *args: Any, result=None) -> None:
        """Run func(*args) in the thread pool; result(req, value) answers (None: a plain OK)."""
        # READ results and FUA WRITE payloads are held in memory until the job ends: counted
        # against the connection's byte budget as well as its request budget.
        cost = req.length if req.command == CMD_READ or req.command == CMD_WRITE else 0
        self.inflight += 1
        self.inflight_bytes += cost
        with self.pool_lock:
            self.pool_running += 1
        self.jobs.start(
            self._pooled, (func, *args), lambda job: self._job_done(req, job, result, cost)
        )

    def _pooled(self, func: Callable[..., Any], *args: Any) -> Any:
        """In the pool thread: the job, then the count of running jobs down."""
        try:
            return func(*args)
        finally:
            with self.pool_lock:
                self.pool_running -= 1
                idle = self.pool_running == 0
            if idle and self.on_pool_idle is not None:
                self.on_pool_idle()

    def _job_done(self, req: Request, job: Future, result, cost: int) -> None:
        self.inflight -= 1
        self.inflight_bytes -= cost
        if self.stopped:
            return
        exc = job.exception()
        if exc is not None:
            if isinstance(exc, OSError):
                self.commands.reply_oserror(req, exc)
            else:
                log.error("%s: internal error in %s: %r", self.peer, req.command, exc)
                self.commands.reply_error(req, Errno.EIO, "internal error")
        elif result is not None:
            result(req, job.result())
        else:
            self.commands.reply_ok(req)

    # -- TLS batches ------------------------------------------------------------------------------

    def spend(self, nbytes: int) -> None:
        """Count read-reply bytes against this pass's budget (over TLS, see shell.py)."""
        self.budget -= nbytes
        if self.budget <= 0:
            self.on_budget_spent()
