"""SocketWriter: the ordered reply queue of plain connections (bytes by writev, file ranges by
sendfile), driven as a serving thread drives it, over a socketpair whose buffers are small
enough that every test runs into a full socket."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import pytest

from nbdworker.connection.sinks import SocketWriter

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


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    ours.setblocking(False)
    theirs.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def pump(writer: SocketWriter, theirs: socket.socket, expect: int) -> bytes:
    """Send and receive in turns, as the serving thread and a client would, until `expect`
    bytes came; the writer is only called again once its socket is writable."""
    got = bytearray()
    poller = select.poll()
    poller.register(writer.sock.fileno(), select.POLLOUT)
    deadline = time.monotonic() + DEADLINE
    while len(got) < expect:
        assert time.monotonic() < deadline, f"stalled at {len(got)} of {expect} bytes"
        if writer.pending and poller.poll(0):
            writer.send_queued()
        try:
            chunk = theirs.recv(4096)
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_bytes_and_file_ranges_arrive_whole_and_in_order(image, pair):
    fd, data = image
    ours, theirs = pair
    pieces = [
        b"header-1",
        ("file", 0, 300_001),
        bytearray(b"x" * 70_000),
        ("file", 1_000_000, 1 << 20),
        memoryview(b"tail" * 1000)[3:],
        ("file", 4_000_000, 7),
    ]
    expected = b""
    writer = SocketWriter(ours.fileno())
    for piece in pieces:
        if isinstance(piece, tuple):
            expected += data[piece[1] : piece[1] + piece[2]]
            writer.write_file(fd, piece[1], piece[2])
        else:
            expected += bytes(piece)
            writer.write(piece)
    assert writer.pending == len(expected)
    # The socket holds far less than the queue: the writer stops and says so, not spinning
    # or dropping.
    assert writer.send_queued() is True
    assert 0 < writer.pending < len(expected)
    assert pump(writer, theirs, len(expected)) == expected
    assert writer.pending == 0
    assert writer.send_queued() is False
    writer.close()


def test_many_small_replies_beyond_iov_max_keep_their_order(pair):
    ours, theirs = pair
    replies = [f"reply-{i:05d};".encode() for i in range(5000)]
    expected = b"".join(replies)
    writer = SocketWriter(ours.fileno(), socket.AF_UNIX)
    for r in replies:
        writer.write(r)
    writer.send_queued()
    assert pump(writer, theirs, len(expected)) == expected
    assert writer.pending == 0
    writer.close()


def test_nothing_is_sent_before_send_queued(pair):
    ours, theirs = pair
    writer = SocketWriter(ours.fileno())
    writer.write(b"queued")
    with pytest.raises(BlockingIOError):
        theirs.recv(100)
    assert writer.send_queued() is False
    assert theirs.recv(100) == b"queued"
    writer.close()


def test_peer_gone_is_an_error(image, pair):
    fd, _ = image
    ours, theirs = pair
    writer = SocketWriter(ours.fileno())
    writer.write(b"x" * 100_000)
    assert writer.send_queued() is True  # fills the socket
    theirs.close()
    writer.write_file(fd, 0, 1 << 20)
    with pytest.raises(OSError) as failure:
        writer.send_queued()
    assert failure.value.errno in (errno.EPIPE, errno.ECONNRESET)
    writer.close()
    assert writer.closed and writer.pending == 0


def test_file_shorter_than_the_range_is_an_error_not_a_hang(tmp_path, pair):
    ours, _ = pair
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        writer = SocketWriter(ours.fileno())
        writer.write_file(fd, 0, 10)
        # The first sendfile sends the 3 bytes there are (a short send: the writer waits for
        # writability); the next one finds the end.
        with pytest.raises(OSError) as failure:
            assert writer.send_queued() is True
            writer.send_queued()
        assert failure.value.errno == errno.EIO
        writer.close()
    finally:
        os.close(fd)


def test_close_releases_the_duplicate_descriptor(pair):
    ours, theirs = pair
    before = len(os.listdir("/proc/self/fd"))
    writer = SocketWriter(ours.fileno())
    assert len(os.listdir("/proc/self/fd")) == before + 1
    writer.write(b"dropped")
    writer.close()
    assert len(os.listdir("/proc/self/fd")) == before
    writer.write(b"ignored after close")
    assert writer.pending == 0
    # The socket itself is untouched: closing our end now reaches the peer as EOF.
    ours.close()
    theirs.setblocking(True)
    theirs.settimeout(DEADLINE)
    assert theirs.recv(10) == b""


def test_a_file_that_refuses_sendfile_is_sent_from_memory_and_reported(pair):
    # /proc/self/cmdline reads with pread but has no splice_read: sendfile says EINVAL, as a
    # filesystem without sendfile support would.
    ours, theirs = pair
    fd = os.open("/proc/self/cmdline", os.O_RDONLY)
    try:
        content = os.pread(fd, 1 << 16, 0)
        assert len(content) > 10
        refusals: list[OSError] = []
        writer = SocketWriter(ours.fileno())
        writer.write(b"head:")
        writer.write_file(fd, 3, len(content) - 3, refusals.append)
        writer.write(b":tail")
        expected = b"head:" + content[3:] + b":tail"
        writer.send_queued()
        assert pump(writer, theirs, len(expected)) == expected
        assert [exc.errno for exc in refusals] == [errno.EINVAL]
        writer.close()
    finally:
        os.close(fd)
