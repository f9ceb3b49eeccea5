"""exports_app.services.images: the disk work of the jobs, on real files and real filesystems,
and its refusal to touch any file it did not create (a pre-existing file, a symbolic link, a
FIFO, a file swapped in under the image's name).

Failure cases fail for real, as root: a tmpfs too small (ENOSPC from data) or without free
inodes (ENOSPC from the create), a read-only bind mount (EROFS), a path below a regular file
(ENOTDIR), and a subprocess without CAP_DAC_OVERRIDE for EACCES. Every one of them must leave
nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exports_app.services import images
from tests.support.mounts import mounted

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def plain_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


_descriptors: list[int] = []


@pytest.fixture(autouse=True)
def close_descriptors():
    yield
    while _descriptors:
        os.close(_descriptors.pop())


def at(path: Path) -> images.ImagePlace:
    """The ImagePlace of `path`: its directory opened (closed after the test)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    _descriptors.append(fd)
    return images.ImagePlace(fd, path.name, str(path))


def opened(path: Path, writable: bool = False) -> int:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    _descriptors.append(fd)
    return fd


def identity(path: Path) -> str:
    """The identity of a file nbdweb did not mark (device and inode only)."""
    return images.identity_of(os.lstat(path))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def assert_monotonic_to_the_end(self, total: int) -> None:
        dones = [done for done, _ in self.calls]
        assert dones == sorted(dones) and dones[-1] == total
        assert {t for _, t in self.calls} == {total}


# -- create --------------------------------------------------------------------------------------


def test_create_sparse_makes_a_sparse_file_of_the_size_and_nothing_else(tmp_path):
    path = tmp_path / "disk.img"
    images.create_sparse(at(path), GiB)
    assert path.stat().st_size == GiB
    assert allocated(path) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert entries(tmp_path) == ["disk.img"]


def test_create_sparse_again_with_its_recorded_identity_is_a_no_op(tmp_path):
    path = tmp_path / "disk.img"
    recorded = []
    made = images.create_sparse(at(path), MiB, record=recorded.append)
    assert recorded == [made]
    token = os.getxattr(path, "user.nbdweb.image").decode()
    assert made == images.identity_of(os.stat(path), token)
    write_at(path, 0, b"kept")
    assert images.create_sparse(at(path), MiB, owned=made) == made
    assert path.read_bytes()[:4] == b"kept"


def test_create_sparse_never_replaces_another_file(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"someone else's data")
    with pytest.raises(FileExistsError):
        images.create_sparse(at(path), MiB)
    assert path.read_bytes() == b"someone else's data"
    assert entries(tmp_path) == ["disk.img"]


def test_create_sparse_removes_the_partial_file_its_killed_attempt_recorded(tmp_path):
    ours = tmp_path / ".disk.img.0123456789ab.partial"
    ours.write_bytes(b"half")
    # Named like a partial image of ours, but not the one the attempt recorded: left alone.
    (tmp_path / ".disk.img.ba9876543210.partial").write_bytes(b"not ours")
    (tmp_path / ".other.img.0123456789ab.partial").write_bytes(b"not ours")
    images.create_sparse(at(tmp_path / "disk.img"), MiB, owned=identity(ours))
    assert entries(tmp_path) == [
        ".disk.img.ba9876543210.partial",
        ".other.img.0123456789ab.partial",
        "disk.img",
    ]


# -- clone ---------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path) -> Path:
    """A 64 MiB sparse image with data at 0, 10 MiB and the last MiB, and an allocated range
    of zeroes at 20 MiB."""
    path = tmp_path / "src.img"
    images.create_sparse(at(path), 64 * MiB)
    write_at(path, 0, os.urandom(4096))
    write_at(path, 10 * MiB, b"\xa5" * MiB)
    write_at(path, 20 * MiB, bytes(2 * MiB))
    write_at(path, 63 * MiB, os.urandom(MiB))
    return path


def test_clone_copies_the_contents_and_keeps_holes(tmp_path, source):
    target = tmp_path / "copy.img"
    progress = Recorder()
    reflinked = images.clone(opened(source), at(target), progress=progress)
    assert target.stat().st_size == source.stat().st_size
    assert plain_sha256(target) == plain_sha256(source)
    if not reflinked:
        # Data ranges are copied, holes and all-zero chunks are not written.
        assert allocated(target) <= 3 * MiB
        progress.assert_monotonic_to_the_end(64 * MiB)
    assert entries(tmp_path) == ["copy.img", "src.img"]


