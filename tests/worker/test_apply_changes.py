"""A config change is applied at the cost of what changed (issue 19): `NBDServer.apply_config`
with the changed export names compares, opens and fstat's only those; the config source passes
those names; a supervisor sends serving processes only the changed exports.

The cost is counted at the unit's edge, the `os` calls that touch an image (open, stat, fstat),
and compared between a 10-export and a 10,000-export worker: no timing."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdworker import server as server_module
from nbdworker.contract.config import ConfigError, WorkerConfig
from nbdworker.contract.nodekey import NODE_KEY_ENV, derive_node_key
from nbdworker.server import NBDServer
from nbdworker.settings import WorkerSettings
from nbdworker.supervisor import changes_message, config_with_changes
from tests.support.entries import publish_entries
from tests.support.pki import make_pki, tls_config_dict
from tests.support.polling import poll
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.worker import run_worker
from tests.worker.test_configsource import SECRET, Recorder, make_source

BIG = 10_000


def export(root: Path, i: int, description: str = "", image: str | None = None) -> dict:
    return {
        "name": f"e{i}",
        "backend": "file",
        "path": str(root / (image or f"e{i}.img")),
        "description": description,
    }


def images(root: Path, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with open(root / f"e{i}.img", "wb") as f:
            f.truncate(4096)


def config(exports: list[dict], generation: int) -> WorkerConfig:
    return WorkerConfig.from_dict({"version": 1, "generation": generation, "exports": exports})


class ImageCalls:
    """Counts the `os` calls that reach an image: open, stat and fstat."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for name in ("open", "stat", "lstat", "fstat"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._counting(name, real))

    def _counting(self, name: str, real):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return real(*args, **kwargs)

        return call


