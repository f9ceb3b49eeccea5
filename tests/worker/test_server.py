"""Server-level behaviour of a real worker: limits, deadlines, pipelining, DISC, shutdown,
durability, listeners, storage roots and the command line."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading

import pytest

from nbdworker.protocol import Command, CommandFlag, Errno, Option, Reply
from tests.support.fixtures import make_image
from tests.support.inprocess import serving
from tests.support.mounts import mounted
from tests.support.nbdclient import encode_info_request, encode_request
from tests.support.polling import poll
from tests.support.rawclient import RawClient, check_fresh_client, serves_fresh_client
from tests.support.tools import require_libnbd
from tests.support.worker import memory_export as mem
from tests.support.worker import run_worker_main

MiB = 1 << 20


def config(*exports: dict, **top) -> dict:
    return {"version": 1, "exports": list(exports), **top}


# -- handshake deadline and connection limits ---------------------------------------------------


def test_stalled_handshake_is_dropped_at_deadline_and_blocks_nobody(worker_factory):
    w = worker_factory(config(mem("a"), limits={"handshake_timeout": 1.0}))
    stalled = RawClient(w.host, w.port)
    stalled.greet()  # ... and never sends an option
    # Another client is served while the first one stalls.
    check_fresh_client(w.host, w.port, "a")
    assert stalled.closed_by_server(timeout=10)
    w.wait_for_log("handshake deadline passed")
    stalled.close()


def test_silent_client_is_dropped_at_deadline(worker_factory):
    w = worker_factory(config(mem("a"), limits={"handshake_timeout": 0.5}))
    with socket.create_connection((w.host, w.port)) as s:
        s.settimeout(10)
        data = b""
        while chunk := s.recv(100):  # greeting, then EOF when the deadline passes
            data += chunk
        assert data.startswith(b"NBDMAGIC")


def test_transmission_is_not_subject_to_handshake_deadline(worker_factory):
    w = worker_factory(config(mem("a"), limits={"handshake_timeout": 0.3}))
    with RawClient.open(w.host, w.port, "a") as c:
        # Wait past the deadline on the server's clock: a later handshake must have expired.
        other = RawClient(w.host, w.port)
        other.greet()
        assert other.closed_by_server(timeout=10)
        other.close()
        assert c.read(0, 512).error == 0


def test_global_connection_limit(worker_factory):
    w = worker_factory(config(mem("a"), limits={"max_connections": 2}))
    first = RawClient.open(w.host, w.port, "a")
    second = RawClient.open(w.host, w.port, "a")
    with RawClient(w.host, w.port) as third:
        assert third.closed_by_server()
    w.wait_for_log("connection limit reached")
    assert first.read(0, 512).error == 0
    first.disconnect()
    assert first.closed_by_server()
    first.close()

    poll(lambda: serves_fresh_client(w.host, w.port, "a"), what="a slot to free up")
    second.close()


def test_eof_without_disc_releases_the_connection(worker_factory):
    # fio hangs up like this: requests in flight, no NBD_CMD_DISC. The slot must come back.
    w = worker_factory(config(mem("a"), limits={"max_connections": 1}))
    c = RawClient.open(w.host, w.port, "a")
    c.request(Command.READ, 0, 4 * MiB)
    c.request(Command.WRITE, 0, 4096, payload=b"w" * 4096)
    c.close()

    poll(lambda: serves_fresh_client(w.host, w.port, "a"), what="the abandoned connection's slot")


def test_per_export_connection_limit(worker_factory):
    w = worker_factory(config(mem("a", max_connections=1), mem("b")))
    first = RawClient.open(w.host, w.port, "a")
    with RawClient(w.host, w.port) as c:
        c.greet()
        c.refused_go("a")
        c.go("b")  # other exports are not affected
    first.close()

    def a_free() -> bool:
        with RawClient(w.host, w.port) as c:
            c.greet()
            c.send(encode_info_request(Option.GO, "a"))
            return c.collect_replies()[-1].reply == Reply.ACK

    poll(a_free, what="export slot to free up")


# -- transmission behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_requests_all_answered(worker_factory, structured):
    w = worker_factory(config(mem("a")))
    blocks = {i: os.urandom(4096) for i in range(200)}
    with RawClient.open(w.host, w.port, "a", structured=structured) as c:
        # Everything is sent before any reply is read.
        batch = b"".join(
            encode_request(Command.WRITE, cookie=i, offset=i * 4096, length=4096) + blocks[i]
            for i in blocks
        )
        batch += encode_request(Command.FLUSH, cookie=1000)
        c.send(batch)
        seen = set()
        for _ in range(len(blocks) + 1):
            cookie, error, _reply = c.read_any()
            assert error == 0
            seen.add(cookie)
        assert seen == set(blocks) | {1000}
        c.send(
            b"".join(
                encode_request(Command.READ, cookie=i, offset=i * 4096, length=4096) for i in blocks
            )
        )
        for _ in blocks:
            if structured:
                chunk = c.read_chunk()
                assert chunk.done
                cookie = chunk.cookie
                data = chunk.payload[8:]
            else:
                reply = c.read_simple()
                cookie, data = reply.cookie, c.recv_exact(4096)
            assert data == blocks[cookie]


def test_disc_answers_outstanding_requests_then_closes(worker_factory):
    w = worker_factory(config(mem("a")))
    payload = os.urandom(64 * 1024)
    with RawClient.open(w.host, w.port, "a") as c:
        batch = b"".join(
            encode_request(Command.WRITE, cookie=i, offset=i * len(payload), length=len(payload))
            + payload
            for i in range(32)
        )
        c.send(batch + encode_request(Command.DISC, cookie=99))
        for _ in range(32):
            assert c.read_simple().error == 0
        assert c.closed_by_server()
    with RawClient.open(w.host, w.port, "a") as c:
        assert c.read(31 * len(payload), len(payload)).data == payload


def test_finished_client_that_never_reads_its_reply_is_dropped_and_blocks_nobody(worker_factory):
    # DISC behind a read whose reply the client never takes: the worker waits (at most 5 s)
    # for the reply to go out, then drops the connection rather than hold it and the reply.
    w = worker_factory(config(mem("a", size=64 * MiB)))
    length = 12 * MiB  # more than the socket buffers take, less than the reply backlog cap
    with RawClient.open(w.host, w.port, "a") as c:
        # A first request, so the connection is on its serving thread (the first pass is the
        # event loop's, which lingers and drops the same way).
        assert c.read(0, 512).error == 0
        c.send(
            encode_request(Command.READ, cookie=1, offset=0, length=length)
            + encode_request(Command.DISC, cookie=2)
        )
        check_fresh_client(w.host, w.port, "a")
        w.wait_for_log("does not read its replies: dropping", timeout=20)
        got = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := c.sock.recv(MiB):
                got += len(chunk)
        assert got < 16 + length  # the reply was cut, the connection closed
    check_fresh_client(w.host, w.port, "a")


def test_every_command_on_the_serving_thread(worker_factory, tmp_path):
    # After its first request a plain connection is served by its own thread; the commands
    # that run in the thread pool (FUA, FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS, sparse
    # reads) come back to that thread to be answered.
    image = make_image(tmp_path / "images" / "disk.img", 16 * MiB)
    w = worker_factory(config({"name": "d", "path": str(image)}))
    data = os.urandom(MiB)
    with RawClient.open(w.host, w.port, "d", structured=True, meta=True) as c:
        assert c.read(0, 512).error == 0  # the event loop's pass; the thread takes over
        assert c.write(MiB, data, flags=CommandFlag.FUA) == 0
        assert c.write(4 * MiB, data) == 0
        assert c.command(Command.FLUSH) == 0
        assert c.command(Command.TRIM, 4 * MiB, MiB) == 0
        assert c.command(Command.WRITE_ZEROES, MiB, 64 * 1024) == 0
        assert c.command(Command.CACHE, 0, 2 * MiB) == 0
        error, extents = c.block_status(0, 8 * MiB)
        assert error == 0 and sum(length for length, _ in extents) <= 8 * MiB
        assert extents[0][1] & 2  # the image starts with a hole
        sparse = c.read(0, 2 * MiB)  # hole, then zeroes, then data: several chunks
        assert sparse.error == 0
        assert sparse.data == bytes(MiB + 64 * 1024) + data[64 * 1024 :]
        assert len(sparse.chunks) > 1
        assert c.read(4 * MiB, MiB).data == bytes(MiB)
        assert c.read(16 * MiB, 512).error == Errno.EINVAL  # errors are answered there too
        c.disconnect()
        assert c.closed_by_server()
    with open(image, "rb") as f:
        f.seek(MiB + 64 * 1024)
        assert f.read(MiB - 64 * 1024) == data[64 * 1024 :]


def test_large_writes_and_reads_round_trip(worker_factory, tmp_path):
    image = make_image(tmp_path / "images" / "disk.img", 64 * MiB)
    w = worker_factory(config({"name": "d", "path": str(image)}))
    data = os.urandom(32 * MiB)
    with RawClient.open(w.host, w.port, "d", structured=True) as c:
        assert c.write(4096, data) == 0
        assert c.read(4096, 32 * MiB).data == data
        assert c.write(0, data[:300000]) == 0
        assert c.read(0, 300000).data == data[:300000]
    with open(image, "rb") as f:
        f.seek(300000)
        assert f.read(1000) == data[300000 - 4096 : 300000 - 4096 + 1000]


def test_pipelined_writes_across_the_receive_buffer_end_land_intact(worker_factory, tmp_path):
    # One burst of writes of odd sizes, some FUA: their payloads keep crossing the end of the
    # 4 MiB receive buffer, so many are streamed in pieces, and every byte must land in place.
    image = make_image(tmp_path / "images" / "disk.img", 64 * MiB)
    w = worker_factory(config({"name": "d", "path": str(image)}))
    expected = bytearray(64 * MiB)
    batch, cookies, offset = [], [], 0
    for i, size in enumerate([300_001, 4096, 1 * MiB + 17, 513, 2 * MiB + 3] * 8):
        data = os.urandom(size)
        flags = CommandFlag.FUA if i % 7 == 3 else 0
        batch.append(
            encode_request(Command.WRITE, flags=flags, cookie=i, offset=offset, length=size) + data
        )
        cookies.append(i)
        expected[offset : offset + size] = data
        offset += size + 4095
    assert offset < 64 * MiB
    with RawClient.open(w.host, w.port, "d") as c:
        c.send(b"".join(batch))
        replies = [c.read_simple() for _ in cookies]
        assert sorted(r.cookie for r in replies) == cookies
        assert all(r.error == 0 for r in replies)
        assert c.read(0, offset).data == expected[:offset]
    assert image.read_bytes()[:offset] == expected[:offset]


def test_streamed_write_that_fails_midway_is_answered_and_stream_stays_in_sync(
    worker_factory, tmp_path
):
    # A sparse image on a 4 MiB tmpfs: a 16 MiB write runs out of space after its first
    # pieces are written. The client gets ENOSPC for it, the rest of its payload is drained,
    # and the requests behind it are answered.
    with mounted(tmp_path / "images", "-t", "tmpfs", "-o", "size=4M", "tmpfs") as small:
        image = small / "sparse.img"
        with open(image, "wb") as f:
            f.truncate(64 * MiB)
        w = worker_factory(config({"name": "d", "path": str(image)}), storage_root=small)
        with RawClient.open(w.host, w.port, "d") as c:
            c.send(
                encode_request(Command.WRITE, cookie=1, offset=0, length=16 * MiB)
                + bytes([7]) * (16 * MiB)
                + encode_request(Command.READ, cookie=2, offset=32 * MiB, length=4096)
            )
            first = c.read_simple()
            assert (first.cookie, first.error) == (1, Errno.ENOSPC)
            second = c.read_simple()
            assert (second.cookie, second.error) == (2, 0)
            assert c.recv_exact(4096) == bytes(4096)
            w.wait_for_log(r"WRITE at 0\+16777216 failed")
        check_fresh_client(w.host, w.port, "d")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_large_write_payloads_are_streamed_without_payload_sized_buffers(worker_factory, tmp_path):
    # Eight clients each start a 32 MiB write and stall after 6 MiB of it. The worker must
    # write what fills its receive buffer (the image shows the first 3 MiB) without holding
    # 8 x 32 MiB: each connection has its 4 MiB receive buffer and no more.
    image = make_image(tmp_path / "images" / "disk.img", 8 * 32 * MiB)
    w = worker_factory(config({"name": "d", "path": str(image)}), args=["--workers", "1"])
    check_fresh_client(w.host, w.port, "d")
    before = _rss(w.proc.pid)
    clients, pieces = [], []
    try:
        for i in range(8):
            c = RawClient.open(w.host, w.port, "d")
            clients.append(c)
            piece = os.urandom(6 * MiB)
            pieces.append(piece)
            c.send(encode_request(Command.WRITE, cookie=1, offset=i * 32 * MiB, length=32 * MiB))
            c.send(piece)

        def written() -> bool:
            with open(image, "rb") as f:
                for i, piece in enumerate(pieces):
                    f.seek(i * 32 * MiB)
                    if f.read(3 * MiB) != piece[: 3 * MiB]:
                        return False
            return True

        poll(written, "the first 3 MiB of every stalled write in the image")
        grown = _rss(w.proc.pid) - before
        assert grown < 8 * 8 * MiB, f"worker grew by {grown >> 20} MiB"
        for c in clients:
            c.send(bytes(26 * MiB))
            reply = c.read_simple()
            assert (reply.cookie, reply.error) == (1, 0)
    finally:
        for c in clients:
            c.close()
    check_fresh_client(w.host, w.port, "d")


# -- shutdown and durability --------------------------------------------------------------------


def test_graceful_shutdown_finishes_inflight_read(worker_factory):
    w = worker_factory(config(mem("a", size=64 * MiB)))
    pattern = os.urandom(MiB) * 32
    with RawClient.open(w.host, w.port, "a") as c:
        assert c.write(0, pattern) == 0
        # Reads whose replies cannot all be sent yet: we do not read until after the signal.
        c.send(
            b"".join(
                encode_request(Command.READ, cookie=i, offset=0, length=32 * MiB) for i in range(4)
            )
        )
        # The signal only once the first reply has begun to arrive: a read the server has not
        # started yet may rightly be answered ESHUTDOWN.
        assert select.select([c.sock], [], [], 10)[0], "no reply began"
        w.signal(signal.SIGTERM)
        w.wait_for_log(r"waiting for 1 connection")
        # Replies may come in any order (a read can finish in the thread pool), but the one
        # the server had started is served and none is lost: each is data or ESHUTDOWN.
        served = set()
        for _ in range(4):
            reply = c.read_simple()
            if reply.error == 0:
                assert c.recv_exact(32 * MiB) == pattern
                served.add(reply.cookie)
            else:
                assert reply.error == Errno.ESHUTDOWN
        assert 0 in served
        assert c.closed_by_server()
    assert w.wait() == 0
    assert "stopped" in w.log


def test_shutdown_answers_every_queued_request(worker_factory):
    # Requests queued behind a full send buffer get an answer (data or ESHUTDOWN), then EOF.
    w = worker_factory(config(mem("a", size=64 * MiB)))
    first = RawClient.open(w.host, w.port, "a")
    first.send(encode_request(Command.READ, cookie=1, offset=0, length=32 * MiB) * 2)
    assert select.select([first.sock], [], [], 10)[0], "no reply began"  # the first is started
    w.signal(signal.SIGTERM)
    w.wait_for_log("waiting for 1 connection")
    errors = []
    for _ in range(2):
        reply = first.read_simple()
        errors.append(reply.error)
        if reply.error == 0:
            first.recv_exact(32 * MiB)
    assert errors[0] == 0
    assert errors[1] in (0, Errno.ESHUTDOWN)
    assert first.closed_by_server()
    first.close()
    assert w.wait() == 0


def test_shutdown_finishes_a_write_whose_payload_is_still_arriving(worker_factory, tmp_path):
    # The write was begun (its first 4 MiB are in the image) when the signal came: the worker
    # waits for the rest of its payload, answers it, and only then closes.
    image = make_image(tmp_path / "images" / "disk.img", 32 * MiB)
    w = worker_factory(config({"name": "d", "path": str(image)}))
    data = os.urandom(16 * MiB)
    with RawClient.open(w.host, w.port, "d") as c:
        c.send(
            encode_request(Command.WRITE, cookie=7, offset=0, length=len(data)) + data[: 6 * MiB]
        )

        def begun() -> bool:
            with open(image, "rb") as f:
                return f.read(MiB) == data[:MiB]

        poll(begun, "the first piece of the write in the image")
        w.signal(signal.SIGTERM)
        w.wait_for_log("waiting for 1 connection")
        c.send(data[6 * MiB :])
        reply = c.read_simple()
        assert (reply.cookie, reply.error) == (7, 0)
        assert c.closed_by_server()
    assert w.wait() == 0
    assert image.read_bytes()[: len(data)] == data


def test_shutdown_with_unread_requests_in_the_socket_never_resets_the_connection(worker_factory):
    # The worker stops reading while 16 MiB of replies wait to be sent, so many of these requests
    # are still unread in its socket when shutdown starts. Each must get its answer (data or
    # ESHUTDOWN), and the close must not become a reset that throws away unread replies.
    w = worker_factory(config(mem("a", size=64 * MiB)))
    count, length = 512, 256 * 1024
    with RawClient.open(w.host, w.port, "a") as c:
        c.send(
            b"".join(
                encode_request(
                    Command.READ, cookie=i, offset=(i * length) % (64 * MiB), length=length
                )
                for i in range(count)
            )
        )
        assert select.select([c.sock], [], [], 10)[0], "no reply began"  # one is started
        w.signal(signal.SIGTERM)
        w.wait_for_log("waiting for 1 connection")
        answered = refused = 0
        for _ in range(count):
            reply = c.read_simple()
            if reply.error == 0:
                assert len(c.recv_exact(length)) == length
                answered += 1
            else:
                assert reply.error == Errno.ESHUTDOWN
                refused += 1
        assert answered >= 1
        assert c.closed_by_server()
    assert w.wait() == 0


def test_second_signal_forces_exit(worker_factory):
    w = worker_factory(config(mem("a")), args=["--shutdown-timeout", "600"])
    c = RawClient.open(w.host, w.port, "a")
    c.send(encode_request(Command.READ, cookie=1, offset=0, length=16 * MiB) * 8)
    w.signal(signal.SIGTERM)
    w.wait_for_log("waiting for 1 connection")
    w.signal(signal.SIGTERM)
    w.wait_for_log("forcing shutdown")
    assert w.wait() == 0
    c.close()


# "fua-streamed": a FUA write larger than the receive buffer, written in pieces as it arrives.
# A connection's first requests are served on the event loop, the rest by its serving thread.
@pytest.mark.parametrize("served_by", ["loop", "thread"])
@pytest.mark.parametrize("mode", ["fua", "fua-streamed", "flush"])
def test_acknowledged_data_survives_sigkill(worker_factory, tmp_path, mode, served_by):
    image = make_image(tmp_path / "images" / "disk.img", 16 * MiB)
    w = worker_factory(config({"name": "d", "path": str(image)}))
    data = os.urandom(8 * MiB if mode == "fua-streamed" else MiB)
    with RawClient.open(w.host, w.port, "d") as c:
        if served_by == "thread":
            assert c.read(0, 512).error == 0
        if mode.startswith("fua"):
            assert c.write(5 * MiB, data, flags=CommandFlag.FUA) == 0
        else:
            assert c.write(5 * MiB, data) == 0
            assert c.command(Command.FLUSH) == 0
        w.kill()
    with open(image, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(data)) == data


# -- listeners ----------------------------------------------------------------------------------


def test_unix_socket_listener(worker_factory, tmp_path):
    nbd = require_libnbd()
    sock = tmp_path / "nbd.sock"
    w = worker_factory(config(mem("a")), listen=[f"unix:{sock}"])
    assert w.addresses == [f"unix:{sock}"]
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///a?socket={sock}")
    h.pwrite(b"u" * 512, 0)
    assert h.pread(512, 0) == b"u" * 512
    h.shutdown()
    del h
    w.stop()
    assert not sock.exists()


def test_ipv6_and_ipv4_listeners(worker_factory):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured")
    w = worker_factory(config(mem("a")), listen=["[::1]:0", "127.0.0.1:0"])
    v6 = [a for a in w.addresses if a.startswith("[::1]")]
    v4 = [a for a in w.addresses if a.startswith("127.0.0.1")]
    assert v6 and v4
    check_fresh_client("::1", int(v6[0].rpartition(":")[2]), "a")
    check_fresh_client("127.0.0.1", int(v4[0].rpartition(":")[2]), "a")


# -- storage roots and configuration ------------------------------------------------------------


def test_file_outside_storage_root_is_refused(worker_factory, tmp_path):
    outside = make_image(tmp_path / "elsewhere" / "secret.img", MiB)
    inside = make_image(tmp_path / "images" / "ok.img", MiB)
    link = tmp_path / "images" / "link.img"
    link.symlink_to(outside)
    w = worker_factory(
        config(
            {"name": "outside", "path": str(outside)},
            {"name": "via-link", "path": str(link)},
            {"name": "ok", "path": str(inside)},
        )
    )
    assert "export 'outside' refused" in w.log
    assert "export 'via-link' refused" in w.log
    with RawClient(w.host, w.port) as c:
        c.greet()
        for name in ("outside", "via-link"):
            c.send(encode_info_request(Option.GO, name))
            assert c.collect_replies()[-1].reply == Reply.ERR_UNKNOWN
        c.go("ok")


def test_tls_required_export_under_notls_is_refused_not_served_in_plaintext(worker_factory):
    # A config the web side no longer produces (an older version's, or one written by hand): the
    # export is refused, the rest of the config served.
    w = worker_factory(config(mem("plain"), mem("secret", tls_required=True)))
    assert "export 'secret' refused: tls_required, but the TLS mode NOTLS" in w.log
    with RawClient(w.host, w.port) as c:
        c.greet()
        listing = c.option(Option.LIST)
        assert [r.reply for r in listing] == [Reply.SERVER, Reply.ACK]
        assert b"secret" not in listing[0].data
        for option in (Option.INFO, Option.GO):
            c.send(encode_info_request(option, "secret"))
            assert c.collect_replies()[-1].reply == Reply.ERR_UNKNOWN
        c.go("plain")
        assert c.read(0, 512).error == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"version": 2}), "version: unsupported schema version 2"),
        (
            json.dumps(config(mem("a", min_block_size=3))),
            "exports[0].min_block_size: must be a power of 2",
        ),
        (json.dumps([1, 2]), "must be an object"),
    ],
)
def test_bad_config_exits_2_with_message(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = run_worker_main("--config", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_exits_2(tmp_path):
    result = run_worker_main("--config", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_listen_address_exits_2(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(config(mem("a"))))
    result = run_worker_main("--config", str(path), "--listen", "nonsense")
    assert result.returncode == 2
    assert "listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_listen_from_environment(worker_factory):
    w = worker_factory(config(mem("a")), listen=(), env={"NBD_LISTEN": "127.0.0.1:0"})
    assert w.addresses and w.addresses[0].startswith("127.0.0.1:")
    check_fresh_client(w.host, w.port, "a")


# -- configuration reload (in process) ----------------------------------------------------------


def test_serving_threads_are_reused_and_release_their_descriptors(tmp_path):
    # Each plain connection in transmission has a serving thread, an eventfd and a duplicate
    # of its socket: none of them may outlive the connection.
    def serving_threads() -> int:
        return sum(t.name.startswith("nbdconn") and t.is_alive() for t in threading.enumerate())

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with serving(config(mem("a")), tmp_path) as srv:
        check_fresh_client("127.0.0.1", srv.port, "a")
        before = open_fds()
        for i in range(20):
            with RawClient.open("127.0.0.1", srv.port, "a") as c:
                assert c.write(i * 512, bytes([i]) * 512) == 0
                c.disconnect()
                assert c.closed_by_server()
        poll(lambda: open_fds() <= before, "the connections' descriptors to be closed")
        # Reused, not one per connection (a second one may start while the last ends).
        assert 1 <= serving_threads() <= 2
        with RawClient.open("127.0.0.1", srv.port, "a") as c:
            assert c.read(19 * 512, 512).data == bytes([19]) * 512


def test_apply_config_new_connections_see_it_existing_keep_theirs(tmp_path):
    # "a" changes (a new description: a new backend for new connections) and "b" appears; a
    # removed export would end its connections instead (tests/e2e/test_config_distribution.py).
    second = config(mem("a", description="v2"), mem("b"), generation=2)
    with serving(config(mem("a"), generation=1), tmp_path) as srv:
        old = RawClient.open("127.0.0.1", srv.port, "a")
        assert old.write(0, b"x" * 512) == 0
        srv.apply(second)
        # The existing connection keeps export "a" ...
        assert old.read(0, 512).data == b"x" * 512
        # ... while new connections see generation 2.
        with RawClient("127.0.0.1", srv.port) as c:
            c.greet()
            c.go("a")
            assert c.read(0, 512).data == bytes(512)
        with RawClient("127.0.0.1", srv.port) as c:
            c.greet()
            c.go("b")
        old.close()