def test_clone_falls_back_to_copying_where_reflinks_are_unsupported(tmp_path, source):
    # tmpfs has no FICLONE: the sparse copy runs.
    with mounted(tmp_path / "t", "-t", "tmpfs", "-o", "size=16M", "tmpfs") as tmpfs:
        src = tmpfs / "src.img"
        images.create_sparse(at(src), GiB)
        write_at(src, 5 * MiB, os.urandom(MiB))
        assert images.clone(opened(src), at(tmpfs / "copy.img")) is False
        assert images.sha256(opened(tmpfs / "copy.img")) == images.sha256(opened(src))
        assert allocated(tmpfs / "copy.img") <= 2 * MiB


def test_clone_shares_blocks_on_a_filesystem_with_reflinks(tmp_path, source):
    # XFS with reflink=1 (mkfs.xfs wants 300 MiB at least; the file is sparse).
    fs_image = tmp_path / "xfs.img"
    images.create_sparse(at(fs_image), 320 * MiB)
    mkfs = shutil.which("mkfs.xfs") or "/usr/sbin/mkfs.xfs"
    assert os.path.exists(mkfs), "mkfs.xfs is missing: apt-get install xfsprogs"
    subprocess.run([mkfs, "-q", "-m", "reflink=1", str(fs_image)], check=True)
    with mounted(tmp_path / "x", "-o", "loop", str(fs_image)) as xfs:
        src = xfs / "src.img"
        shutil.copyfile(source, src)
        os.sync()
        free_before = os.statvfs(xfs).f_bfree * os.statvfs(xfs).f_frsize
        progress = Recorder()
        assert images.clone(opened(src), at(xfs / "copy.img"), 96 * MiB, progress=progress)
        os.sync()
        free_after = os.statvfs(xfs).f_bfree * os.statvfs(xfs).f_frsize
        # The source holds 4 MiB of data; the clone shares it instead of taking its own.
        assert allocated(src) >= 4 * MiB
        assert free_before - free_after < MiB
        assert (xfs / "copy.img").stat().st_size == 96 * MiB
        with open(xfs / "copy.img", "rb") as f:
            assert f.read(64 * MiB) == src.read_bytes()
            assert f.read() == bytes(32 * MiB)
        progress.assert_monotonic_to_the_end(64 * MiB)
        # Copy on write: the clone's writes leave the source alone.
        before = plain_sha256(src)
        write_at(xfs / "copy.img", 10 * MiB, b"\x5a" * MiB)
        os.sync()
        assert plain_sha256(src) == before
        with open(xfs / "copy.img", "rb") as f:
            f.seek(10 * MiB)
            assert f.read(MiB) == b"\x5a" * MiB


def test_clone_grows_to_a_bigger_size_sparsely(tmp_path, source):
    target = tmp_path / "big.img"
    images.clone(opened(source), at(target), size=GiB)
    assert target.stat().st_size == GiB
    with open(target, "rb") as f:
        f.seek(10 * MiB)
        assert f.read(MiB) == b"\xa5" * MiB
        f.seek(512 * MiB)
        assert f.read(MiB) == bytes(MiB)
    assert allocated(target) <= 3 * MiB


def test_clone_refuses_a_smaller_size(tmp_path, source):
    with pytest.raises(ValueError, match="smaller than its source"):
        images.clone(opened(source), at(tmp_path / "small.img"), size=MiB)
    assert not (tmp_path / "small.img").exists()


def test_clone_onto_a_full_filesystem_fails_with_enospc_and_leaves_nothing(tmp_path):
    source = tmp_path / "src.img"
    images.create_sparse(at(source), 16 * MiB)
    write_at(source, 0, os.urandom(8 * MiB))
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=4M", "tmpfs") as small:
        with pytest.raises(OSError) as info:
            images.clone(opened(source), at(small / "copy.img"))
        assert info.value.errno == errno.ENOSPC
        assert "No space left on device" in images.describe_error(info.value)
        assert entries(small) == []


# -- failures of create --------------------------------------------------------------------------


def test_create_without_free_inodes_fails_with_enospc_and_leaves_nothing(tmp_path):
    with mounted(tmp_path / "full", "-t", "tmpfs", "-o", "size=1M,nr_inodes=2", "tmpfs") as full:
        (full / "filler").touch()
        with pytest.raises(OSError) as info:
            images.create_sparse(at(full / "disk.img"), GiB)
        assert info.value.errno == errno.ENOSPC
        assert entries(full) == ["filler"]


