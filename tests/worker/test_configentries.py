"""nbdworker/configentries.py (through ConfigSource) and nbdworker/contract/entries.py against a
real, private redis-server: a change is read as the entries it names, verified off the event
loop; a Redis writer without the node's key can neither inject, replay nor drop an entry
unnoticed."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Iterator

import pytest

from nbdworker.contract.entries import (
    MAX_ENTRY_BYTES,
    Head,
    entries_key,
    head_key,
    sign_entry,
    sign_head,
)
from nbdworker.contract.nodekey import derive_node_key
from nbdworker.contract.snapshot import SnapshotError
from tests.support.entries import publish_entries, read_config, read_head
from tests.support.redisserver import PrivateRedis, private_redis
from tests.worker.test_configsource import SECRET, Recorder, make_source

_names = itertools.count()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def node() -> str:
    return f"ce-{os.getpid()}-{next(_names)}"


def body(name: str, description: str = "") -> dict:
    return {"name": name, "backend": "memory", "size": 1 << 20, "description": description}


def many(count: int) -> dict[str, dict]:
    return {f"export:{i}": body(f"e{i}") for i in range(count)}


def run_source(shared_redis, node, tmp_path, rec, steps) -> None:
    """Start a ConfigSource for `node`, then for each step: do it, fetch, and check."""

    async def main() -> None:
        source = make_source(shared_redis.url, node, tmp_path / "state", rec)
        try:
            await source.initial()
            for step in steps:
                await step(source)
        finally:
            await source.client.aclose()

    asyncio.run(main())


def test_a_change_reads_only_the_entries_it_names(shared_redis, node, tmp_path, caplog) -> None:
    r = shared_redis.client()
    key = derive_node_key(SECRET, node)
    publish_entries(r, node, key, many(300))
    rec = Recorder()
    reads: list[tuple] = []

    async def edit_one(source) -> None:
        assert len(source.entry_set.entries) == 301  # 300 exports and the TLS section
        real_eval = source.client.eval

        async def counting_eval(script, numkeys, *args):
            reads.append(args[numkeys + 2 :] if "HSTRLEN" in script else ("all",))
            return await real_eval(script, numkeys, *args)

        source.client.eval = counting_eval
        head = publish_entries(r, node, key, {"export:7": body("e7", "new text")})
        with caplog.at_level(logging.INFO, logger="nbdworker.configsource"):
            assert await source.fetch() is True
        assert rec.applied[-1].generation == head.generation
        assert rec.applied[-1].export("e7").description == "new text"
        assert len(rec.applied[-1].exports) == 300
        # Removed, and added, the same way.
        publish_entries(r, node, key, {"export:8": None, "export:1000": body("new")})
        assert await source.fetch() is True
        names = {e.name for e in rec.applied[-1].exports}
        assert "e8" not in names and "new" in names

    run_source(shared_redis, node, tmp_path, rec, [edit_one])
    assert reads == [("export:7",), ("export:1000", "export:8")]
    assert "from 1 changed entries" in caplog.text
    assert rec.rejected == []


def test_an_entry_signed_with_another_key_is_refused(shared_redis, node, tmp_path) -> None:
    r = shared_redis.client()
    key = derive_node_key(SECRET, node)
    head = publish_entries(r, node, key, many(3))
    genuine_head = r.get(head_key(node))
    rec = Recorder()

    async def inject(source) -> None:
        forged, _ = sign_entry(node, "export:9", head.generation + 1, body("evil"), "other")
        r.hset(entries_key(node), "export:9", forged)
        # Under a head of its own making: the head is refused.
        fake = Head(node, head.generation + 1, head.generation, 5, 0, ("export:9",))
        r.set(head_key(node), sign_head(fake, "other"))
        assert await source.fetch() is False
        # Swapped in for a genuine change: the entry is refused.
        r.set(head_key(node), genuine_head)
        r.hdel(entries_key(node), "export:9")
        publish_entries(r, node, key, {"export:9": body("fine")})
        r.hset(entries_key(node), "export:9", forged)
        assert await source.fetch() is False

    run_source(shared_redis, node, tmp_path, rec, [inject])
    assert rec.rejected.count("bad_signature") >= 2
    assert all(e.name != "evil" for config in rec.applied for e in config.exports)


def test_a_deleted_entry_is_told_from_a_removed_export(shared_redis, node, tmp_path) -> None:
    """The attacker HDELs a served export's entry: the set no longer matches the head's count
    and digest, so a worker reading it refuses it (and keeps what it runs); an export the web
    side removed is in the head's `changed` and its count and digest."""
    r = shared_redis.client()
    key = derive_node_key(SECRET, node)
    publish_entries(r, node, key, many(3))
    r.hdel(entries_key(node), "export:1")
    rec = Recorder()

    async def start(source) -> None:
        pass

    run_source(shared_redis, node, tmp_path / "fresh", rec, [start])
    assert rec.rejected == ["digest_mismatch"]


