"""Connection counts shared by the serving processes of one worker.

`limits.max_connections` and an export's `max_connections` bound the whole worker, not each
serving process (nbdworker/supervisor.py): an admin who sets an export to one connection means
one writer. So the counts live in one shared memory file (memfd), which every serving process
maps; each process writes only its own region, and a check-then-count runs under a POSIX
record lock (`lockf`: per process, so it excludes the other serving processes).

Layout: one region of int64 per process: [connections, then SLOTS pairs (export key, count)].
An export's key is a 62-bit hash of its name, found by linear probing from `key % SLOTS`; a
slot keeps its key once used (count 0 when idle), so probes never break. With a single
process the same code runs on a private memfd.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os

__all__ = ["ConnectionSlots"]

log = logging.getLogger("nbdworker")

SLOTS = 4096
_NO_LOCK = contextlib.nullcontext()
_REGION = 1 + 2 * SLOTS  # int64 words per process


def export_key(name: str) -> int:
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 2) + 1  # never 0 (0 marks a free slot)


class ConnectionSlots:
    def __init__(self, fd: int, processes: int, index: int) -> None:
        self.fd = fd
        self.processes = processes
        self.index = index
        self._map = mmap.mmap(fd, processes * _REGION * 8)
        self._words = memoryview(self._map).cast("q")
        self._base = index * _REGION
        # Where this process's exports sit in its region (a cache of the probe).
        self._slot_of: dict[str, int] = {}
        self._table_full_logged = False

    @classmethod
    def create(cls, processes: int = 1) -> ConnectionSlots:
        """A new zeroed table for `processes` serving processes, as process 0."""
        fd = os.memfd_create("nbdworker-slots", 0)
        os.ftruncate(fd, processes * _REGION * 8)
        return cls(fd, processes, 0)

    def for_process(self, index: int) -> ConnectionSlots:
        return ConnectionSlots(self.fd, self.processes, index)

    # -- connections ----------------------------------------------------------------------------

    def connections(self, index: int | None = None) -> int:
        """Open connections of one serving process (default: this one)."""
        return self._words[(self.index if index is None else index) * _REGION]

    def total_connections(self) -> int:
        words = self._words
        return sum(words[i * _REGION] for i in range(self.processes))

    def try_open_connection(self, limit: int) -> bool:
        with self._locked():
            if self.total_connections() >= limit:
                return False
            self._words[self._base] += 1
            return True

    def close_connection(self) -> None:
        with self._locked():
            self._words[self._base] -= 1

    def least_loaded(self) -> bool:
        """Whether no other serving process has fewer connections than this one."""
        words = self._words
        mine = words[self._base]
        return all(words[i * _REGION] >= mine for i in range(self.processes))

    def reset(self, index: int) -> None:
        """Forget the counts of a serving process that died (its connections died with it)."""
        base = index * _REGION
        with self._locked():
            self._words[base : base + _REGION] = memoryview(bytes(_REGION * 8)).cast("q")

    # -- exports --------------------------------------------------------------------------------

    def export_connections(self, name: str) -> int:
        """Connections to `name` across every serving process."""
        key = export_key(name)
        return sum(self._count(i, key) for i in range(self.processes))

    def open_export(self, name: str) -> None:
        with self._locked():
            slot = self._slot(name)
            if slot is not None:
                self._words[slot + 1] += 1

    def close_export(self, name: str) -> None:
        slot = self._slot_of.get(name)
        if slot is not None:
            with self._locked():
                self._words[slot + 1] -= 1

    def _probe(self, index: int, key: int) -> int | None:
        """Where `key` is in process `index`'s table, or the free slot it would take; None
        when the table is full."""
        words = self._words
        base = index * _REGION + 1
        start = key % SLOTS
        for probe in range(SLOTS):
            at = base + 2 * ((start + probe) % SLOTS)
            found = words[at]
            if found == key or found == 0:
                return at
        return None

    def _count(self, index: int, key: int) -> int:
        at = self._probe(index, key)
        return self._words[at + 1] if at is not None and self._words[at] == key else 0

    def _slot(self, name: str) -> int | None:
        """This process's slot for `name`, claimed on first use (under the caller's lock)."""
        slot = self._slot_of.get(name)
        if slot is not None:
            return slot
        key = export_key(name)
        slot = self._probe(self.index, key)
        if slot is not None:
            self._words[slot] = key
            self._slot_of[name] = slot
        elif not self._table_full_logged:
            self._table_full_logged = True
            log.error("more than %d exports opened: their connection limits are not counted", SLOTS)
        return slot

    def _locked(self) -> _Lock | contextlib.nullcontext:
        # One process has no one to exclude: the lock's two syscalls are saved per count.
        return _Lock(self.fd) if self.processes > 1 else _NO_LOCK


class _Lock:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
