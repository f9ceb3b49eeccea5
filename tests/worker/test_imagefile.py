"""Opening an export's image: only a regular file proven to lie under a storage root is served,
whatever the storage directory does meanwhile (nbdworker/imagefile.py, through the server's
`_open_backend`)."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdworker.contract.config import ConfigError, ExportConfig, WorkerConfig
from nbdworker.contract.imageidentity import OWNER_XATTR, identity_of
from nbdworker.contract.nodekey import derive_node_key
from nbdworker.contract.snapshot import config_channel, config_key, sign_snapshot
from nbdworker.imagefile import ImageRefused, RefusalReason, open_image
from nbdworker.protocol import Reply
from nbdworker.server import _open_backend
from nbdworker.settings import WorkerSettings
from tests.support.metrics import scrape, value
from tests.support.rawclient import RawClient
from tests.support.redisserver import private_redis
from tests.support.worker import run_worker

INSIDE = b"inside the root!" * 256
OUTSIDE = b"OUTSIDE THE ROOT" * 256
# Bounds of the race: whichever comes first.
RACE_OPENS = 3000
RACE_SECONDS = 6.0


def settings_for(root: Path) -> WorkerSettings:
    return WorkerSettings.from_sources([str(root)], ["127.0.0.1:0"], environ={})


def file_export(path: Path | str, read_only: bool = False) -> ExportConfig:
    return ExportConfig(name="img", backend="file", path=str(path), read_only=read_only)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/d/img holds INSIDE; outside/img holds OUTSIDE."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "img").write_bytes(INSIDE)
    (outside / "img").write_bytes(OUTSIDE)
    return root, outside


class Flipper:
    """A thread that turns a directory entry into a symlink to outside and back, as fast as it
    can (renames, so the entry is always one or the other, or briefly absent)."""

    def __init__(self, entry: Path, link_target: Path) -> None:
        self.entry = entry
        self.parked = entry.with_name(entry.name + ".parked")
        self.alt = entry.with_name(entry.name + ".alt")
        os.symlink(link_target, self.alt)
        self.stop = threading.Event()
        self.flips = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            os.rename(self.entry, self.parked)
            os.rename(self.alt, self.entry)  # now a symlink to outside
            os.rename(self.entry, self.alt)
            os.rename(self.parked, self.entry)  # the real one again
            self.flips += 1

    def __enter__(self) -> Flipper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def race(settings: WorkerSettings, cfg: ExportConfig) -> Iterator[str]:
    """Open the export again and again (bounded in count and time); yield what each open
    serves: "inside", "outside" or "refused"."""
    deadline = time.monotonic() + RACE_SECONDS
    for _ in range(RACE_OPENS):
        if time.monotonic() > deadline:
            break
        backend = _open_backend(cfg, settings)
        if backend is None:  # refused: the safe outcome
            yield "refused"
            continue
        try:
            data = backend.read_bytes(0, len(INSIDE))
        finally:
            backend.close()
        yield {INSIDE: "inside", OUTSIDE: "outside"}.get(data, "other")


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
@pytest.mark.parametrize("flipped", ["directory", "file"])
def test_a_flipping_entry_never_serves_the_outside_file(tree, read_only, flipped) -> None:
    """The race of the issue: root/d (or root/d/img) flips between the real thing and a symlink
    to outside while the export is opened again and again. Before, about 1 open in 150 served
    the outside file (and some raised from os.path.realpath)."""
    root, outside = tree
    settings = settings_for(root)
    cfg = file_export(root / "d" / "img", read_only=read_only)
    if flipped == "directory":
        entry, target = root / "d", outside
    else:
        entry, target = root / "d" / "img", outside / "img"
    served = {"inside": 0, "refused": 0, "outside": 0}
    with Flipper(entry, target) as flipper:
        for what in race(settings, cfg):
            served[what] = served.get(what, 0) + 1
    assert flipper.flips > 0
    assert served["outside"] == 0, served
    assert served["inside"] > 0, served  # the race did run through successful opens
    assert set(served) == {"inside", "refused", "outside"}, served
    assert (root / "d" / "img").read_bytes() == INSIDE


def test_opening_a_fifo_does_not_block(tmp_path) -> None:
    """A FIFO with no writer: open() blocked forever (and with it the whole worker)."""
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo")
    result: list[object] = []
    # In a thread, so a regression fails the test instead of hanging it.
    t = threading.Thread(
        target=lambda: result.append(
            _open_backend(file_export(root / "fifo", read_only=True), settings_for(root))
        ),
        daemon=True,
    )
    t.start()
    t.join(10)
    if t.is_alive():
        # Unblock the opener so the thread ends: open the FIFO's other side.
        with open(root / "fifo", "wb"):
            pass
        t.join(5)
        pytest.fail("opening a FIFO blocked")
    assert result == [None]


def hostile_tree(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A storage root with one good image and every kind of entry that must not be served:
    {export name: (path, refusal reason)}."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    (images / "good.img").write_bytes(INSIDE)
    (images / "sub" / "x.img").write_bytes(INSIDE)
    (outside / "secret.img").write_bytes(OUTSIDE)
    (images / "linkdir").symlink_to(outside)
    (images / "alias").symlink_to(images / "sub")  # a symlink even to inside is refused
    (images / "link.img").symlink_to(outside / "secret.img")
    os.mkfifo(images / "fifo.img")
    os.mknod(images / "null.img", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(images / "sock.img"))
    sock.close()
    os.link(outside / "secret.img", images / "hard.img")
    hostile = {
        "dir-symlink": (f"{images}/linkdir/secret.img", "symlink"),
        "inner-symlink": (f"{images}/alias/x.img", "symlink"),
        "file-symlink": (f"{images}/link.img", "symlink"),
        "dotdot": (f"{images}/sub/../good.img", "bad_path"),
        "dotdot-out": (f"{images}/../outside/secret.img", "bad_path"),
        "fifo-ro": (f"{images}/fifo.img", "not_regular"),
        "fifo-rw": (f"{images}/fifo.img", "not_regular"),
        "device": (f"{images}/null.img", "not_regular"),
        "socket": (f"{images}/sock.img", "not_regular"),
        "directory": (f"{images}/sub", "not_regular"),
        "hard-link": (f"{images}/hard.img", "hard_link"),
        "outside": (f"{outside}/secret.img", "outside_roots"),
        "missing": (f"{images}/nothing.img", "missing"),
    }
    return images, hostile


def test_hostile_entries_are_refused_logged_and_counted(worker_factory, tmp_path) -> None:
    """Each hostile entry is refused with its own log line and counted by reason; the worker
    starts (a FIFO blocked it forever before) and serves the good image."""
    images, hostile = hostile_tree(tmp_path)
    exports = [{"name": "good", "backend": "file", "path": f"{images}/good.img"}]
    for name, (path, _reason) in hostile.items():
        exports.append(
            {"name": name, "backend": "file", "path": path, "read_only": name.endswith("-ro")}
        )
    worker = worker_factory(
        {"exports": exports}, storage_root=images, args=["--metrics-listen", "127.0.0.1:0"]
    )
    for name in hostile:
        worker.wait_for_log(rf"export '{name}' refused: ")
    with RawClient(worker.host, worker.port) as c:
        c.greet()
        for name in hostile:
            assert c.refused_go(name).reply == Reply.ERR_UNKNOWN
    with RawClient.open(worker.host, worker.port, "good") as c:
        assert c.read(0, len(INSIDE)).data == INSIDE
    samples = scrape(worker)
    want: dict[str, int] = {}
    for _path, reason in hostile.values():
        want[reason] = want.get(reason, 0) + 1
    got = {r: value(samples, "nbdworker_exports_refused_total", reason=r) for r in want}
    assert got == want
    assert (tmp_path / "outside" / "secret.img").read_bytes() == OUTSIDE


def test_a_root_named_through_a_symlink_still_serves(worker_factory, tmp_path) -> None:
    """The operator's own root may be a symlink (resolved once at start); only what lies
    beneath it is distrusted."""
    real = tmp_path / "real-images"
    real.mkdir()
    (real / "disk.img").write_bytes(INSIDE)
    (tmp_path / "images").symlink_to(real)
    export = {"name": "disk", "backend": "file", "path": f"{tmp_path}/images/disk.img"}
    worker = worker_factory({"exports": [export]}, storage_root=tmp_path / "images")
    with RawClient.open(worker.host, worker.port, "disk") as c:
        assert c.read(0, len(INSIDE)).data == INSIDE


RELOADS = 15
RELOAD_SECRET = "imagefile-test-secret"
RELOAD_EXPORTS = 30  # half writable, half read-only


def test_configs_applied_while_a_directory_flips_never_serve_the_outside_file(tmp_path) -> None:
    """The issue's reproduction, end to end: a worker following Redis is sent new signed
    configs (every export changed, so every image is opened again) while a directory of the
    storage root flips between itself and a symlink to outside; a client reads every export
    each generation serves. Before, applying such a config could fail as a whole (the
    realpath check raised when the entry changed under it) and, when it went through, about one
    open in 150 served the outside file."""
    root, outside = tmp_path / "images", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    for i in range(RELOAD_EXPORTS):
        (root / "d" / f"{i}.img").write_bytes(INSIDE)
        (outside / f"{i}.img").write_bytes(OUTSIDE)
    node = f"flip-{os.getpid()}"

    def config(generation: int) -> str:
        exports = [
            {
                "name": f"e{i}",
                "backend": "file",
                "path": f"{root}/d/{i}.img",
                "read_only": i % 2 == 1,
                "description": f"generation {generation}",  # changed: opened again
            }
            for i in range(RELOAD_EXPORTS)
        ]
        snapshot = {"version": 1, "generation": generation, "node": node, "exports": exports}
        return sign_snapshot(WorkerConfig.from_dict(snapshot), derive_node_key(RELOAD_SECRET, node))

    served = {"inside": 0, "outside": 0}
    with private_redis(tmp_path / "redis") as server:
        r = server.client()
        r.set(config_key(node), config(1))
        env = {
            "REDIS_URL": server.url,
            "NBDWEB_CONFIG_SECRET": RELOAD_SECRET,
            "NBDWORKER_NODE": node,
            "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        }
        with run_worker(None, workdir=tmp_path / "w", storage_root=root, env=env) as worker:
            worker.wait_for_log(r"following nbdweb:config-changed")
            with Flipper(root / "d", outside) as flipper:
                for generation in range(2, RELOADS + 2):
                    start = worker.log_lines()
                    r.set(config_key(node), config(generation))
                    r.publish(config_channel(node), f"{node}:{generation}")
                    worker.wait_for_log(rf"config generation {generation} applied", start=start)
                    for i in range(RELOAD_EXPORTS):
                        with RawClient(worker.host, worker.port) as c:
                            c.greet()
                            if not c.try_go(f"e{i}"):
                                continue  # refused at this generation: the safe outcome
                            data = c.read(0, len(INSIDE)).data
                        served["outside" if data == OUTSIDE else "inside"] += 1
                        assert data in (INSIDE, OUTSIDE)
            assert flipper.flips > 0
    assert served["outside"] == 0, served
    assert served["inside"] > 0, served


def test_a_symlink_in_place_of_a_memory_exports_shared_file_is_refused(tmp_path) -> None:
    """Memory exports of several serving processes share a file in /dev/shm, a directory anyone
    can write to: a symlink planted at its name must not be followed (nor the file it names
    truncated)."""
    shm = tmp_path / "shm"
    shm.mkdir()
    prefix = str(shm / "nbdworker-1")
    cfg = ExportConfig(name="ram", backend="memory", size=1 << 20)
    backend = _open_backend(cfg, settings_for(tmp_path), shared_memory=prefix)
    assert backend is not None
    backend.close()
    (path,) = shm.iterdir()
    path.unlink()
    victim = tmp_path / "victim"
    victim.write_bytes(OUTSIDE)
    path.symlink_to(victim)
    assert _open_backend(cfg, settings_for(tmp_path), shared_memory=prefix) is None
    assert victim.read_bytes() == OUTSIDE


# -- the recorded identity ----------------------------------------------------------------------


def mark(path: Path, token: str) -> str:
    """Mark `path` as nbdweb's jobs do; its identity."""
    os.setxattr(path, OWNER_XATTR, token.encode())
    return identity_of(path.stat(), token)


