"""SocketWriter: the ordered reply queue of plain connections (bytes by writev, file ranges by
sendfile), driven on a real event loop over a socketpair whose buffers are small enough that
every test runs into a full socket."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest

from nbdworker.__main__ import new_event_loop
from nbdworker.sockwriter import SocketWriter

SMALL_BUFFER = 16 * 1024
DEADLINE = 10.0


@pytest.fixture
def image(tmp_path):
    data = os.urandom(4 << 20)
    path = tmp_path / "image"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


class Harness:
    """A writer on one end; the other end read slowly by the loop until `expect` bytes came."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ours, self.theirs = _pair()
        self.sent_calls = 0
        self.errors: list[OSError] = []
        self.writer = SocketWriter(loop, self.ours.fileno(), self._sent, self.errors.append)

    def _sent(self) -> None:
        self.sent_calls += 1

    async def receive(self, expect: int) -> bytes:
        got = bytearray()
        while len(got) < expect:
            chunk = await self.loop.sock_recv(self.theirs, 4096)
            if not chunk:
                break
            got += chunk
        return bytes(got)

    def close(self) -> None:
        self.writer.close()
        self.ours.close()
        self.theirs.close()


def run(coro_fn):
    loop = new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(loop), DEADLINE))
    finally:
        loop.close()


def test_bytes_and_file_ranges_arrive_whole_and_in_order(image):
    fd, data = image
    pieces = [
        b"header-1",
        ("file", 0, 300_001),
        bytearray(b"x" * 70_000),
        ("file", 1_000_000, 1 << 20),
        memoryview(b"tail" * 1000)[3:],
        ("file", 4_000_000, 7),
    ]
    expected = b""
    for piece in pieces:
        if isinstance(piece, tuple):
            expected += data[piece[1] : piece[1] + piece[2]]
        else:
            expected += bytes(piece)

    async def main(loop):
        h = Harness(loop)
        try:
            for piece in pieces:
                if isinstance(piece, tuple):
                    h.writer.write_file(fd, piece[1], piece[2])
                else:
                    h.writer.write(piece)
            assert h.writer.pending == len(expected)
            h.writer.flush()
            # The socket holds far less than the queue: the writer must have stopped and be
            # waiting for writability, not spinning or dropping.
            assert 0 < h.writer.pending < len(expected)
            got = await h.receive(len(expected))
            assert got == expected
            assert h.writer.pending == 0
            assert h.sent_calls > 0
            assert h.errors == []
        finally:
            h.close()

    run(main)


def test_many_small_replies_beyond_iov_max_keep_their_order():
    replies = [f"reply-{i:05d};".encode() for i in range(5000)]
    expected = b"".join(replies)

    async def main(loop):
        h = Harness(loop)
        try:
            for r in replies:
                h.writer.write(r)
            h.writer.flush()
            assert await h.receive(len(expected)) == expected
            assert h.writer.pending == 0
        finally:
            h.close()

    run(main)


def test_nothing_is_sent_before_flush():
    async def main(loop):
        h = Harness(loop)
        try:
            h.writer.write(b"queued")
            with pytest.raises(BlockingIOError):
                h.theirs.recv(100)
            h.writer.flush()
            assert await h.receive(6) == b"queued"
        finally:
            h.close()

    run(main)


def test_peer_gone_reports_an_error_and_drops_the_queue(image):
    fd, _ = image

    async def main(loop):
        h = Harness(loop)
        try:
            h.writer.write(b"x" * 100_000)
            h.writer.flush()  # fills the socket, then waits
            h.theirs.close()
            h.writer.write_file(fd, 0, 1 << 20)
            deadline = loop.time() + DEADLINE
            while not h.errors and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert h.errors and h.errors[0].errno in (errno.EPIPE, errno.ECONNRESET)
            assert h.writer.closed and h.writer.pending == 0
        finally:
            h.writer.close()
            h.ours.close()

    run(main)


def test_file_shorter_than_the_range_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)

    async def main(loop):
        h = Harness(loop)
        try:
            h.writer.write_file(fd, 0, 10)
            h.writer.flush()
            # The first sendfile returns the 3 bytes there are; the next one finds the end.
            deadline = loop.time() + DEADLINE
            while not h.errors and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert h.errors and h.errors[0].errno == errno.EIO
            assert h.writer.closed
        finally:
            h.close()

    try:
        run(main)
    finally:
        os.close(fd)


def test_close_releases_the_duplicate_descriptor():
    async def main(loop):
        ours, theirs = _pair()
        before = len(os.listdir("/proc/self/fd"))
        writer = SocketWriter(loop, ours.fileno(), lambda: None, lambda exc: None)
        assert len(os.listdir("/proc/self/fd")) == before + 1
        writer.write(b"dropped")
        writer.close()
        assert len(os.listdir("/proc/self/fd")) == before
        writer.write(b"ignored after close")
        writer.flush()
        assert writer.pending == 0
        # The socket itself is untouched: closing our end now reaches the peer as EOF.
        ours.close()
        assert await loop.sock_recv(theirs, 10) == b""
        theirs.close()

    run(main)
