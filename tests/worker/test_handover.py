"""The hand-over of a plain connection from the event loop to its serving thread
(`LoopTransmission`, nbdworker/connection/transmission.py), with the transport and the
connection shell stubbed at the edge.

A first pass whose replies overfill the transport pauses its writing; the hand-over then waits
for the transport to drain, and the transport resumes writing (and so the reading) before it is
empty. Found under load by tests/worker/test_large_reads.py: the transport kept reading after
the hand-over, took the client's next request away from the thread and answered it into the
thread's queue, where nobody sent it (the client hung). And the transport's late
`resume_writing` ran a dispatch on the loop while the thread was running one.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from nbdworker.backends import MemoryBackend
from nbdworker.connection.transmission import LoopTransmission
from nbdworker.protocol import CMD_READ, ExportView, Ready, TransmissionFlag
from nbdworker.session import SessionRecord

DEADLINE = 10.0
SIZE = 1 << 20


class StubTransport(asyncio.Transport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.reading = True
        self.buffered = 0  # what get_write_buffer_size says

    def get_extra_info(self, name, default=None):
        return self.sock if name == "socket" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    def write(self, data) -> None:
        raise AssertionError("nothing is written through the transport in this test")


class StubConnection:
    def __init__(self, transport: StubTransport) -> None:
        self.transport = transport
        self.ended = threading.Event()

    def in_transmission(self) -> bool:
        return True

    def take_socket(self) -> int:
        return self.transport.sock.fileno()

    def close(self) -> None:
        self.ended.set()

    def abort(self) -> None:
        self.ended.set()

    def request_spin(self) -> None:
        pass


async def wait_until(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def read_request(cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, offset, length)


async def hand_over_while_the_transport_drains(ours: socket.socket, theirs: socket.socket):
    transport = StubTransport(ours)
    conn = StubConnection(transport)
    host = SimpleNamespace(
        executor=ThreadPoolExecutor(2),
        serving_threads=ThreadPoolExecutor(1),
        settings=SimpleNamespace(busy_poll_us=0),
    )
    view = ExportView("disk", "", SIZE, TransmissionFlag.HAS_FLAGS)
    ready = Ready(view, False, {}, TransmissionFlag.HAS_FLAGS, True)
    record = SessionRecord(peername=("127.0.0.1", 1), state=None)
    backend = MemoryBackend(SIZE)
    backend.pwrite(memoryview(b"\x5a" * 4096), 8192)
    lt = LoopTransmission(conn, host, record, ready, backend, 64, tls=False)
    loop_thread = threading.get_ident()
    dispatches_on_loop_after_hand_over = []
    dispatch = lt.pump.dispatch

    def watched_dispatch() -> bool:
        if lt.serving is not None and threading.get_ident() == loop_thread:
            dispatches_on_loop_after_hand_over.append(1)
        return dispatch()

    lt.pump.dispatch = watched_dispatch
    try:
        # The first pass's replies overfill the transport; the pass ends and the hand-over
        # waits for the transport to drain.
        transport.buffered = 20 << 20
        lt.pause_writing()
        lt.process()
        assert not transport.reading and lt.serving is None
        # The transport drains below its low-water mark, then to nothing.
        transport.buffered = 1 << 20
        lt.resume_writing()
        transport.buffered = 0
        await wait_until(lambda: lt.serving is not None, "the hand-over")
        assert not transport.reading, "the transport reads beside the serving thread"
        # A late resume_writing from the transport leaves the pump to the thread.
        lt.resume_writing()
        lt.pause_writing()
        assert not dispatches_on_loop_after_hand_over
        # The thread serves the next request.
        theirs.sendall(read_request(7, 8192, 4096))
        theirs.settimeout(DEADLINE)
        reply = b""
        while len(reply) < 16 + 4096:
            chunk = theirs.recv(16 + 4096 - len(reply))
            assert chunk, "connection closed"
            reply += chunk
        assert struct.unpack(">IIQ", reply[:16]) == (0x67446698, 0, 7)
        assert reply[16:] == b"\x5a" * 4096
    finally:
        lt.stop_thread()
        await wait_until(conn.ended.is_set, "the serving thread to end")
        host.serving_threads.shutdown()
        host.executor.shutdown()


def test_the_transport_stops_reading_once_the_thread_serves():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        asyncio.run(hand_over_while_the_transport_drains(ours, theirs))
