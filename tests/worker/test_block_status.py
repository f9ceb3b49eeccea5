"""BLOCK_STATUS (base:allocation) over a raw socket: REQ_ONE, u32-capped descriptors on huge
sparse images, descriptors that start at the request offset and stay inside the request."""

from __future__ import annotations

import pytest

from nbdworker.protocol import CommandFlag, Errno, StateFlag
from tests.support.fixtures import make_image
from tests.support.rawclient import RawClient

GiB = 1 << 30
MiB = 1 << 20
HOLE = int(StateFlag.HOLE | StateFlag.ZERO)


@pytest.fixture
def worker(worker_factory, tmp_path):
    image = make_image(tmp_path / "images" / "huge.img", 16 * GiB)
    with open(image, "r+b") as f:
        f.seek(5 * GiB)
        f.write(b"\x01" * MiB)
    return worker_factory(
        {"version": 1, "exports": [{"name": "huge", "backend": "file", "path": str(image)}]}
    )


def open_client(worker) -> RawClient:
    return RawClient.open(worker.host, worker.port, "huge", structured=True, meta=True)


def test_descriptors_are_capped_below_4gib_and_aligned(worker):
    with open_client(worker) as c:
        error, extents = c.block_status(0, 0xFFFFFFFF)
        assert error == 0
        # 4 GiB of hole: one aligned descriptor just under 2**32, no unaligned remainder.
        assert extents == [(0xFFFFFE00, HOLE)]


def test_extents_start_at_offset_and_show_data(worker):
    with open_client(worker) as c:
        error, extents = c.block_status(5 * GiB - MiB, 3 * MiB)
        assert error == 0
        assert extents == [(MiB, HOLE), (MiB, 0), (MiB, HOLE)]


def test_req_one_returns_one_descriptor_within_length(worker):
    with open_client(worker) as c:
        error, extents = c.block_status(5 * GiB - MiB, 3 * MiB, flags=CommandFlag.REQ_ONE)
        assert error == 0
        assert extents == [(MiB, HOLE)]
        error, extents = c.block_status(5 * GiB, 4096, flags=CommandFlag.REQ_ONE)
        assert extents == [(4096, 0)]


def test_block_status_past_end_is_einval(worker):
    with open_client(worker) as c:
        error, _ = c.block_status(16 * GiB - 512, 1024)
        assert error == Errno.EINVAL


def test_sparse_read_sends_hole_chunks(worker):
    with open_client(worker) as c:
        result = c.read(5 * GiB - MiB, 2 * MiB)
        assert result.error == 0
        assert result.data == bytes(MiB) + b"\x01" * MiB
        kinds = [chunk.type for chunk in result.chunks]
        assert kinds == [2, 1]  # OFFSET_HOLE, then OFFSET_DATA (with DONE)
        assert result.chunks[-1].done
