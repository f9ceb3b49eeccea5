"""nbdworker over TLS vs ``nbdkit --tls=require`` (file plugin), on the same image, in one run.

    .venv/bin/python bench/tls.py [--size 1G] [--runtime 10] [--rounds 1] [--only seq,fio]

Both servers present the same X.509 certificate and require a client certificate from the same
CA (generated for the run, see tests/support/pki.py); the clients (nbdcopy, fio's nbd engine)
use GnuTLS through libnbd. Prints each figure for both servers and nbdworker's ratio to nbdkit
(higher is better), and for the sequential runs each server's CPU seconds per GiB moved (utime +
stime of the server process, all threads): on a shared machine the MB/s swing by 2x from run to
run, the CPU per GiB much less. Both servers run side by side and take turns test by test, so a
burst of load elsewhere does not land on one server's whole round. Not a test: nothing is
asserted.

fio's nbd engine never lets libnbd read local files named in a URI (``?tls-certificates=``), and
as root libnbd then only looks in /etc/pki/libnbd. Rather than touch /etc, the run preloads a
small shim (compiled here with gcc) that allows it for fio's handle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/run.py: the shared helpers (ports, nbdcopy and fio runners).
import run as base

sys.path.insert(0, str(base.REPO))
from tests.support.pki import PKI, make_pki, tls_config_dict

__all__ = ["main", "run_tls_bench"]

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stddef.h>

struct nbd_handle;
typedef int (*connect_fn)(struct nbd_handle *, const char *);
typedef int (*allow_fn)(struct nbd_handle *, bool);

int nbd_connect_uri(struct nbd_handle *h, const char *uri)
{
    static connect_fn real_connect;
    static allow_fn allow_local;
    if (real_connect == NULL) {
        void *lib = dlopen("libnbd.so.0", RTLD_LAZY | RTLD_NOLOAD);
        if (lib == NULL)
            lib = RTLD_NEXT;
        real_connect = (connect_fn) dlsym(lib, "nbd_connect_uri");
        allow_local = (allow_fn) dlsym(lib, "nbd_set_uri_allow_local_file");
    }
    if (allow_local != NULL)
        allow_local(h, true);
    return real_connect(h, uri);
}
"""


def build_shim(workdir: Path) -> Path:
    src = workdir / "allow_local_file.c"
    lib = workdir / "allow_local_file.so"
    src.write_text(SHIM_SOURCE)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
        check=True,
        env=base.ENV,
    )
    return lib


def client_uri(port: int, export: str, pki: PKI) -> str:
    return f"nbds://127.0.0.1:{port}/{export}?tls-certificates={pki.client_dir('alice')}"


@contextlib.contextmanager
def nbdkit_tls(image: Path, pki: PKI) -> Iterator[tuple[str, int]]:
    port = base.free_port()
    proc = subprocess.Popen(
        [
            "nbdkit",
            "-f",
            "-p",
            str(port),
            "-i",
            "127.0.0.1",
            "--tls=require",
            f"--tls-certificates={pki.server_dir}",
            "--tls-verify-peer",
            "file",
            f"file={image}",
        ],
        env=base.ENV,
        start_new_session=base.SERVER_SESSIONS,
    )
    try:
        base.wait_port(port, proc)
        yield client_uri(port, "", pki), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def nbdworker_tls(image: Path, workdir: Path, pki: PKI) -> Iterator[tuple[str, int]]:
    port = base.free_port()
    cfg = {
        "version": 1,
        "generation": 1,
        "default_export": "bench",
        "exports": [{"name": "bench", "backend": "file", "path": str(image)}],
        "tls": tls_config_dict(pki, "FORCEDTLS", client_verification="required", revoked=()),
    }
    cfg_path = workdir / "worker-tls.json"
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the key
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbdworker",
            "--config",
            str(cfg_path),
            "--listen",
            f"127.0.0.1:{port}",
            "--storage-root",
            str(image.parent),
            "--log-level",
            "WARNING",
        ],
        cwd=base.REPO,
        env=base.ENV,
        start_new_session=base.SERVER_SESSIONS,
    )
    try:
        base.wait_port(port, proc)
        yield client_uri(port, "bench", pki), proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def benchmarks(
    size: int, src: Path, runtime: int, only: set[str]
) -> list[tuple[str, bool, Callable[[str], float]]]:
    """(name, moves `size` bytes so CPU per GiB means something, run(uri) -> figure)."""
    tests: list[tuple[str, bool, Callable[[str], float]]] = []
    if "seq" in only:
        tests += [
            ("TLS seq read, nbdcopy default (MB/s)", True, lambda u: base.seq_read(u, size, None)),
            (
                "TLS seq read, nbdcopy --connections=1 (MB/s)",
                True,
                lambda u: base.seq_read(u, size, 1),
            ),
            (
                "TLS seq write, nbdcopy default (MB/s)",
                True,
                lambda u: base.seq_write(u, src, size, None),
            ),
            (
                "TLS seq write, nbdcopy --connections=1 (MB/s)",
                True,
                lambda u: base.seq_write(u, src, size, 1),
            ),
        ]
    if "fio" in only:
        for rw in ("randread", "randwrite"):
            for depth in (1, 16):
                tests.append(
                    (
                        f"TLS 4k {rw} iodepth={depth} (IOPS)",
                        False,
                        lambda u, rw=rw, d=depth: base.fio_iops(u, rw, d, runtime),
                    )
                )
    return tests