def test_an_impostor_at_the_images_name_is_refused_logged_and_counted(
    worker_factory, tmp_path
) -> None:
    """Files renamed over recorded images inside the root (another inode; the same inode with
    another owner mark) are refused by reason ``not_owned``; the recorded ones are served."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("kept", "replaced", "remarked", "legacy"):
        (images / f"{name}.img").write_bytes(INSIDE)
    kept = mark(images / "kept.img", "aa" * 16)
    replaced = mark(images / "replaced.img", "bb" * 16)
    remarked = mark(images / "remarked.img", "cc" * 16)
    legacy = identity_of((images / "legacy.img").stat())  # recorded before tokens: dev:ino
    (images / "impostor.img").write_bytes(OUTSIDE)
    os.rename(images / "impostor.img", images / "replaced.img")
    os.setxattr(images / "remarked.img", OWNER_XATTR, b"dd" * 16)
    exports = [
        {"name": name, "backend": "file", "path": f"{images}/{name}.img", "image_identity": ident}
        for name, ident in (
            ("kept", kept),
            ("replaced", replaced),
            ("remarked", remarked),
            ("legacy", legacy),
        )
    ]
    worker = worker_factory(
        {"exports": exports}, storage_root=images, args=["--metrics-listen", "127.0.0.1:0"]
    )
    worker.wait_for_log(r"export 'replaced' refused: .* \(device:inode \d+:\d+, recorded")
    worker.wait_for_log(r"export 'remarked' refused: .* owner mark")
    with RawClient(worker.host, worker.port) as c:
        c.greet()
        for name in ("replaced", "remarked"):
            assert c.refused_go(name).reply == Reply.ERR_UNKNOWN
    for name in ("kept", "legacy"):
        with RawClient.open(worker.host, worker.port, name) as c:
            assert c.read(0, len(INSIDE)).data == INSIDE
    assert value(scrape(worker), "nbdworker_exports_refused_total", reason="not_owned") == 2


def test_an_impostor_on_the_freed_inode_with_the_mark_seen_in_redis_is_refused(tmp_path) -> None:
    """Whoever can read the snapshot in Redis sees the recorded identity; whoever can write into
    the storage dir deletes the image, creates files until one gets its inode back (ext4 hands
    a freed inode out again at once) and renames it over the image's name with that mark. Before,
    the identity carried the owner token itself, so this impostor was served."""
    images = tmp_path / "images"
    images.mkdir()
    path = images / "disk.img"
    path.write_bytes(INSIDE)
    recorded = mark(path, "ab" * 16)  # as the create job records it: it goes into the snapshot
    seen_mark = recorded.rpartition(":")[2]
    inode = path.stat().st_ino
    path.unlink()
    for attempt in range(1000):
        impostor = images / f"impostor-{attempt}"
        impostor.write_bytes(OUTSIDE)
        if impostor.stat().st_ino == inode:
            break
    else:
        pytest.fail("no file got the freed inode back: this filesystem does not reuse inodes")
    os.setxattr(impostor, OWNER_XATTR, seen_mark.encode())
    os.rename(impostor, path)
    with pytest.raises(ImageRefused) as refused:
        open_image(str(path), [(str(images), str(images))], writable=False, identity=recorded)
    assert refused.value.reason == RefusalReason.NOT_OWNED


def test_an_identity_recorded_with_the_token_itself_still_opens_its_image(tmp_path) -> None:
    """Identities recorded before the token was hashed (in snapshots published before the
    upgrade) keep opening their own image, and only it."""
    images = tmp_path / "images"
    images.mkdir()
    path = images / "old.img"
    path.write_bytes(INSIDE)
    os.setxattr(path, OWNER_XATTR, b"cd" * 16)
    st = path.stat()
    fd = open_image(
        str(path), [(str(images), str(images))], False, f"{st.st_dev}:{st.st_ino}:{'cd' * 16}"
    )
    os.close(fd)
    os.setxattr(path, OWNER_XATTR, b"ef" * 16)
    with pytest.raises(ImageRefused):
        open_image(
            str(path), [(str(images), str(images))], False, f"{st.st_dev}:{st.st_ino}:{'cd' * 16}"
        )


@pytest.mark.parametrize(
    ("export", "message"),
    [
        ({"backend": "memory", "size": 4096, "image_identity": "1:2:"}, "only for the file"),
        ({"backend": "file", "path": "/x.img", "image_identity": "1:2"}, "<device>:<inode>"),
        ({"backend": "file", "path": "/x.img", "image_identity": "1:2:XY"}, "<device>:<inode>"),
        ({"backend": "file", "path": "/x.img", "image_identity": 12}, "must be a string"),
    ],
)
def test_a_malformed_identity_is_a_config_error(export, message) -> None:
    with pytest.raises(ConfigError, match=rf"exports\[0\]\.image_identity: .*{message}"):
        WorkerConfig.from_dict({"version": 1, "exports": [{"name": "x", **export}]})