def test_a_replayed_older_entry_is_refused(shared_redis, node, tmp_path) -> None:
    r = shared_redis.client()
    key = derive_node_key(SECRET, node)
    publish_entries(r, node, key, {"export:1": body("e1", allowed := "open to all")})
    old_value = r.hget(entries_key(node), "export:1")
    rec = Recorder()

    async def replay(source) -> None:
        applied = source.generation
        head = publish_entries(r, node, key, {"export:1": body("e1", "tightened")})
        # The attacker puts the older, genuinely signed, entry back before the worker reads.
        r.hset(entries_key(node), "export:1", old_value)
        assert await source.fetch() is False
        assert source.generation == applied
        assert head.generation > applied

    run_source(shared_redis, node, tmp_path, rec, [replay])
    assert rec.rejected[0] == "old_generation"  # the changed entry is not this generation's
    assert "digest_mismatch" in rec.rejected  # and read whole, the set is not the head's
    assert all(c.export("e1").description == allowed for c in rec.applied)


def test_an_entry_moved_to_another_field_is_refused(shared_redis, node) -> None:
    from nbdworker.contract.entries import verify_entry

    key = derive_node_key(SECRET, node)
    value, _ = sign_entry(node, "export:1", 5, body("e1"), key)
    with pytest.raises(SnapshotError, match="found at 'export:2'"):
        verify_entry(value, key, node=node, field="export:2")
    with pytest.raises(SnapshotError) as refused:
        verify_entry(value, key, node="another-node", field="export:1")
    assert refused.value.kind == "other_node"
    for field in ("bogus", "export:", "export:-1", "export:\u0661", "export:" + "9" * 21):
        odd, _ = sign_entry(node, field, 5, body("e1"), key)
        with pytest.raises(SnapshotError, match="unknown field"):
            verify_entry(odd, key, node=node, field=field)


def test_an_oversized_entry_is_not_read(shared_redis, node, tmp_path) -> None:
    r = shared_redis.client()
    key = derive_node_key(SECRET, node)
    head = publish_entries(r, node, key, many(2))
    rec = Recorder()

    async def oversize(source) -> None:
        # The changed entry is huge: Redis answers its length alone, the worker refuses.
        r.hset(entries_key(node), "export:0", b"x" * (MAX_ENTRY_BYTES + 1))
        r.set(
            head_key(node),
            sign_head(Head(node, head.generation + 1, head.generation, 3, 0, ("export:0",)), key),
        )
        assert await source.fetch() is False

    run_source(shared_redis, node, tmp_path, rec, [oversize])
    assert "too_large" in rec.rejected


def test_the_cache_holds_the_entries_and_a_restart_starts_from_it(
    shared_redis, node, tmp_path
) -> None:
    r = shared_redis.client()
    key = derive_node_key(SECRET, node)
    publish_entries(r, node, key, many(4))
    rec = Recorder()

    async def change_then_stop(source) -> None:
        publish_entries(r, node, key, {"export:2": body("e2", "cached")})
        assert await source.fetch() is True
        source._cache_writer.shutdown(wait=True)  # the background write is done

    run_source(shared_redis, node, tmp_path, rec, [change_then_stop])
    expected = read_config(r, node, key)
    assert read_head(r, node, key).generation == expected.generation
    r.delete(head_key(node), entries_key(node))  # Redis lost its data

    async def from_cache() -> None:
        source = make_source(shared_redis.url, node, tmp_path / "state", Recorder())
        try:
            config = await source.initial()
        finally:
            await source.client.aclose()
        assert config.generation == expected.generation
        assert config.export("e2").description == "cached"

    asyncio.run(from_cache())