def run_tls_bench(
    size: int = 1 << 30,
    runtime: int = 10,
    rounds: int = 1,
    only: str = "seq,fio",
    scratch: str | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Run the TLS benchmarks; print progress and the table; return every run's figure,
    {name: {server: [value, ...]}}."""
    for tool in ("nbdkit", "nbdcopy", "fio", "gcc"):
        if not shutil.which(tool, path=base.ENV["PATH"]):
            raise SystemExit(f"missing {tool}")
    work = Path(tempfile.mkdtemp(prefix="nbdbench-tls-", dir=scratch or "/var/tmp"))
    saved_preload = base.ENV.get("LD_PRELOAD")
    try:
        pki = make_pki(work / "pki")
        base.ENV["LD_PRELOAD"] = str(build_shim(work))
        image = work / "images" / "bench.img"
        image.parent.mkdir()
        src = work / "source.img"
        print(f"TLS: preparing {size >> 20} MiB of random data in {work}", flush=True)
        with open(src, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 16 << 20))
                f.write(chunk)
                left -= len(chunk)
        shutil.copyfile(src, image)

        tests = benchmarks(size, src, runtime, set(only.split(",")))
        runs: dict[str, dict[str, list[float]]] = {}
        cost = base.CopyCost(size)
        with contextlib.ExitStack() as stack:
            servers = {
                "nbdkit": stack.enter_context(nbdkit_tls(image, pki)),
                "nbdworker": stack.enter_context(nbdworker_tls(image, work, pki)),
            }
            order = list(servers.items())
            for round_no in range(rounds):
                for name, whole, fn in tests:
                    # Taking turns, the order swapped every round (as in bench/run.py).
                    for server_name, (uri, pid) in order if round_no % 2 == 0 else order[::-1]:
                        if whole:
                            value, note = cost.measure(name, server_name, pid, fn, uri)
                        else:
                            value, note = fn(uri), ""
                        runs.setdefault(name, {}).setdefault(server_name, []).append(value)
                        print(f"  {server_name:9} {name}: {value:.2f}{note}", flush=True)
    finally:
        if saved_preload is None:
            base.ENV.pop("LD_PRELOAD", None)
        else:
            base.ENV["LD_PRELOAD"] = saved_preload
        shutil.rmtree(work, ignore_errors=True)

    print()
    base.print_comparison(
        "benchmark (TLS)",
        [(name, True) for name, _per_byte, _fn in tests],
        runs,
        "(ratio: nbdworker relative to nbdkit --tls=require, >1 is better)",
    )
    cost.print_table()
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=base.parse_size, default=1 << 30)
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    p.add_argument("--rounds", type=int, default=1, help="repeat: best and median figures")
    p.add_argument("--only", default="seq,fio")
    p.add_argument("--dir", default=None, help="scratch directory (default: under /var/tmp)")
    args = p.parse_args(argv)
    run_tls_bench(args.size, args.runtime, args.rounds, args.only, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
