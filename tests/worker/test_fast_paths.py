"""The fast paths a filesystem may refuse or make slow (the hole check of reads, RWF_NOWAIT,
sendfile): kept where they work (ext4, XFS on loop devices), given up per open image where
they do not (tmpfs), the decision logged and reported by `FileBackend.fast_paths`.

tmpfs is the case in point: `SEEK_HOLE` walks the page cache from the offset on (milliseconds
per call on a large image) and `preadv2(RWF_NOWAIT)` is refused (EOPNOTSUPP), so every read
used to pay two slow lseeks and a thread hop (issue 20: 46 MB/s against nbdkit's 1,785).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdworker.backends import FileBackend
from nbdworker.backends.base import STATE_HOLE, STATE_ZERO
from nbdworker.backends.probes import (
    COLD_READS,
    HOLE_CHECK_BUDGET_NS,
    HOLE_CHECK_WINDOW,
    HoleCheckCost,
    ReadCost,
)
from nbdworker.metrics import connection_totals, merge_totals
from nbdworker.stats import WorkerStats
from tests.support.fixtures import make_image
from tests.support.metrics import scrape, value
from tests.support.mounts import loop_filesystem, mounted

MiB = 1 << 20
HOLE = STATE_HOLE | STATE_ZERO
# Large enough that SEEK_HOLE from its start costs tmpfs far more than the budget (~2-7 us per
# MiB of data after the offset, against 50 us).
TMPFS_IMAGE = 128 * MiB


@pytest.fixture(params=["ext4", "xfs"])
def probing_fs(request, tmp_path: Path) -> Iterator[Path]:
    """A filesystem where every fast path works."""
    with loop_filesystem(tmp_path, request.param) as target:
        yield target


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted(tmp_path / "tmpfs", "-t", "tmpfs", "-o", "size=300M", "tmpfs") as target:
        yield target


def data_image(path: Path, size: int) -> bytes:
    """An image of random data with a 1 MiB hole at 2 MiB; returns its bytes."""
    data = bytearray(os.urandom(size))
    data[2 * MiB : 3 * MiB] = bytes(MiB)
    make_image(path, size, bytes(data[: 2 * MiB]))
    with open(path, "r+b") as f:
        f.seek(3 * MiB)
        f.write(data[3 * MiB :])
    return bytes(data)


@pytest.fixture
def tmpfs_backend(tmpfs: Path) -> Iterator[tuple[FileBackend, bytes]]:
    data = data_image(tmpfs / "disk.img", TMPFS_IMAGE)
    b = FileBackend(str(tmpfs / "disk.img"))
    yield b, data
    b.close()


# -- where each probe works --


def test_every_fast_path_stays_on_where_it_works(probing_fs: Path, caplog):
    data = data_image(probing_fs / "disk.img", 16 * MiB)
    b = FileBackend(str(probing_fs / "disk.img"))
    try:
        with caplog.at_level(logging.INFO, logger="nbdworker"):
            # The hole check, many times over: it keeps finding the hole.
            for _ in range(4 * HOLE_CHECK_WINDOW):
                assert b.hole_check(MiB, 2 * MiB) == [(MiB, 0), (MiB, HOLE)]
            # RWF_NOWAIT on cached data reads inline; the page-cache probe says "cached".
            buf = bytearray(64 * 1024)
            assert b.pread_nowait(memoryview(buf), 5 * MiB) == len(buf)
            assert bytes(buf) == data[5 * MiB : 5 * MiB + len(buf)]
            assert b.cached(5 * MiB, 256 * 1024)
            # sendfile from the image.
            ours, theirs = socket.socketpair()
            with ours, theirs:
                assert os.sendfile(ours.fileno(), b.sendfile_fd, 7 * MiB, 4096) == 4096
                assert theirs.recv(4096, socket.MSG_WAITALL) == data[7 * MiB : 7 * MiB + 4096]
        assert b.fast_paths() == {"hole_check": "on", "reads": "rwf_nowait", "sendfile": "on"}
        assert not [r for r in caplog.records if r.name.startswith("nbdworker.backends")]
    finally:
        b.close()


# -- tmpfs --


def test_hole_check_is_given_up_on_tmpfs(tmpfs_backend, caplog):
    b, _data = tmpfs_backend
    with caplog.at_level(logging.INFO, logger="nbdworker"):
        # Reads near the start, where SEEK_HOLE walks ~128 MiB of pages.
        for i in range(HOLE_CHECK_WINDOW):
            assert b.hole_check(4 * MiB + i * MiB, 256 * 1024) == [(256 * 1024, 0)]
        assert b.hole_check(0, 4 * MiB) is None
    assert b.fast_paths()["hole_check"] == "off"
    (line,) = [r.getMessage() for r in caplog.records if "hole check" in r.getMessage()]
    assert "disk.img (tmpfs): hole check of reads off" in line
    # Block status, which a client asks for, still answers.
    assert b.extents(MiB, 2 * MiB) == [(MiB, 0), (MiB, HOLE)]


def test_reads_are_inline_on_tmpfs_though_rwf_nowait_is_refused(tmpfs_backend, caplog):
    b, data = tmpfs_backend
    with caplog.at_level(logging.INFO, logger="nbdworker"):
        buf = bytearray(64 * 1024)
        for offset in (0, 9 * MiB, 100 * MiB):
            # Read where it stands, no thread hop: tmpfs holds it in memory.
            assert b.pread_nowait(memoryview(buf), offset) == len(buf)
            assert bytes(buf) == data[offset : offset + len(buf)]
            assert b.cached(offset, 256 * 1024)
    assert b.fast_paths()["reads"] == "measured"
    refusals = [r.getMessage() for r in caplog.records if "RWF_NOWAIT" in r.getMessage()]
    assert len(refusals) == 1, refusals  # noticed once, not per read
    assert "disk.img (tmpfs): RWF_NOWAIT refused" in refusals[0]
    # sendfile works on tmpfs and stays on.
    assert b.fast_paths()["sendfile"] == "on" and b.sendfile_fd is not None


def test_worker_serving_from_tmpfs_logs_and_reports_its_decisions(worker_factory, tmp_path, tmpfs):
    data = data_image(tmpfs / "disk.img", TMPFS_IMAGE)
    w = worker_factory(
        {
            "version": 1,
            "exports": [{"name": "disk", "backend": "file", "path": str(tmpfs / "disk.img")}],
        },
        storage_root=tmpfs,
        args=["--metrics-listen", "127.0.0.1:0"],
    )
    copy = tmp_path / "copy.img"
    # One connection, structured replies: every 256 KiB read would get a hole check.
    subprocess.run(
        ["nbdcopy", "--connections=1", "--no-extents", w.uri("disk"), str(copy)],
        check=True,
        timeout=120,
    )
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(data).digest()
    w.wait_for_log(r"disk\.img \(tmpfs\): hole check of reads off")
    w.wait_for_log(r"disk\.img \(tmpfs\): RWF_NOWAIT refused")
    samples = scrape(w)
    for path, state in (("hole_check", "off"), ("reads", "measured"), ("sendfile", "on")):
        labels = {"export": "disk", "path": path, "state": state}
        assert value(samples, "nbdworker_export_fast_path", **labels) == 1, (labels, samples)


# -- the rules, on measured costs given to them --


def test_one_slow_hole_check_does_not_turn_checking_off():
    cost = HoleCheckCost("image")
    for _ in range(10):
        # A preempted check now and then on a busy machine, cheap ones in between.
        for _ in range(HOLE_CHECK_WINDOW - 1):
            cost.took(HOLE_CHECK_BUDGET_NS * 100)
        cost.took(1_000)
    assert cost.enabled
    for _ in range(HOLE_CHECK_WINDOW):
        cost.took(HOLE_CHECK_BUDGET_NS + 1)
    assert not cost.enabled
    cost.took(1_000)  # off for good: a cheap check later does not matter
    assert not cost.enabled


def test_a_read_that_waited_for_storage_sends_the_next_ones_to_the_pool():
    cost = ReadCost()
    assert cost.inline()
    assert cost.took(2_000, 4096)  # a page from memory
    assert cost.inline()
    assert not cost.took(5_000_000, 4096)  # 5 ms: from the disk
    assert [cost.inline() for _ in range(COLD_READS)] == [False] * COLD_READS
    assert cost.inline()  # then tried inline again
    assert not cost.took(5_000_000, 256 * 1024)
    assert not cost.inline()
    assert cost.took(40_000, 256 * 1024)  # a fast read in the pool: inline from the next on
    assert cost.inline()


def test_sendfile_refused_once_is_not_offered_again(tmp_path, caplog):
    make_image(tmp_path / "disk.img", MiB, b"x")
    b = FileBackend(str(tmp_path / "disk.img"))
    try:
        assert b.sendfile_fd == b.fd
        with caplog.at_level(logging.INFO, logger="nbdworker"):
            # What the reply queue reports when sendfile from the image fails as unsupported.
            b.sendfile_refused(OSError(errno.EINVAL, "Invalid argument"))
            b.sendfile_refused(OSError(errno.EINVAL, "Invalid argument"))
        assert b.sendfile_fd is None  # Commands.read then sends reads from memory
        assert b.fast_paths()["sendfile"] == "off"
        assert len([r for r in caplog.records if "sendfile refused" in r.getMessage()]) == 1
    finally:
        b.close()


def test_serving_processes_are_summed_per_state():
    # What a supervisor makes of its serving processes' reports (each decides for its own open
    # image): one process has met tmpfs's slow hole check, the other has not read yet.
    stats = WorkerStats()
    first = connection_totals(stats, [], {"disk": {"hole_check": "off", "sendfile": "on"}})
    second = connection_totals(stats, [], {"disk": {"hole_check": "on", "sendfile": "on"}})
    assert sorted(merge_totals([first, second])["fast_paths"]) == [
        ["disk", "hole_check", "off", 1],
        ["disk", "hole_check", "on", 1],
        ["disk", "sendfile", "on", 2],
    ]
