"""libnbd's tools (nbdinfo, nbdcopy, nbdsh) and its Python binding against a worker."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap

import pytest

from tests.interop.conftest import SIZE, MiB, run
from tests.support.tools import require_libnbd

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def nbd():
    return require_libnbd()


def connect(nbd, uri: str, structured: bool = True, meta: bool = True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


# -- nbdinfo ------------------------------------------------------------------------------------


def test_nbdinfo_list(served):
    out = run("nbdinfo", "--list", served.uri("")).stdout
    for name in ("disk", "ro", "mem"):
        assert f'export="{name}"' in out
    assert "description: sparse disk" in out


def test_nbdinfo_json(served):
    info = json.loads(run("nbdinfo", "--json", served.uri("disk")).stdout)
    export = info["exports"][0]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    assert export["can_flush"] and export["can_fua"] and export["can_trim"]
    assert export["can_zero"] and export["can_fast_zero"] and export["can_cache"]
    assert export["can_multi_conn"] and export["can_df"]
    assert "base:allocation" in export["contexts"]
    ro = json.loads(run("nbdinfo", "--json", served.uri("ro")).stdout)["exports"][0]
    assert ro["is_read_only"] is True and ro["can_trim"] is False


def test_nbdinfo_size(served):
    assert run("nbdinfo", "--size", served.uri("mem")).stdout.strip() == str(SIZE)


def test_nbdinfo_map(served, nbd):
    h = connect(nbd, served.uri("mem"))
    h.pwrite(b"\x01" * MiB, 10 * MiB)
    h.shutdown()
    out = run("nbdinfo", "--map", "--json", served.uri("mem")).stdout
    extents = json.loads(out)
    data = [e for e in extents if e["type"] == 0]
    assert any(e["offset"] <= 10 * MiB and e["offset"] + e["length"] >= 11 * MiB for e in data)
    assert any(e["type"] == 3 for e in extents)  # hole,zero elsewhere


# -- nbdcopy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [None, 1])
def test_nbdcopy_round_trip_sha256(served, tmp_path, connections):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    extra = [f"--connections={connections}"] if connections else []
    run("nbdcopy", *extra, str(src), served.uri("disk"))
    out = tmp_path / "out.img"
    run("nbdcopy", *extra, served.uri("disk"), str(out))
    assert (
        hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    )


# -- libnbd scripts -----------------------------------------------------------------------------


def block_status(h, nbd, offset: int, length: int, req_one: bool = False) -> list[tuple[int, int]]:
    result: list[tuple[int, int]] = []

    def cb(metacontext, off, entries, err):
        assert metacontext == "base:allocation"
        assert off == offset
        result.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    flags = nbd.CMD_FLAG_REQ_ONE if req_one else 0
    h.block_status(length, offset, cb, flags)
    return result


def test_block_status(served, nbd):
    h = connect(nbd, served.uri("mem"))
    h.trim(SIZE, 0)
    h.pwrite(b"\x02" * MiB, 4 * MiB)
    extents = block_status(h, nbd, 0, SIZE)
    assert extents[0] == (4 * MiB, 3)
    assert extents[1] == (MiB, 0)
    assert sum(n for n, _ in extents) == SIZE
    one = block_status(h, nbd, 0, 2 * MiB, req_one=True)
    assert one == [(2 * MiB, 3)]
    h.shutdown()


def test_fua_flush_trim_zero_cache(served, nbd):
    h = connect(nbd, served.uri("disk"))
    data = os.urandom(MiB)
    h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 0) == data
    h.flush()
    h.trim(MiB // 2, 0)
    h.zero(MiB // 2, MiB // 2)
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    h.zero(65536, 2 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    h.cache(MiB, 0)
    assert h.pread(MiB, 0) == bytes(MiB)
    h.shutdown()
    with open(served.disk, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


@pytest.mark.parametrize("structured", [True, False])
def test_structured_replies_on_and_off(served, nbd, structured):
    h = connect(nbd, served.uri("disk"), structured=structured, meta=structured)
    assert h.get_structured_replies_negotiated() == structured
    data = os.urandom(256 * 1024)
    h.pwrite(data, 30 * MiB)
    assert h.pread(len(data), 30 * MiB) == data
    # A read over a hole: OFFSET_HOLE chunks with structured replies, zeroes either way.
    h.trim(MiB, 50 * MiB)
    assert h.pread(MiB, 50 * MiB) == bytes(MiB)
    assert h.can_df() == structured
    with pytest.raises(nbd.Error):
        h.pread(4096, SIZE)
    h.shutdown()


def test_structured_read_over_data_and_holes(served, nbd):
    h = connect(nbd, served.uri("mem"))
    h.trim(4 * MiB, 0)
    pattern = os.urandom(64 * 1024)
    h.pwrite(pattern, 64 * 1024)
    chunks: list[tuple[int, int, int]] = []

    def chunk(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0

    buf = h.pread_structured(512 * 1024, 0, chunk)
    assert buf[64 * 1024 : 128 * 1024] == pattern
    assert buf[:65536] == bytes(65536)
    assert any(s == nbd.READ_HOLE for _, _, s in chunks)
    assert any(s == nbd.READ_DATA for _, _, s in chunks)
    h.shutdown()


def test_multi_conn_sees_writes_across_connections(served, nbd):
    a = connect(nbd, served.uri("disk"))
    b = connect(nbd, served.uri("disk"))
    assert a.can_multi_conn() and b.can_multi_conn()
    data = os.urandom(65536)
    a.pwrite(data, 40 * MiB, nbd.CMD_FLAG_FUA)
    b.flush()
    assert b.pread(65536, 40 * MiB) == data
    a.shutdown()
    b.shutdown()


def test_aio_many_in_flight(served, nbd):
    h = connect(nbd, served.uri("mem"))
    blocks = [os.urandom(4096) for _ in range(128)]
    cookies = [h.aio_pwrite(blk, i * 4096) for i, blk in enumerate(blocks)]
    assert h.aio_in_flight() > 1
    while h.aio_in_flight() > 0:
        h.poll(-1)
    # aio_command_completed retires a command: ask once per cookie, after all are done.
    assert all(h.aio_command_completed(c) for c in cookies)
    bufs = [nbd.Buffer(4096) for _ in blocks]
    cookies = [h.aio_pread(buf, i * 4096) for i, buf in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    assert [buf.to_bytearray() for buf in bufs] == blocks
    h.shutdown()


def test_nbdsh_script(served):
    script = textwrap.dedent(
        f"""
        h.pwrite(b"nbdsh!" * 100, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(600, 0) == b"nbdsh!" * 100
        h.flush()
        h.zero(600, 0)
        assert h.pread(600, 0) == bytes(600)
        assert h.get_size() == {SIZE}
        print("nbdsh ok")
        """
    )
    out = run("nbdsh", "-u", served.uri("mem"), "-c", script).stdout
    assert "nbdsh ok" in out


def test_go_with_block_size(served, nbd):
    h = nbd.NBD()
    h.set_request_block_size(True)
    h.connect_uri(served.uri("disk"))
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    h.shutdown()


def test_opt_mode_list_and_info(served, nbd):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(served.uri(""))
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert sorted(names) == ["disk", "mem", "ro"]
    h.set_export_name("disk")
    h.opt_info()
    assert h.get_size() == SIZE
    assert h.get_export_description() == "sparse disk"
    h.opt_abort()
