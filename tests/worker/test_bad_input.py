"""Raw-socket abuse of a real worker: every case gets what the spec says, costs the server a
bounded amount, and is followed by a check that a fresh client is still served correctly."""

from __future__ import annotations

import os
import struct

import pytest

from nbdworker.protocol import (
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_PAYLOAD,
    MAX_STRING,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    Option,
    Reply,
)
from tests.support.fixtures import make_image
from tests.support.nbdclient import encode_info_request, encode_option, encode_request
from tests.support.rawclient import RawClient, check_fresh_client
from tests.support.worker import RunningWorker, run_worker

SIZE = 16 << 20


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad-input")
    images = root / "images"
    make_image(images / "disk.img", SIZE)
    config = {
        "version": 1,
        "default_export": "mem",
        "exports": [
            {"name": "mem", "backend": "memory", "size": SIZE},
            {"name": "ro", "backend": "memory", "size": SIZE, "read_only": True},
            {"name": "disk", "backend": "file", "path": str(images / "disk.img")},
        ],
    }
    with run_worker(config, workdir=root, storage_root=images) as w:
        yield w


@pytest.fixture(scope="module")
def bystander(worker: RunningWorker):
    """A well-behaved client connected for the whole module, with data of its own: every
    misbehaving client around it must leave it and its data alone."""
    data = os.urandom(65536)
    c = RawClient.open(worker.host, worker.port, "disk", structured=True)
    assert c.write(SIZE - 65536, data) == 0
    yield c, data
    result = c.read(SIZE - 65536, 65536)
    assert result.error == 0 and result.data == data
    c.disconnect()
    c.close()


@pytest.fixture(autouse=True)
def still_serving(worker: RunningWorker, bystander):
    yield
    check_fresh_client(worker.host, worker.port, "mem")
    c, data = bystander
    result = c.read(SIZE - 65536, 65536)
    assert result.error == 0 and result.data == data


def raw(worker: RunningWorker) -> RawClient:
    c = RawClient(worker.host, worker.port)
    c.greet()
    return c


# -- handshake ----------------------------------------------------------------------------------


def test_bad_client_flags_disconnect(worker):
    with RawClient(worker.host, worker.port) as c:
        c.greet(flags=ClientFlag.C_FIXED_NEWSTYLE | 0x80)
        assert c.closed_by_server()


def test_bad_option_magic_disconnects(worker):
    with raw(worker) as c:
        c.send(struct.pack(">QII", 0x1122334455667788, Option.GO, 0))
        assert c.closed_by_server()


def test_option_over_length_limit_disconnects_without_reading_it(worker):
    with raw(worker) as c:
        # Claims 4 GiB of data and sends none: the server must decide from the header alone.
        c.send(struct.pack(">QII", 0x49484156454F5054, Option.INFO, 0xFFFFFFFF))
        assert c.closed_by_server()


def test_option_just_over_named_limit_disconnects(worker):
    with raw(worker) as c:
        c.send(struct.pack(">QII", 0x49484156454F5054, 999, MAX_OPTION_LENGTH + 1))
        assert c.closed_by_server()


def test_unknown_option_is_drained_and_answered_unsup(worker):
    with raw(worker) as c:
        replies = c.option(999, b"x" * 1000)
        assert replies[-1].reply == Reply.ERR_UNSUP
        assert replies[-1].option == 999
        c.go("mem")  # the stream is still in sync


def test_name_over_4096_bytes_is_invalid(worker):
    with raw(worker) as c:
        c.send(encode_info_request(Option.INFO, "n" * (MAX_STRING + 1)))
        replies = c.collect_replies()
        assert replies[-1].reply in (Reply.ERR_INVALID, Reply.ERR_TOO_BIG)
        c.go("mem")


def test_export_name_over_4096_bytes_disconnects(worker):
    with raw(worker) as c:
        c.send(encode_option(Option.EXPORT_NAME, b"n" * (MAX_STRING + 1)))
        assert c.closed_by_server()


def test_info_with_inconsistent_lengths_is_invalid(worker):
    with raw(worker) as c:
        # namelen claims more than the option carries
        data = struct.pack(">I", 100) + b"mem" + struct.pack(">H", 0)
        replies = c.option(Option.INFO, data)
        assert replies[-1].reply == Reply.ERR_INVALID
        c.go("mem")


def test_option_count_is_capped(worker):
    with raw(worker) as c:
        answered = 0
        try:
            for _ in range(MAX_OPTIONS * 4):
                replies = c.option(999)
                assert replies[-1].reply in (Reply.ERR_UNSUP, Reply.ERR_INVALID, Reply.ERR_TOO_BIG)
                answered += 1
        except (EOFError, ConnectionResetError, BrokenPipeError):
            pass
        assert answered <= MAX_OPTIONS
        assert c.closed_by_server()


def test_unknown_export_via_go_is_unknown(worker):
    with raw(worker) as c:
        c.send(encode_info_request(Option.GO, "no-such-export"))
        assert c.collect_replies()[-1].reply == Reply.ERR_UNKNOWN
        c.go("mem")


def test_unknown_export_via_export_name_disconnects(worker):
    with raw(worker) as c:
        c.send(encode_option(Option.EXPORT_NAME, b"no-such-export"))
        assert c.closed_by_server()


def test_truncated_handshake_then_eof(worker):
    with raw(worker) as c:
        c.send(struct.pack(">QI", 0x49484156454F5054, Option.GO))  # half an option header
        c.sock.shutdown(1)
        assert c.closed_by_server()


# -- transmission -------------------------------------------------------------------------------


