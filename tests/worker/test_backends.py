"""Backends against real files: sparse extents, hole punching, zeroing, flush; and the memory
backend with the same expectations."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbdworker.backends import FileBackend, MemoryBackend
from nbdworker.backends.base import STATE_HOLE, STATE_ZERO

MiB = 1 << 20
HOLE = STATE_HOLE | STATE_ZERO


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sparse_supported(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.truncate(MiB)
    return allocated_bytes(probe) == 0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    if not sparse_supported(tmp_path):
        pytest.skip("file system without sparse files")
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    return path


@pytest.fixture
def backend(image: Path):
    b = FileBackend(str(image))
    yield b
    b.close()


def read(b, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def test_size_and_capabilities(backend):
    assert backend.size == 8 * MiB
    assert backend.can_flush and backend.can_fua and backend.can_trim and backend.can_zero
    assert backend.can_extents and backend.can_multi_conn


def test_read_only_file_backend_refuses_writes(image):
    b = FileBackend(str(image), read_only=True)
    try:
        assert b.read_only and not b.can_trim and not b.can_zero
        with pytest.raises(OSError):
            b.pwrite(memoryview(b"x"), 0)
    finally:
        b.close()


def test_write_then_read(backend):
    data = os.urandom(10000)
    backend.pwrite(memoryview(data), 12345)
    assert read(backend, 12345, 10000) == data


def test_fua_write_and_flush_are_durable_calls(backend, image):
    data = os.urandom(4096)
    backend.pwrite(memoryview(data), 0, fua=True)
    backend.flush()
    with open(image, "rb") as f:
        assert f.read(4096) == data


def test_pread_nowait_serves_cached_data(backend):
    data = os.urandom(8192)
    backend.pwrite(memoryview(data), 0)
    buf = bytearray(8192)
    n = backend.pread_nowait(memoryview(buf), 0)
    # Just written, so in the page cache: served entirely without blocking.
    assert n == 8192 and bytes(buf) == data


def test_extents_of_sparse_file(backend):
    assert backend.extents(0, 8 * MiB) == [(8 * MiB, HOLE)]
    backend.pwrite(memoryview(b"d" * MiB), 2 * MiB)
    assert backend.extents(0, 8 * MiB) == [(2 * MiB, HOLE), (MiB, 0), (5 * MiB, HOLE)]
    # Starts exactly at the requested offset, stops at the requested end.
    assert backend.extents(2 * MiB + 512, MiB) == [(MiB - 512, 0), (512, HOLE)]


def test_extents_stop_at_end_of_image(backend):
    assert backend.extents(7 * MiB, 4 * MiB) == [(MiB, HOLE)]


def test_trim_punches_a_hole(backend, image):
    backend.pwrite(memoryview(os.urandom(4 * MiB)), 0)
    backend.flush()
    before = allocated_bytes(image)
    backend.trim(MiB, 2 * MiB)
    assert allocated_bytes(image) <= before - 2 * MiB
    assert read(backend, MiB, 2 * MiB) == bytes(2 * MiB)
    assert backend.extents(0, 4 * MiB) == [(MiB, 0), (2 * MiB, HOLE), (MiB, 0)]


def test_zero_without_no_hole_deallocates(backend, image):
    backend.pwrite(memoryview(os.urandom(2 * MiB)), 0)
    backend.flush()
    backend.zero(0, MiB, may_trim=True)
    assert read(backend, 0, MiB) == bytes(MiB)
    assert backend.extents(0, 2 * MiB)[0] == (MiB, HOLE)


def test_zero_with_no_hole_keeps_allocation(backend, image):
    backend.pwrite(memoryview(os.urandom(2 * MiB)), 0)
    backend.flush()
    before = allocated_bytes(image)
    backend.zero(0, MiB, may_trim=False)
    assert read(backend, 0, MiB) == bytes(MiB)
    # ZERO_RANGE may leave unwritten extents (which read as zeroes) but never frees blocks.
    assert allocated_bytes(image) >= before
    assert all(flags & STATE_HOLE == 0 for _, flags in backend.extents(0, MiB))


def test_zero_unaligned_range(backend):
    backend.pwrite(memoryview(b"\xff" * 16384), 0)
    backend.zero(100, 5000, may_trim=True)
    data = read(backend, 0, 16384)
    assert data[:100] == b"\xff" * 100
    assert data[100:5100] == bytes(5000)
    assert data[5100:] == b"\xff" * (16384 - 5100)


def test_zero_falls_back_to_writing_when_fallocate_is_unsupported(backend):
    backend.pwrite(memoryview(b"\xee" * 8192), 0)
    # As on a file system without fallocate modes: the backend remembers refusals.
    backend._punch_ok = False
    backend._zero_range_ok = False
    backend.zero(0, 8192, may_trim=True)
    assert read(backend, 0, 8192) == bytes(8192)
    with pytest.raises(OSError) as info:
        backend.zero(0, 4096, fast=True)
    assert info.value.errno == errno.ENOTSUP


def test_cache_is_accepted_and_changes_nothing(backend):
    data = os.urandom(4096)
    backend.pwrite(memoryview(data), 0)
    backend.cache(0, MiB)
    assert read(backend, 0, 4096) == data


def test_short_read_past_end_is_an_error(backend):
    with pytest.raises(OSError):
        read(backend, 8 * MiB - 512, 1024)


def test_not_a_file(tmp_path):
    with pytest.raises(OSError):
        FileBackend(str(tmp_path))


# -- memory -------------------------------------------------------------------------------------


def test_memory_backend_round_trip_and_extents():
    b = MemoryBackend(4 * MiB)
    assert b.extents(0, 4 * MiB) == [(4 * MiB, HOLE)]
    data = os.urandom(100000)
    b.pwrite(memoryview(data), 70000)
    assert read(b, 70000, 100000) == data
    assert read(b, 0, 70000) == bytes(70000)
    ext = b.extents(0, 4 * MiB)
    assert sum(n for n, _ in ext) == 4 * MiB
    assert ext[0] == (65536, HOLE)
    b.trim(0, 4 * MiB)
    assert read(b, 70000, 100000) == bytes(100000)
    assert b.extents(0, 4 * MiB) == [(4 * MiB, HOLE)]


def test_memory_backend_zero_partial_pages():
    b = MemoryBackend(MiB)
    b.pwrite(memoryview(b"\x01" * MiB), 0)
    b.zero(1000, 200000, may_trim=False)
    data = read(b, 0, MiB)
    assert data[:1000] == b"\x01" * 1000
    assert data[1000:201000] == bytes(200000)
    assert data[201000:] == b"\x01" * (MiB - 201000)


def test_memory_backend_bounds_and_read_only():
    b = MemoryBackend(4096)
    with pytest.raises(OSError):
        b.pwrite(memoryview(b"x" * 10), 4090)
    ro = MemoryBackend(4096, read_only=True)
    with pytest.raises(OSError) as info:
        ro.pwrite(memoryview(b"x"), 0)
    assert info.value.errno == errno.EROFS
