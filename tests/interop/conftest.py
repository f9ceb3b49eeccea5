"""One worker per module, serving a sparse file, a read-only file and a memory export."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fixtures import make_image
from tests.support.tools import client_env, require_tool
from tests.support.worker import RunningWorker, run_worker

MiB = 1 << 20
SIZE = 64 * MiB


@dataclass
class Served:
    worker: RunningWorker
    images: Path
    disk: Path
    ro: Path

    def uri(self, export: str = "") -> str:
        return self.worker.uri(export)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("interop")
    images = root / "images"
    disk = make_image(images / "disk.img", SIZE)
    ro = make_image(images / "ro.img", SIZE, b"\x5a" * MiB, 0)
    config = {
        "version": 1,
        "default_export": "disk",
        "exports": [
            {"name": "disk", "backend": "file", "path": str(disk), "description": "sparse disk"},
            {"name": "ro", "backend": "file", "path": str(ro), "read_only": True},
            {"name": "mem", "backend": "memory", "size": SIZE},
        ],
    }
    with run_worker(config, workdir=root, storage_root=images) as w:
        yield Served(w, images, disk, ro)


def run(tool: str, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a client tool (failing with the Debian package name when it is missing)."""
    path = require_tool(tool)
    result = subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=120, env=client_env(), **kw
    )
    if check and result.returncode != 0:
        command = " ".join([tool, *args])
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result
