"""What the kernel's optional fast paths cost on the filesystem under one open image, measured
as they are used, so that one that is refused or slow there is given up instead of being paid
for on every request.

Each fast path is a probe that a request would otherwise repeat:

* the hole check of structured reads (`SEEK_DATA`/`SEEK_HOLE`): microseconds on ext4 and XFS,
  but tmpfs walks its page cache from the offset on, ~5 ms per call on a 1 GiB image. Timed on
  every use; once `HOLE_CHECK_WINDOW` checks in a row cost more than `HOLE_CHECK_BUDGET_NS`
  (the cheapest of them, so that one preemption on a busy machine does not count), reads stop
  checking for holes on this image. Block status, which the client asks for, still answers.
* `preadv2(RWF_NOWAIT)`, the page-cache test that lets hot reads skip the thread pool: tmpfs
  (and older kernels, some network and FUSE filesystems) refuse it. Then `ReadCost` decides
  from what recent reads took whether the next is done inline or in the pool.
* `sendfile` from the image: the reply queue falls back to `pread` for the range it refused,
  and the image stops offering it.

The decisions are per open image, logged when made, and reported by `FileBackend.fast_paths`
(the metric `nbdworker_export_fast_path`).
Nothing here is shared between threads beyond plain attributes: a racing update only makes a
decision one request later or sooner.
"""

from __future__ import annotations

import errno
import logging
import os

__all__ = [
    "HOLE_CHECK_BUDGET_NS",
    "HOLE_CHECK_WINDOW",
    "NOWAIT_REFUSED",
    "HoleCheckCost",
    "ReadCost",
    "filesystem_type",
]

log = logging.getLogger(__name__)

# A hole check worth doing costs well under a 64 KiB read (ext4: ~1 us for both lseeks, against
# ~7 us to copy 64 KiB); tmpfs: 1-7 ms on a 1 GiB image.
HOLE_CHECK_BUDGET_NS = 50_000
HOLE_CHECK_WINDOW = 8

# preadv2's answer when the file (or the kernel) cannot do RWF_NOWAIT; EAGAIN means "not cached".
NOWAIT_REFUSED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})

# A read that waited for storage, rather than copied from memory: longer than this base plus
# this much per byte (2 GB/s; a page-cache copy runs at 5-10 GB/s, a 4 KiB page in ~1 us).
READ_SLOW_BASE_NS = 50_000
READ_SLOW_NS_PER_KIB = 500
# After a slow read, this many reads go to the thread pool without being tried inline; a fast
# read in the pool ends that early.
COLD_READS = 32


class HoleCheckCost:
    """Whether the hole check of reads is still worth doing on one image."""

    __slots__ = ("cost_ns", "enabled", "label", "slow_streak")

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = True
        self.slow_streak = 0
        self.cost_ns = 0  # the cheapest check of the slow streak that turned it off

    def took(self, ns: int) -> None:
        if ns <= HOLE_CHECK_BUDGET_NS:
            self.slow_streak = 0
            return
        if not self.slow_streak or ns < self.cost_ns:
            self.cost_ns = ns
        self.slow_streak += 1
        if self.slow_streak >= HOLE_CHECK_WINDOW and self.enabled:
            self.enabled = False
            log.info(
                "%s: hole check of reads off: SEEK_DATA/SEEK_HOLE took %.2f ms or more, "
                "%d times in a row (budget %.2f ms)",
                self.label,
                self.cost_ns / 1e6,
                HOLE_CHECK_WINDOW,
                HOLE_CHECK_BUDGET_NS / 1e6,
            )


class ReadCost:
    """For an image whose filesystem refuses RWF_NOWAIT: whether a read is likely to be served
    from memory, judged by what the last reads took.

    Reads start inline (tmpfs, a RAM disk, a hot cache: no thread hop); one read that waited
    for storage sends the next `COLD_READS` to the thread pool, and a fast read there brings
    them back. An inline read that guessed wrong waits for storage once (the large reads' guess
    reads only their last page).
    """

    __slots__ = ("cold_left",)

    def __init__(self) -> None:
        self.cold_left = 0

    def inline(self) -> bool:
        """Whether to try the next read inline."""
        if self.cold_left:
            self.cold_left -= 1
            return False
        return True

    def took(self, ns: int, nbytes: int) -> bool:
        """Record one read of `nbytes` that took `ns`; True when it did not wait for storage."""
        if ns <= READ_SLOW_BASE_NS + (nbytes >> 10) * READ_SLOW_NS_PER_KIB:
            self.cold_left = 0
            return True
        self.cold_left = COLD_READS
        return False


def filesystem_type(fd: int) -> str:
    """The type of the filesystem `fd` lies on, as /proc/self/mountinfo names it (for logs:
    decisions are taken from measurements, never from this name)."""
    try:
        st = os.fstat(fd)
        if not os.path.exists("/proc/self/mountinfo"):
            return "unknown"
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == dev and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except (OSError, ValueError):
        pass
    return "unknown"
