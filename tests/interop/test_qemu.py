"""qemu-img and qemu-io against a worker started by the test."""

from __future__ import annotations

import json
import os

import pytest

from tests.interop.conftest import SIZE, MiB, run

pytestmark = pytest.mark.interop


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    args = ["-f", "raw"]
    if read_only:
        args.append("-r")
    for c in commands:
        args += ["-c", c]
    result = run("qemu-io", *args, uri)
    # qemu-io reports failed commands on stdout/stderr but still exits 0.
    out = result.stdout + result.stderr
    assert "error" not in out.lower() and "fail" not in out.lower(), out
    return out


def test_qemu_img_info(served):
    info = json.loads(run("qemu-img", "info", "--output=json", served.uri("disk")).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


def test_qemu_img_info_default_export(served):
    info = json.loads(run("qemu-img", "info", "--output=json", served.uri("")).stdout)
    assert info["virtual-size"] == SIZE


def test_qemu_img_convert_and_compare(served, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for i in range(0, SIZE, 8 * MiB):  # data with holes between
            f.seek(i)
            f.write(os.urandom(MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri("mem"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri("mem"))
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("mem"), str(back))
    assert back.read_bytes() == src.read_bytes()


def test_qemu_io_patterns(served):
    uri = served.uri("disk")
    qemu_io(uri, "write -P 0xa5 0 1M", "write -P 0x3c 1M 64k", "write -P 0x11 3M 4k")
    qemu_io(
        uri, "read -P 0xa5 0 1M", "read -P 0x3c 1M 64k", "read -P 0x11 3M 4k", "read -P 0 2M 1M"
    )


def test_qemu_io_write_zeroes_and_discard(served):
    uri = served.uri("disk")
    qemu_io(uri, "write -P 0x77 8M 2M")
    qemu_io(uri, "write -z 8M 512k", "write -z -u 9M 512k", "discard 9728k 512k")
    # write -z must read back as zeroes; discarded data may be anything, but our file backend
    # punches a hole, so it reads as zeroes too.
    qemu_io(uri, "read -P 0 8M 512k", "read -P 0x77 8704k 512k", "read -P 0 9M 512k")


def test_qemu_io_aio(served):
    uri = served.uri("mem")
    commands = [f"aio_write -P {i + 1} {i * 256}k 256k" for i in range(16)] + ["aio_flush"]
    qemu_io(uri, *commands)
    reads = [f"aio_read -P {i + 1} {i * 256}k 256k" for i in range(16)] + ["aio_flush"]
    qemu_io(uri, *reads)


def test_qemu_io_fua_write(served):
    qemu_io(served.uri("disk"), "write -f -P 0x42 20M 64k", "read -P 0x42 20M 64k")


def test_qemu_io_read_only_export(served):
    out = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", served.uri("ro"), check=False)
    text = out.stdout + out.stderr
    assert (
        "permission denied" in text.lower()
        or "read-only" in text.lower()
        or "read only" in text.lower()
    ), text
    qemu_io(served.uri("ro"), "read -P 0x5a 0 1M", read_only=True)


def test_qemu_img_map_sees_holes(served):
    uri = served.uri("disk")
    qemu_io(uri, "write -P 1 40M 1M")
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
    data = [e for e in extents if e["data"]]
    holes = [e for e in extents if not e["data"]]
    assert holes, extents
    assert any(e["start"] <= 40 * MiB < e["start"] + e["length"] for e in data), extents
