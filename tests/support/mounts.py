"""Temporary mounts for tests of full, read-only and inode-less filesystems (root only).

with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=4M", "tmpfs") as small: ...
with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(source)) as ro: ...
with loop_filesystem(tmp_path, "xfs") as xfs: ...     # a fresh XFS on a loop device
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["loop_filesystem", "mounted", "require_root"]


def require_root() -> None:
    """Fail (not skip) when not root: these tests are part of the suite, not optional."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts filesystems and needs root", pytrace=False)


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """`mount ARGS target` for the duration of the block; always unmounted afterwards."""
    require_root()
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    assert result.returncode == 0, f"mount {' '.join(args)} {target}: {result.stderr}"
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True, capture_output=True)


@contextlib.contextmanager
def loop_filesystem(
    tmp_path: Path, fstype: str, *mkfs_args: str, size: int = 320 << 20
) -> Iterator[Path]:
    """A new `fstype` filesystem in a sparse file of `size` bytes under `tmp_path`, loop-mounted
    at `tmp_path / fstype` for the block (mkfs.xfs wants 300 MiB at least)."""
    require_root()
    mkfs = shutil.which(f"mkfs.{fstype}") or f"/usr/sbin/mkfs.{fstype}"
    assert os.path.exists(mkfs), f"mkfs.{fstype} is missing (xfsprogs, e2fsprogs, btrfs-progs)"
    backing = tmp_path / f"{fstype}.fs"
    with open(backing, "wb") as f:
        f.truncate(size)
    quiet = ["-q", "-F"] if fstype.startswith("ext") else ["-q"]
    subprocess.run([mkfs, *quiet, *mkfs_args, str(backing)], check=True, capture_output=True)
    with mounted(tmp_path / fstype, "-o", "loop", str(backing)) as target:
        yield target
