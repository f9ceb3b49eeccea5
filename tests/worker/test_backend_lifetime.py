"""An export's open image is closed when the export is removed or replaced and its last
connection has ended; an image a config change did not touch keeps its descriptor (issue 19).

Against a real worker following its config in Redis: 1,000 config changes (description edits,
image replacements, removals and re-adds) while clients stay connected, with the worker's open
descriptors and RSS read from /proc; and a deleted image whose space comes back once its last
client has gone.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.nodekey import NODE_KEY_ENV, derive_node_key
from nbdworker.contract.snapshot import config_channel, config_key, sign_snapshot
from tests.support.fixtures import make_image
from tests.support.inprocess import serving
from tests.support.polling import poll
from tests.support.rawclient import RawClient
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.worker import RunningWorker, run_worker

SECRET = "backend-lifetime-secret"
IMAGE_SIZE = 1 << 20
CHANGES = 1000
# Descriptors the worker may open or close for reasons of its own between two samples
# (a Redis reconnect, a thread's eventfd); the leak this guards against was one per change.
FD_SLACK = 4
# RSS may wander with the allocator; the leak kept a backend object and a descriptor per change.
RSS_SLACK_KIB = 6 * 1024


def usage(pid: int) -> tuple[int, int]:
    """(open descriptors, RSS in KiB) of process `pid`."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    return fds, int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def open_inodes(pid: int) -> dict[int, int]:
    """inode -> allocated 512-byte blocks of each file the process has open."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        found[st.st_ino] = st.st_blocks
    return found


class Publisher:
    """Signs and publishes a node's snapshot as the web side does, and waits until the worker
    has applied it."""

    def __init__(self, server: PrivateRedis, node: str) -> None:
        self.redis = redis.Redis(port=server.port)
        self.node = node
        self.generation = 0
        self.worker: RunningWorker | None = None

    def publish(self, exports: list[dict]) -> None:
        self.generation += 1
        config = {"version": 1, "generation": self.generation, "node": self.node}
        config["exports"] = exports
        envelope = sign_snapshot(WorkerConfig.from_dict(config), derive_node_key(SECRET, self.node))
        start = self.worker.log_lines() if self.worker is not None else 0
        self.redis.set(config_key(self.node), envelope)
        self.redis.publish(config_channel(self.node), f"{self.node}:{self.generation}")
        if self.worker is not None:
            self.worker.wait_for_log(rf"config generation {self.generation} applied", start=start)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path / "redis") as server:
        yield server


def following_worker(redis_server: PrivateRedis, node: str, root: Path, tmp_path: Path):
    env = {
        "REDIS_URL": redis_server.url,
        NODE_KEY_ENV: derive_node_key(SECRET, node),
        "NBDWORKER_NODE": node,
        "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        "NBDWORKER_WORKERS": "1",
    }
    return run_worker(None, workdir=tmp_path / "w", storage_root=root, env=env)


def test_a_thousand_config_changes_leave_descriptors_and_rss_flat(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    names = [f"e{i}" for i in range(8)]
    for name in names:
        make_image(root / f"{name}.img", IMAGE_SIZE, name.encode())
        make_image(root / f"{name}-b.img", IMAGE_SIZE, f"{name}-b".encode())
    # e0..e1: description edits; e2..e3: their image swapped (a path change); e4..e5: their image
    # replaced by a new file at the same path (and the description edited, as a re-created
    # export's is); e6..e7: removed and added again.
    exports = {name: {"name": name, "path": str(root / f"{name}.img")} for name in names}
    present = set(names)
    node = f"lifetime-{os.getpid()}"
    publisher = Publisher(redis_server, node)
    choose = random.Random(19)

    def change(number: int) -> None:
        name = names[choose.randrange(len(names))]
        export = exports[name]
        kind = int(name[1:]) // 2
        if kind == 0:
            export["description"] = f"change {number}"
        elif kind == 1:
            suffix = "" if export["path"].endswith("-b.img") else "-b"
            export["path"] = str(root / f"{name}{suffix}.img")
        elif kind == 2:
            path = Path(export["path"])
            replacement = make_image(path.with_suffix(".new"), IMAGE_SIZE, name.encode())
            os.replace(replacement, path)
            export["description"] = f"re-created {number}"
        else:
            present.symmetric_difference_update({name})
        publisher.publish([exports[n] for n in names if n in present])

    publisher.publish([exports[n] for n in names])
    with following_worker(redis_server, node, root, tmp_path) as worker:
        publisher.worker = worker
        worker.wait_for_log(r"following nbdweb:config-changed")
        pid = worker.proc.pid
        # Clients in transmission through the whole run, on an export of each kind that keeps
        # its connections (a removal ends them).
        kept = names[:6:2]
        clients = [RawClient.open(worker.host, worker.port, name) for name in kept]
        try:
            for number in range(CHANGES // 5):
                change(number)
            settled = usage(pid)
            for number in range(CHANGES // 5, CHANGES):
                change(number)
            after = usage(pid)
            # Each client still reads what it opened, whatever happened to its export since.
            for client, name in zip(clients, kept, strict=True):
                assert client.read(0, len(name)).data == name.encode()
        finally:
            for client in clients:
                client.close()
        print(f"after {CHANGES // 5} changes: {settled}; after {CHANGES}: {after} (fds, RSS KiB)")
        assert after[0] <= settled[0] + FD_SLACK, (settled, after)
        assert after[1] <= settled[1] + RSS_SLACK_KIB, (settled, after)
        # Exports x (at most) the image of the current and of a client's generation, plus the
        # process's own: not one per change.
        assert after[0] < 80, after


def test_a_deleted_images_space_is_freed_when_its_last_client_disconnects(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    old = make_image(root / "old.img", 8 * IMAGE_SIZE, os.urandom(4 * IMAGE_SIZE))
    new = make_image(root / "new.img", 8 * IMAGE_SIZE, os.urandom(4 * IMAGE_SIZE))
    make_image(root / "other.img", IMAGE_SIZE, b"other")
    old_inode, new_inode = old.stat().st_ino, new.stat().st_ino
    other = {"name": "other", "path": str(root / "other.img")}
    node = f"freed-{os.getpid()}"
    publisher = Publisher(redis_server, node)
    publisher.publish([{"name": "disk", "path": str(old)}, other])
    with following_worker(redis_server, node, root, tmp_path) as worker:
        publisher.worker = worker
        worker.wait_for_log(r"following nbdweb:config-changed")
        pid = worker.proc.pid
        first = RawClient.open(worker.host, worker.port, "disk")
        second = RawClient.open(worker.host, worker.port, "disk")
        bystander = RawClient.open(worker.host, worker.port, "other")
        try:
            # A description edit, then the export's image replaced and the old one deleted:
            # its live clients keep reading it, and only they hold it.
            publisher.publish([{"name": "disk", "path": str(old), "description": "edited"}, other])
            publisher.publish([{"name": "disk", "path": str(new)}, other])
            old.unlink()
            first.close()
            assert open_inodes(pid).get(old_inode, 0) > 0  # the second client still holds it
            assert second.read(0, 512).error == 0
            second.close()
            poll(lambda: old_inode not in open_inodes(pid), "the deleted image closed")
            # Removed: the server ends the export's connections itself, then lets go of it.
            third = RawClient.open(worker.host, worker.port, "disk")
            publisher.publish([other])
            new.unlink()
            assert third.closed_by_server()
            third.close()
            poll(lambda: new_inode not in open_inodes(pid), "the removed export's image closed")
            assert bystander.read(0, 5).data == b"other"
        finally:
            for client in (first, second, bystander):
                client.close()


def test_a_description_edit_keeps_the_open_image_a_replaced_image_is_opened_anew(
    tmp_path: Path,
) -> None:
    path = make_image(tmp_path / "disk.img", IMAGE_SIZE, b"first")
    config = {"version": 1, "generation": 1, "exports": [{"name": "disk", "path": str(path)}]}
    with serving(config, tmp_path) as worker:
        before = worker.server.state.exports["disk"].backend
        worker.apply({**config, "generation": 2, "exports": [{**config["exports"][0],
                      "description": "edited"}]})  # fmt: skip
        entry = worker.server.state.exports["disk"]
        assert entry.backend is before
        assert entry.view.description == "edited"
        replacement = make_image(tmp_path / "disk.new", IMAGE_SIZE, b"second")
        os.replace(replacement, path)
        worker.apply({**config, "generation": 3, "exports": [{**config["exports"][0],
                      "description": "again"}]})  # fmt: skip
        assert worker.server.state.exports["disk"].backend is not before
        with RawClient.open("127.0.0.1", worker.port, "disk") as client:
            assert client.read(0, 6).data == b"second"
