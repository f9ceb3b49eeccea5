"""A worker's copy of its node's signed entries (nbdworker/contract/entries.py), kept up to date
at the cost of what changed.

`EntrySet.fetch(applied)` reads the head; when it follows the generation this set holds
(``head.previous``) and names what changed, only those fields are read (one Lua script: the
head again and the values, atomically, each value's length checked in Redis first), verified
off the event loop (a thread of the default executor), and the set's digest is updated by
their old and new MACs. Otherwise (start, a missed generation, a full rewrite, a digest that
does not match) the whole hash is read, bounded in Redis by `MAX_ENTRIES` and
`MAX_SNAPSHOT_BYTES` before anything is sent, and every entry verified. Either way the result
must match the signed head (count and digest) or nothing is applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.entries import (
    MAX_ENTRIES,
    MAX_ENTRY_BYTES,
    Entry,
    Head,
    assemble,
    entries_key,
    head_key,
    verify_entry,
    verify_head,
)
from nbdworker.contract.snapshot import MAX_SNAPSHOT_BYTES, SnapshotError

__all__ = ["CACHE_FORMAT", "EntrySet", "Update"]

log = logging.getLogger("nbdworker.configsource")

CACHE_FORMAT = "nbdweb-entries-cache-v1"
_TOO_LARGE = "!too-large"

# KEYS: head, entries. ARGV: max head bytes, max entries, max total bytes. Returns
# {head, status, field1, value1, ...}; status "ok", or why nothing more was sent.
_READ_ALL = """
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return {'!too-large', 'head'} end
local head = redis.call('GET', KEYS[1])
if not head then return {false, 'none'} end
if redis.call('HLEN', KEYS[2]) > tonumber(ARGV[2]) then return {head, 'too_many'} end
local all = redis.call('HGETALL', KEYS[2])
local total = 0
for i = 2, #all, 2 do total = total + string.len(all[i]) end
if total > tonumber(ARGV[3]) then return {head, 'too_large'} end
local out = {head, 'ok'}
for i = 1, #all do out[#out + 1] = all[i] end
return out
"""
# KEYS: head, entries. ARGV: max head bytes, max entry bytes, fields... Returns {head, value
# of each field (false when absent, "!too-large" when over the bound)}.
_READ_SOME = """
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return {'!too-large'} end
local out = {redis.call('GET', KEYS[1])}
for i = 3, #ARGV do
  if redis.call('HSTRLEN', KEYS[2], ARGV[i]) > tonumber(ARGV[2]) then
    out[#out + 1] = '!too-large'
  else
    out[#out + 1] = redis.call('HGET', KEYS[2], ARGV[i])
  end
end
return out
"""
MAX_HEAD_BYTES = 1 << 20


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


@dataclass(slots=True)
class Update:
    """A verified config to apply, and what to cache once it is applied."""

    config: WorkerConfig
    head: Head
    head_raw: str
    entries: dict[str, Entry]
    raw: dict[str, str]
    incremental: bool


class NoHead(Exception):
    """No head in Redis: the node's config is published as one snapshot (or not at all)."""


class EntrySet:
    def __init__(
        self,
        client: aioredis.Redis,
        node: str,
        key: str,
        on_rejected: Callable[[str], None],
    ) -> None:
        self.client = client
        self.node = node
        self.key = key
        self.on_rejected = on_rejected
        self.generation = 0  # of the entries below (0: none held)
        self.entries: dict[str, Entry] = {}
        self.raw: dict[str, str] = {}
        self.head_raw = ""

    def _refuse(self, origin: str, exc: SnapshotError) -> None:
        level = logging.INFO if exc.kind == "old_generation" else logging.ERROR
        log.log(level, "config from %s rejected: %s", origin, exc)
        self.on_rejected(exc.kind)

    def commit(self, update: Update) -> None:
        """`update` was applied: it is what this set holds now."""
        self.generation = update.config.generation
        self.entries, self.raw, self.head_raw = update.entries, update.raw, update.head_raw

    # -- reading ------------------------------------------------------------------------------

    async def fetch(self, applied: int, io_timeout: float | None = None) -> Update | None:
        """The next config from Redis if its generation is above `applied`, verified; None if
        there is none or it was refused (logged and counted). Raises NoHead, and TimeoutError
        when a Redis command takes longer than `io_timeout` (verifying is not bounded by it)."""
        loop = asyncio.get_running_loop()

        async def io(command):
            return await asyncio.wait_for(command, io_timeout)

        try:
            head_raw = _text(await io(self.client.getrange(head_key(self.node), 0, MAX_HEAD_BYTES)))
            if not head_raw:
                raise NoHead
            head = self._head(head_raw)
            if head is None or head.generation == applied:
                return None  # refused, or no news (a repeated notice, a reconnect)
            if head.generation < applied:
                self._refuse(
                    "Redis",
                    SnapshotError(
                        f"generation {head.generation} is older than {applied} (applied)",
                        "old_generation",
                    ),
                )
                return None
            if (
                head.changed is not None
                and head.previous == self.generation == applied
                and len(head.changed) <= MAX_ENTRIES
            ):
                reply = await io(
                    self.client.eval(
                        _READ_SOME,
                        2,
                        head_key(self.node),
                        entries_key(self.node),
                        MAX_HEAD_BYTES,
                        MAX_ENTRY_BYTES,
                        *head.changed,
                    )
                )
                if _text(reply[0]) == head_raw:
                    values = [_text(v) for v in reply[1:]]
                    update = await loop.run_in_executor(
                        None, self._apply_changes, head, head_raw, values
                    )
                    if update is not None:
                        return update
                # Published again meanwhile, or the changes do not add up: read it all.
            reply = await io(
                self.client.eval(
                    _READ_ALL,
                    2,
                    head_key(self.node),
                    entries_key(self.node),
                    MAX_HEAD_BYTES,
                    MAX_ENTRIES,
                    MAX_SNAPSHOT_BYTES,
                )
            )
        except ResponseError as exc:  # WRONGTYPE: someone stored another type there
            self._refuse("Redis", SnapshotError(str(exc)))
            return None
        return await loop.run_in_executor(None, self._read_all_reply, reply, applied)

    def _head(self, head_raw: str) -> Head | None:
        if head_raw == _TOO_LARGE:
            self._refuse("Redis", SnapshotError("head over its bound", "too_large"))
            return None
        try:
            return verify_head(head_raw, self.key, node=self.node)
        except SnapshotError as exc:
            self._refuse("Redis", exc)
            return None

    def _apply_changes(self, head: Head, head_raw: str, values: list[str | None]) -> Update | None:
        """The held entries with `head.changed` replaced (in the executor); None when they do
        not make the head's set (the caller reads everything)."""
        entries = dict(self.entries)
        raw = dict(self.raw)
        try:
            for field, value in zip(head.changed or (), values, strict=True):
                entries.pop(field, None)
                raw.pop(field, None)
                if value is None:
                    continue  # removed (the digest says whether by the publisher)
                if value == _TOO_LARGE:
                    raise SnapshotError(f"{field}: entry over {MAX_ENTRY_BYTES} bytes", "too_large")
                entry = verify_entry(value, self.key, node=self.node, field=field)
                if entry.generation != head.generation:
                    # Written by this generation's publish, or it is a replay.
                    raise SnapshotError(
                        f"{field}: generation {entry.generation}, the head's is "
                        f"{head.generation} (a replayed entry)",
                        "old_generation",
                    )
                entries[field] = entry
                raw[field] = value
            # The set held, with the changes, must be the head's set (count and digest).
            config = assemble(head, entries)
        except SnapshotError as exc:
            log.warning(
                "changed entries of generation %d refused (%s): reading all",
                head.generation,
                exc,
            )
            self.on_rejected(exc.kind)
            return None
        return Update(config, head, head_raw, entries, raw, incremental=True)

    def _read_all_reply(self, reply: list, applied: int) -> Update | None:
        head_raw = _text(reply[0])
        status = _text(reply[1]) if len(reply) > 1 else None
        if status == "none" or not head_raw:
            raise NoHead
        head = self._head(head_raw)
        if head is None:
            return None
        if status != "ok":
            self._refuse("Redis", SnapshotError(f"entries refused: {status}", "too_large"))
            return None
        if head.generation <= applied:
            return None
        values = reply[2:]
        raw = {_text(values[i]) or "": _text(values[i + 1]) or "" for i in range(0, len(values), 2)}
        return self._verify_all(head, head_raw, raw, "Redis")

    def _verify_all(
        self, head: Head, head_raw: str, raw: dict[str, str], origin: str
    ) -> Update | None:
        try:
            entries = {
                field: verify_entry(value, self.key, node=self.node, field=field)
                for field, value in raw.items()
            }
            config = assemble(head, entries)
        except SnapshotError as exc:
            self._refuse(origin, exc)
            return None
        return Update(config, head, head_raw, entries, raw, incremental=False)

    # -- the local cache ------------------------------------------------------------------------

    def cache_lines(self, update: Update) -> Iterator[bytes]:
        """The cache file, a line at a time: a header (format and head), then one JSON
        ``[field, entry]`` per line. Many small encodings, not one of megabytes: the thread
        writing it lets go of the GIL between them, so the event loop is never held up."""
        header = {"format": CACHE_FORMAT, "head": update.head_raw}
        yield json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        for field, value in list(update.raw.items()):
            yield json.dumps([field, value], separators=(",", ":"), ensure_ascii=False).encode()
            yield b"\n"

    def from_cache_lines(self, data: bytes, origin: str) -> Update | None:
        """The update a cache file written by `cache_lines` holds, verified as from Redis."""
        try:
            lines = data.split(b"\n")
            header = json.loads(lines[0])
            raw: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    field, value = json.loads(line)
                    raw[field] = value
        except (ValueError, TypeError, RecursionError) as exc:
            self._refuse(origin, SnapshotError(f"not an entries cache: {exc}"))
            return None
        if not isinstance(header, dict):
            self._refuse(origin, SnapshotError("not an entries cache"))
            return None
        return self.from_cache({"head": header.get("head"), "entries": raw}, origin)

    def from_cache(self, document: dict, origin: str) -> Update | None:
        head_raw, raw = document.get("head"), document.get("entries")
        if not isinstance(head_raw, str) or not isinstance(raw, dict):
            self._refuse(origin, SnapshotError("not an entries cache"))
            return None
        if not all(isinstance(v, str) for v in raw.values()):
            self._refuse(origin, SnapshotError("not an entries cache"))
            return None
        try:
            head = verify_head(head_raw, self.key, node=self.node)
        except SnapshotError as exc:
            self._refuse(origin, exc)
            return None
        return self._verify_all(head, head_raw, raw, origin)
