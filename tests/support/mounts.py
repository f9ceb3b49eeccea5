"""Temporary mounts for tests of full, read-only and inode-less filesystems (root only).

with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=4M", "tmpfs") as small: ...
with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(source)) as ro: ...
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["mounted", "require_root"]


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