def one_change_cost(root: Path, count: int, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The image calls of one apply (an edit, a new image, a removal, an addition) on a worker
    serving `count` file exports; checks that every other export kept its entry."""
    images(root, count + 1)
    with open(root / "e1-b.img", "wb") as f:
        f.truncate(8192)
    settings = WorkerSettings.from_sources([str(root)], ["127.0.0.1:0"], environ={})
    before = [export(root, i) for i in range(count)]
    server = NBDServer(settings, config(before, 1))
    try:
        assert len(server.state.exports) == count
        kept = dict(server.state.exports)
        after = list(before)
        after[0] = export(root, 0, "a new description")
        after[1] = export(root, 1, image="e1-b.img")
        del after[2]
        after.append(export(root, count))
        changed = {"e0", "e1", "e2", f"e{count}"}
        with monkeypatch.context() as m:
            calls = ImageCalls(m)
            server.apply_config(config(after, 2), changed)
        exports = server.state.exports
        assert [e.config.description for e in (exports["e0"],)] == ["a new description"]
        assert exports["e0"].backend is kept["e0"].backend  # a description edit keeps the image
        assert exports["e1"].backend.size == 8192  # the new image, opened
        assert "e2" not in exports and f"e{count}" in exports
        untouched = [n for n in kept if n not in changed]
        assert all(exports[n] is kept[n] for n in untouched)
        assert list(exports) == [e["name"] for e in after]
        # The images no export serves any more are closed (no connection holds them), the
        # others held once: by the generation now current.
        assert server.backend_holds.open_backends == len(exports)
        for gone in (kept["e1"].backend, kept["e2"].backend):
            with pytest.raises(OSError):
                os.fstat(gone.fd)
        return calls.calls
    finally:
        server.executor.shutdown()
        server.serving_threads.shutdown()


def test_one_change_on_10000_exports_touches_only_the_changed_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = one_change_cost(tmp_path / "small", 10, monkeypatch)
    big = one_change_cost(tmp_path / "big", BIG, monkeypatch)
    assert sum(small.values()) > 0
    assert big == small


def test_without_the_changed_names_every_image_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The counting sees what the delta spares: a full apply (start, resync) fstat's each image.
    root = tmp_path / "images"
    images(root, 100)
    settings = WorkerSettings.from_sources([str(root)], ["127.0.0.1:0"], environ={})
    exports = [export(root, i) for i in range(100)]
    server = NBDServer(settings, config(exports, 1))
    try:
        with monkeypatch.context() as m:
            calls = ImageCalls(m)
            server.apply_config(config(exports, 2))
        assert calls.calls["fstat"] >= 100
    finally:
        server.executor.shutdown()
        server.serving_threads.shutdown()


def test_a_new_tls_mode_compares_every_export_even_with_names(tmp_path: Path) -> None:
    # tls_required exports are refused under OPTIONALTLS: a mode change may refuse any export,
    # so the names of the changed entries do not bound what it affects.
    root = tmp_path / "images"
    images(root, 3)
    pki = make_pki(tmp_path / "pki")
    settings = WorkerSettings.from_sources([str(root)], ["127.0.0.1:0"], environ={})
    exports = [{**export(root, i), "tls_required": True} for i in range(3)]

    def under(mode: str, generation: int) -> WorkerConfig:
        return WorkerConfig.from_dict(
            {
                "version": 1,
                "generation": generation,
                "exports": exports,
                "tls": tls_config_dict(pki, mode),
            }
        )

    server = NBDServer(settings, under("SELECTIVETLS", 1))
    try:
        assert len(server.state.exports) == 3
        server.apply_config(under("OPTIONALTLS", 2), frozenset())
        assert server.state.exports == {}
    finally:
        server.executor.shutdown()
        server.serving_threads.shutdown()


def test_apply_changes_opens_the_changed_images_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    images(root, 4)
    settings = WorkerSettings.from_sources([str(root)], ["127.0.0.1:0"], environ={})
    before = [export(root, i) for i in range(3)]
    after = [*before, export(root, 3)]
    opened_in: list[str] = []
    real_open_image = server_module.open_image

    def recording_open_image(*args, **kwargs):
        opened_in.append(threading.current_thread().name)
        return real_open_image(*args, **kwargs)

    async def main() -> None:
        server = NBDServer(settings, config(before, 1))
        monkeypatch.setattr(server_module, "open_image", recording_open_image)
        try:
            await server.apply_changes(config(after, 2), {"e3"})
            assert "e3" in server.state.exports and server.state.config.generation == 2
        finally:
            server.executor.shutdown()
            server.serving_threads.shutdown()

    asyncio.run(main())
    assert len(opened_in) == 1 and opened_in[0].startswith("nbdio")


def test_an_image_opened_for_a_superseded_config_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another config applied while the executor opened the images: the changes are applied
    # again on the loop over it, and the image opened for nothing does not stay open.
    root = tmp_path / "images"
    images(root, 4)
    settings = WorkerSettings.from_sources([str(root)], ["127.0.0.1:0"], environ={})
    before = [export(root, i) for i in range(3)]
    opening, go_on = threading.Event(), threading.Event()
    fds: list[int] = []
    real_open_image = server_module.open_image

    def held_open_image(*args, **kwargs):
        fd = real_open_image(*args, **kwargs)
        fds.append(fd)
        if threading.current_thread().name.startswith("nbdio"):
            opening.set()
            assert go_on.wait(10)
        return fd

    async def main() -> None:
        server = NBDServer(settings, config(before, 1))
        monkeypatch.setattr(server_module, "open_image", held_open_image)
        try:
            descriptors = len(os.listdir("/proc/self/fd"))
            task = asyncio.create_task(
                server.apply_changes(config([*before, export(root, 3)], 3), {"e3"})
            )
            while not opening.is_set():
                await asyncio.sleep(0.01)
            server.apply_config(config(before[:2], 2), {"e2"})
            go_on.set()
            await task
            assert sorted(server.state.exports) == ["e0", "e1", "e3"]
            assert len(fds) == 2  # opened in the executor, then again on the loop
            # e2's image closed, e3's open once: the one opened for generation 1 went.
            assert len(os.listdir("/proc/self/fd")) == descriptors
        finally:
            server.executor.shutdown()
            server.serving_threads.shutdown()

    asyncio.run(main())


# -- the config source --------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path / "redis") as server:
        yield server


def memory(name: str, description: str = "") -> dict:
    return {"name": name, "backend": "memory", "size": 1 << 20, "description": description}


def test_the_source_passes_the_names_its_changed_entries_held_and_hold(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    node = "apply-changes"
    r = redis_server.client()
    key = derive_node_key(SECRET, node)
    publish_entries(r, node, key, {f"export:{i}": memory(f"e{i}") for i in range(50)})
    rec = Recorder()
    changes: list[tuple[int, frozenset[str]]] = []

    async def main() -> None:
        source = make_source(redis_server.url, node, tmp_path / "state", rec)

        async def apply_changes(config: WorkerConfig, names: frozenset[str]) -> None:
            changes.append((config.generation, names))

        source.apply_changes = apply_changes
        try:
            await source.initial()
            # An edit, a rename, a removal and an addition.
            head = publish_entries(
                r,
                node,
                key,
                {
                    "export:1": memory("e1", "edited"),
                    "export:2": memory("renamed"),
                    "export:3": None,
                    "export:99": memory("new"),
                },
            )
            assert await source.fetch() is True
            assert changes == [(head.generation, frozenset({"e1", "e2", "renamed", "e3", "new"}))]
        finally:
            await source.client.aclose()

    asyncio.run(main())
    assert rec.applied == []  # every update after the start was read as changes


# -- the supervisor's link ------------------------------------------------------------------------


def test_changes_message_carries_only_the_changed_exports() -> None:
    before = WorkerConfig.from_dict(
        {"version": 1, "generation": 4, "exports": [memory(f"e{i}") for i in range(1000)]}
    )
    exports = [memory(f"e{i}") for i in range(1000)]
    exports[5] = memory("e5", "edited")
    exports[6] = memory("renamed")
    del exports[7]
    exports.append(memory("new"))
    after = WorkerConfig.from_dict({"version": 1, "generation": 5, "exports": exports})
    message = changes_message(before, after, {"e5", "e6", "renamed", "e7", "new"})
    assert message["previous"] == 4
    assert sorted(e["name"] for e in message["exports"]) == ["e5", "new", "renamed"]
    assert message["removed"] == ["e6", "e7"]
    rebuilt = config_with_changes(before, message)
    assert rebuilt.generation == 5
    # The same exports; a renamed one comes last in the serving process's list.
    assert sorted(rebuilt.exports, key=lambda e: e.name) == sorted(
        after.exports, key=lambda e: e.name
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m.update(removed="e1"),
        lambda m: m.update(exports=[memory("x"), memory("x")]),
        lambda m: m["config"].update(default_export="nowhere"),
        lambda m: m["exports"].append({"name": 7}),
    ],
)
def test_a_malformed_changes_message_is_refused(damage) -> None:
    before = WorkerConfig.from_dict(
        {"version": 1, "generation": 1, "exports": [memory("e0"), memory("e1")]}
    )
    after = WorkerConfig.from_dict(
        {"version": 1, "generation": 2, "exports": [memory("e0", "x"), memory("e1")]}
    )
    message = changes_message(before, after, {"e0"})
    damage(message)
    with pytest.raises((ConfigError, KeyError, TypeError)):
        config_with_changes(before, message)


def test_serving_processes_apply_the_changes_a_supervisor_sends(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    node = "apply-supervised"
    r = redis_server.client()
    key = derive_node_key(SECRET, node)
    publish_entries(r, node, key, {f"export:{i}": memory(f"e{i}") for i in range(20)})
    env = {
        "REDIS_URL": redis_server.url,
        NODE_KEY_ENV: key,
        "NBDWORKER_NODE": node,
        "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        "NBDWORKER_WORKERS": "2",
    }
    with run_worker(None, workdir=tmp_path / "w", env=env) as worker:
        worker.wait_for_log(r"following .* \(generation 1\)")
        start = worker.log_lines()
        head = publish_entries(r, node, key, {"export:3": memory("e3", "edited"), "export:4": None})
        pattern = rf"config generation {head.generation} applied: 19 export\(s\) served"

        def since_start() -> str:
            return "".join(worker.log.splitlines(True)[start:])

        poll(
            lambda: len(re.findall(pattern, since_start())) == 2,
            what="both serving processes applied the change",
        )
        tail = since_start()
        # Each process was sent the changes, not the config, and opened only the edited export
        # again; nobody resynced.
        changes = (
            rf"generation {head.generation} from the supervisor: 1 export\(s\) changed, 1 removed"
        )
        assert len(re.findall(changes, tail)) == 2
        assert len(re.findall(r"export 'e3': memory backend", tail)) == 2
        assert "export 'e5'" not in tail
        assert "asked for the whole config" not in tail