def test_bad_request_magic_disconnects(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, Command.READ, 1, 0, 512))
        assert c.closed_by_server()


@pytest.mark.parametrize("structured", [False, True])
def test_read_past_end_is_einval(worker, structured):
    with RawClient.open(worker.host, worker.port, "mem", structured=structured) as c:
        assert c.read(SIZE - 512, 1024).error == Errno.EINVAL
        assert c.read(SIZE + 4096, 512).error == Errno.EINVAL


def test_write_past_end_is_enospc_and_payload_drained(worker):
    with RawClient.open(worker.host, worker.port, "mem", structured=True) as c:
        assert c.write(SIZE - 512, b"x" * 1024) == Errno.ENOSPC
        assert c.read(0, 512).error == 0  # stream still in sync after the drained payload


def test_write_zeroes_past_end_is_enospc(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        assert c.command(Command.WRITE_ZEROES, SIZE - 512, 1024) == Errno.ENOSPC


def test_trim_past_end_is_einval(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        assert c.command(Command.TRIM, SIZE, 512) == Errno.EINVAL


def test_offset_plus_length_overflow(worker):
    with RawClient.open(worker.host, worker.port, "mem", structured=True) as c:
        assert c.read(2**64 - 512, 1024).error == Errno.EINVAL
        assert c.command(Command.TRIM, 2**64 - 1, 2**32 - 1) == Errno.EINVAL
        assert c.write(2**64 - 4, b"abcd") == Errno.ENOSPC


def test_read_over_max_payload_structured_is_eoverflow(worker):
    with RawClient.open(worker.host, worker.port, "disk", structured=True) as c:
        big = 0  # the file export is only 16 MiB: read over the limit from offset 0 is also OOB
        c.request(Command.READ, big, MAX_PAYLOAD + 1)
        result = c.read_reply(big, MAX_PAYLOAD + 1)
        assert result.error in (Errno.EOVERFLOW, Errno.EINVAL)


def test_read_over_max_payload_simple_is_einval(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        assert c.read(0, MAX_PAYLOAD + 1).error == Errno.EINVAL


def test_write_over_max_payload_disconnects_without_reading(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        # Header only: a server that tried to read or allocate 4 GiB would hang here.
        c.send(encode_request(Command.WRITE, cookie=1, offset=0, length=0xFFFFFFFF))
        assert c.closed_by_server()


def test_write_to_read_only_export_is_eperm_and_stream_stays_in_sync(worker):
    with RawClient.open(worker.host, worker.port, "ro", structured=True) as c:
        assert c.write(0, b"y" * 4096) == Errno.EPERM
        # TRIM and WRITE_ZEROES are not advertised on a read-only export; still, a write of any
        # kind there SHOULD be EPERM (the spec; nbdkit does the same).
        assert c.command(Command.TRIM, 0, 4096) == Errno.EPERM
        assert c.command(Command.WRITE_ZEROES, 0, 4096) == Errno.EPERM
        result = c.read(0, 4096)
        assert result.error == 0 and result.data == bytes(4096)


def test_large_rejected_write_payload_is_drained(worker):
    # A rejected write bigger than the receive buffer goes through the drain path.
    with RawClient.open(worker.host, worker.port, "ro") as c:
        assert c.write(0, b"z" * (4 << 20)) == Errno.EPERM
        assert c.read(0, 512).error == 0


@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_requests_are_answered(worker, structured):
    with RawClient.open(
        worker.host, worker.port, "mem", structured=structured, meta=structured
    ) as c:
        result = c.read(4096, 0)
        assert result.error == 0 and result.data == b""
        assert c.write(4096, b"") == 0
        assert c.command(Command.TRIM, 4096, 0) == 0
        assert c.command(Command.WRITE_ZEROES, 4096, 0) == 0
        assert c.command(Command.CACHE, 4096, 0) == 0
        if structured:
            error, _ = c.block_status(4096, 0)
            assert error == Errno.EINVAL


def test_unknown_command_is_einval(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        assert c.command(42, 0, 512) == Errno.EINVAL
        assert c.read(0, 512).error == 0


def test_unknown_flag_is_einval(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        assert c.read(0, 512, flags=0x4000).error == Errno.EINVAL


def test_block_status_without_negotiation_is_einval(worker):
    with RawClient.open(worker.host, worker.port, "mem", structured=True) as c:
        error, _ = c.block_status(0, 4096)
        assert error == Errno.EINVAL


def test_df_without_structured_replies_is_einval(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        assert c.read(0, 512, flags=CommandFlag.DF).error == Errno.EINVAL


def test_truncated_request_then_eof(worker):
    with RawClient.open(worker.host, worker.port, "mem") as c:
        c.send(encode_request(Command.WRITE, cookie=7, offset=0, length=4096) + b"partial")
        c.sock.shutdown(1)
        assert c.closed_by_server()


def test_df_read_over_data_and_hole_is_one_chunk(worker):
    with RawClient.open(worker.host, worker.port, "disk", structured=True) as c:
        assert c.command(Command.TRIM, 0, 1 << 20) == 0
        assert c.write(65536, b"\x07" * 65536) == 0
        plain = c.read(0, 1 << 20)
        kinds = {chunk.type for chunk in plain.chunks}
        assert 2 in kinds and 1 in kinds  # OFFSET_HOLE and OFFSET_DATA without DF
        result = c.read(0, 1 << 20, flags=CommandFlag.DF)
        assert result.error == 0
        assert [chunk.type for chunk in result.chunks] == [1]
        assert result.data == plain.data
        assert result.data[65536:131072] == b"\x07" * 65536