def test_create_on_a_read_only_filesystem_fails_with_erofs(tmp_path):
    backing = tmp_path / "backing"
    backing.mkdir()
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(backing)) as ro:
        with pytest.raises(OSError) as info:
            images.create_sparse(at(ro / "disk.img"), MiB)
        assert info.value.errno == errno.EROFS
        assert "Read-only file system" in images.describe_error(info.value)
    assert entries(backing) == []


def test_create_below_a_regular_file_fails_with_enotdir(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        images.create_sparse(at(tmp_path / "file" / "disk.img"), MiB)
    assert entries(tmp_path) == ["file"]


def test_create_in_a_directory_without_write_permission_fails_with_eacces(tmp_path):
    # Root ignores file modes; a process without CAP_DAC_OVERRIDE (what an unprivileged
    # Celery worker is) does not.
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
    if os.geteuid() != 0:
        prefix = []
    elif setpriv is None:
        pytest.fail("setpriv is missing: apt-get install util-linux", pytrace=False)
    code = (
        "import os, sys\n"
        "from exports_app.services import images\n"
        "parent = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY | os.O_DIRECTORY)\n"
        "place = images.ImagePlace(parent, os.path.basename(sys.argv[1]), sys.argv[1])\n"
        "try:\n"
        "    images.create_sparse(place, 1 << 20)\n"
        "except PermissionError as exc:\n"
        "    print(images.describe_error(exc)); sys.exit(3)\n"
    )
    result = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(locked / "disk.img")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("Permission denied")
    assert entries(locked) == []


# -- resize, wipe, remove, sha256 ----------------------------------------------------------------


def test_resize_grows_sparsely_and_keeps_the_data(tmp_path):
    path = tmp_path / "disk.img"
    images.create_sparse(at(path), MiB)
    write_at(path, 0, b"data")
    images.resize(opened(path, writable=True), GiB)
    assert path.stat().st_size == GiB
    assert path.read_bytes()[:4] == b"data"
    assert allocated(path) <= 64 * 1024


def test_resize_shrinks_and_drops_the_data_past_the_end(tmp_path):
    path = tmp_path / "disk.img"
    images.create_sparse(at(path), 4 * MiB)
    write_at(path, 3 * MiB, b"gone")
    images.resize(opened(path, writable=True), MiB)
    images.resize(opened(path, writable=True), 4 * MiB)
    with open(path, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(4) == bytes(4)


def test_opening_a_missing_image_fails_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        images.open_owned(at(tmp_path / "nope.img"), "1:2", writable=True)
    assert entries(tmp_path) == []


def test_wipe_zeroes_every_data_range_without_allocating_holes(tmp_path, source):
    before = allocated(source)
    progress = Recorder()
    images.wipe(opened(source, writable=True), progress)
    assert plain_sha256(source) == hashlib.sha256(bytes(64 * MiB)).hexdigest()
    assert allocated(source) <= before
    progress.assert_monotonic_to_the_end(64 * MiB)


def test_remove_unlinks_and_accepts_an_image_already_gone(tmp_path):
    path = tmp_path / "disk.img"
    made = images.create_sparse(at(path), MiB)
    assert images.remove(at(path), made) is True
    assert images.remove(at(path), made) is False
    assert entries(tmp_path) == []


def test_sha256_of_a_sparse_image_equals_hashing_every_byte(tmp_path, source):
    progress = Recorder()
    assert images.sha256(opened(source), progress) == plain_sha256(source)
    progress.assert_monotonic_to_the_end(64 * MiB)


def test_sha256_of_an_empty_image(tmp_path):
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    assert images.sha256(opened(path)) == hashlib.sha256(b"").hexdigest()


def test_data_extents_skip_holes(tmp_path):
    path = tmp_path / "disk.img"
    images.create_sparse(at(path), 16 * MiB)
    write_at(path, 8 * MiB, b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        extents = list(images.data_extents(fd, 16 * MiB))
    finally:
        os.close(fd)
    assert len(extents) == 1
    start, end = extents[0]
    assert start <= 8 * MiB < 8 * MiB + 4096 <= end < 16 * MiB


# -- files nbdweb did not create (issue 15, item 4) ----------------------------------------------


def test_create_never_adopts_a_file_of_exactly_the_right_size(tmp_path):
    # The old "already made?" check took any regular file of the requested size as its own.
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x42" * MiB)
    recorded = []
    with pytest.raises(FileExistsError, match="did not create"):
        images.create_sparse(at(path), MiB, record=recorded.append)
    assert path.read_bytes() == b"\x42" * MiB
    assert entries(tmp_path) == ["disk.img"]
    assert recorded == []


def test_clone_never_adopts_a_file_at_its_name(tmp_path, source):
    target = tmp_path / "copy.img"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        images.clone(opened(source), at(target))
    assert target.read_bytes() == b"mine"


@pytest.mark.parametrize("job", ["create", "clone"])
def test_a_file_renamed_over_the_new_image_as_it_is_placed_fails_the_job(
    tmp_path, source, monkeypatch, job
):
    """The attack: the moment the finished image takes its name, someone who may write the
    directory renames another file over it. The job took the impostor's name as its image (and
    recorded an identity no file at the name has). Now it fails, records nothing and leaves
    the impostor alone."""
    path = tmp_path / "disk.img"
    impostor = tmp_path / "impostor"
    impostor.write_bytes(b"IMPOSTOR")
    real_rename = images._rename_noreplace

    def rename_then_swap(parent: int, temp: str, name: str) -> None:
        real_rename(parent, temp, name)
        os.rename(impostor, path)  # the hostile writer, right after the rename

    monkeypatch.setattr(images, "_rename_noreplace", rename_then_swap)
    recorded: list[str] = []
    with pytest.raises(images.ImageNotOwned, match="Another file took the image's name"):
        if job == "create":
            images.create_sparse(at(path), MiB, record=recorded.append)
        else:
            images.clone(opened(source), at(path), record=recorded.append)
    assert path.read_bytes() == b"IMPOSTOR"
    assert recorded[-1] == ""
    assert entries(tmp_path) == ["disk.img", source.name]


@pytest.mark.parametrize("writable", [False, True])
def test_open_owned_refuses_a_file_swapped_in_under_the_name(tmp_path, writable):
    path = tmp_path / "disk.img"
    made = images.create_sparse(at(path), MiB)
    path.unlink()
    # The new file may well get the freed inode number; the owner token tells them apart.
    path.write_bytes(b"someone else's")
    with pytest.raises(images.ImageNotOwned, match="Not the image nbdweb created"):
        images.open_owned(at(path), made, writable=writable)


def test_open_owned_refuses_a_symbolic_link_even_to_the_image_itself(tmp_path):
    real = tmp_path / "real.img"
    made = images.create_sparse(at(real), MiB)
    (tmp_path / "link.img").symlink_to(real)
    with pytest.raises(images.ImageNotOwned, match="symbolic link"):
        images.open_owned(at(tmp_path / "link.img"), made, writable=True)


def test_open_owned_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "disk.img"
    os.mkfifo(fifo)
    with pytest.raises(images.ImageNotOwned, match="Not a regular file"):
        images.open_owned(at(fifo), identity(fifo))


def test_remove_leaves_a_file_that_is_not_the_recorded_image(tmp_path):
    path = tmp_path / "disk.img"
    made = images.create_sparse(at(path), MiB)
    path.unlink()
    path.write_bytes(b"precious")
    with pytest.raises(images.ImageNotOwned):
        images.remove(at(path), made)
    assert path.read_bytes() == b"precious"
    assert entries(tmp_path) == ["disk.img"]


def test_take_over_refuses_symbolic_links_fifos_and_directories(tmp_path):
    (tmp_path / "target.img").write_bytes(bytes(512))
    (tmp_path / "link.img").symlink_to(tmp_path / "target.img")
    os.mkfifo(tmp_path / "fifo.img")
    (tmp_path / "dir.img").mkdir()
    seen = []

    def check(device_inode: str, size: int) -> None:
        seen.append((device_inode, size))

    for name in ("link.img", "fifo.img", "dir.img"):
        with pytest.raises(images.ImageNotOwned):
            images.take_over(at(tmp_path / name), check)
    assert seen == []
    taken = images.take_over(at(tmp_path / "target.img"), check)
    st = os.stat(tmp_path / "target.img")
    assert seen == [(f"{st.st_dev}:{st.st_ino}", 512)]
    os.close(images.open_owned(at(tmp_path / "target.img"), taken))
    assert taken != identity(tmp_path / "target.img")  # it carries the new owner token


def test_take_over_writes_nothing_when_the_check_refuses(tmp_path):
    path = tmp_path / "other.img"
    path.write_bytes(bytes(512))

    def refuse(device_inode: str, size: int) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        images.take_over(at(path), refuse)
    assert os.listxattr(path) == []
