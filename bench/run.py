"""nbdworker vs nbdkit's file plugin, on the same image, in one run.

    .venv/bin/python bench/run.py [DIR] [--size 1G] [--runtime 10] [--rounds 1] [--only seq,fio]
    .venv/bin/python bench/run.py /mnt/xfs --rounds 3 --markdown out.md   # one filesystem's table
    .venv/bin/python bench/run.py --baseline /tmp/before --rounds 3   # nbdworker before/after

DIR (default /var/tmp) is where the image lives: the filesystem measured. `make bench` runs this
on several filesystems (bench/filesystems.sh).

Prints each figure for both servers and nbdworker's ratio to nbdkit (higher is better, except
for connect latency where lower is better). With --baseline DIR the reference is not nbdkit but
nbdworker as checked out in DIR (a `git worktree add` of an older commit), run with the same
Python. Needs nbdkit, nbdcopy, fio (nbd engine) and
python3-libnbd (driven through /usr/bin/python3). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PATH": "/usr/bin:/usr/sbin:" + os.environ.get("PATH", "")}

# Each server in a session of its own, so in an autogroup of its own (sched(7)): on a loaded
# machine the scheduler then shares the CPUs between the servers, the client and everyone else
# as systemd's per-service cgroups would, instead of giving the server the share of a client's
# thread. Off (BENCH_SERVER_SESSIONS=0): the servers share the benchmark's session.
SERVER_SESSIONS = os.environ.get("BENCH_SERVER_SESSIONS", "1") != "0"

CONNECT_SCRIPT = r"""
import nbd, sys, time, statistics
uri, n = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(n):
    t = time.perf_counter()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.get_size()
    times.append(time.perf_counter() - t)
    h.shutdown()
    del h
print(statistics.median(times))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("server did not start listening")


@contextlib.contextmanager
def nbdkit(image: Path):
    port = free_port()
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "file", f"file={image}"],
        env=ENV,
        start_new_session=SERVER_SESSIONS,
    )
    try:
        wait_port(port, proc)
        yield f"nbd://127.0.0.1:{port}/", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def nbdworker(image: Path, workdir: Path, repo: Path = REPO, workers: str = "auto"):
    port = free_port()
    cfg = {
        "version": 1,
        "generation": 1,
        "default_export": "bench",
        "exports": [{"name": "bench", "backend": "file", "path": str(image)}],
    }
    cfg_path = workdir / f"worker-{port}.json"
    cfg_path.write_text(json.dumps(cfg))
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
            "--workers",
            workers,
        ],
        cwd=repo,
        env=ENV,
        start_new_session=SERVER_SESSIONS,
    )
    try:
        wait_port(port, proc)
        yield f"nbd://127.0.0.1:{port}/", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime so far of process `pid` (all its threads) and its live children: the
    worker's serving processes are children of its supervisor."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return total + sum(cpu_seconds(child) for child in children)


def idle_seconds() -> float:
    """CPU time the whole machine has spent idle (idle + iowait, all CPUs) since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / CLOCK_TICKS


class CopyCost:
    """Per server and benchmark, for the runs that move the whole image: the server's CPU
    seconds per GiB and the machine's idle CPU seconds during the run. With the client on the
    same machine, idle CPUs while a copy runs show a server that leaves its share unused
    (bench/README.md, multi-connection writes)."""

    def __init__(self, size: int, reference: str = "nbdkit") -> None:
        self.gib = size / (1 << 30)
        self.reference = reference
        self.cpu: dict[str, dict[str, list[float]]] = {}
        self.idle: dict[str, dict[str, list[float]]] = {}

    def measure(self, name: str, server: str, pid: int, run, uri: str) -> tuple[float, str]:
        """run(uri) -> figure; returns it and a note for the progress line."""
        cpu, idle = cpu_seconds(pid), idle_seconds()
        value = run(uri)
        per_gib = (cpu_seconds(pid) - cpu) / self.gib
        idle = idle_seconds() - idle
        # A write's dirty pages go to disk now, not during the next server's turn.
        subprocess.run(["sync"], check=True)
        self.cpu.setdefault(name, {}).setdefault(server, []).append(per_gib)
        self.idle.setdefault(name, {}).setdefault(server, []).append(idle)
        return value, f", server CPU {per_gib:.2f} s/GiB, idle CPUs {idle:.2f} s"

    def print_table(self) -> None:
        if not self.cpu:
            return
        print()
        ref = self.reference
        print(
            f"{'server CPU per GiB / idle CPU s, median':47} {ref:>12} {'nbdworker':>12}"
            f" {'cpu ratio':>9}"
        )
        for name, per_server in self.cpu.items():
            kit, worker = (statistics.median(per_server[s]) for s in (ref, "nbdworker"))
            idle = self.idle[name]
            kit_idle, worker_idle = (statistics.median(idle[s]) for s in (ref, "nbdworker"))
            label = name.removesuffix(" (MB/s)")
            print(
                f"{label:47} {kit:5.2f} / {kit_idle:4.2f} {worker:5.2f} / {worker_idle:4.2f}"
                f" {kit / worker:8.2f}x"
            )
        print(f"(cpu ratio: {ref}'s CPU per GiB over nbdworker's, >1 is better)")


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def seq_read(uri: str, size: int, conns: int | None) -> float:
    extra = [f"--connections={conns}"] if conns else []
    return size / timed(["nbdcopy", "--no-extents", *extra, uri, "null:"]) / 1e6


def seq_write(uri: str, src: Path, size: int, conns: int | None) -> float:
    extra = [f"--connections={conns}"] if conns else []
    # Not synced here: CopyCost.measure syncs after its counters stop.
    return size / timed(["nbdcopy", *extra, str(src), uri]) / 1e6


def fio_iops(uri: str, rw: str, depth: int, runtime: int, jobs: int = 1) -> float:
    """IOPS of `jobs` fio jobs together (each job its own connection)."""
    out = subprocess.run(
        [
            "fio",
            f"--numjobs={jobs}",
            "--group_reporting",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            "--bs=4k",
            f"--iodepth={depth}",
            f"--runtime={runtime}",
            "--time_based",
            "--output-format=json",
        ],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return job["read"]["iops"] + job["write"]["iops"]


def connect_latency(uri: str, n: int) -> float:
    out = subprocess.run(
        ["/usr/bin/python3", "-c", CONNECT_SCRIPT, uri, str(n)],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip()) * 1000


def print_comparison(
    title: str,
    rows: list[tuple[str, bool]],
    runs: dict[str, dict[str, list[float]]],
    note: str,
    reference: str = "nbdkit",
) -> None:
    """One line per benchmark: each server's best figure and nbdworker's ratio to nbdkit; with
    several rounds also the ratio of the medians, which one lucky or unlucky run cannot move.

    `rows` is (name, higher_is_better); `runs[name][server]` holds every run's figure.
    """

    def ratio(kit: float, worker: float, up: bool) -> float:
        return worker / kit if up else kit / worker

    several = any(len(v) > 1 for per in runs.values() for v in per.values())
    header = f"{title:47} {reference:>10} {'nbdworker':>10} {'best':>7}"
    print(header + (f" {'median':>7}" if several else ""))
    for name, up in rows:
        kit_runs, worker_runs = runs[name][reference], runs[name]["nbdworker"]
        pick = max if up else min
        kit, worker = pick(kit_runs), pick(worker_runs)
        line = f"{name:47} {kit:10.2f} {worker:10.2f} {ratio(kit, worker, up):6.2f}x"
        if several:
            mid = ratio(statistics.median(kit_runs), statistics.median(worker_runs), up)
            line += f" {mid:6.2f}x"
        print(line)
    print(note)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=1 << 30)
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    p.add_argument("--connects", type=int, default=200)
    p.add_argument("--rounds", type=int, default=1, help="repeat: best and median figures")
    p.add_argument("--only", default="seq,fio,connect,tls")
    p.add_argument(
        "directory",
        nargs="?",
        default=None,
        help="where the images live, on the filesystem to measure (default: /var/tmp)",
    )
    p.add_argument("--dir", default=None, help="the same as DIR")
    p.add_argument("--markdown", type=Path, default=None, help="append the median table here")
    p.add_argument("--label", default=None, help="the filesystem's name in the markdown title")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="compare with nbdworker checked out here instead of nbdkit",
    )
    p.add_argument("--workers", default="auto", help="nbdworker's serving processes")
    p.add_argument("--fio-jobs", type=int, default=1, help="fio jobs (connections) per run")
    p.add_argument(
        "--versus-workers",
        default=None,
        help="compare with this same nbdworker run with this many serving processes",
    )
    args = p.parse_args()
    if args.baseline:
        reference = "before"
    elif args.versus_workers:
        reference = f"workers={args.versus_workers}"
    else:
        reference = "nbdkit"
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if not shutil.which(tool, path=ENV["PATH"]):
            print(f"missing {tool}", file=sys.stderr)
            return 2
    only = set(args.only.split(","))
    args.dir = args.directory or args.dir or "/var/tmp"
    fstype = filesystem_type(args.dir)
    print(f"filesystem under test: {fstype} ({args.dir})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="nbdbench-", dir=args.dir))
    image = work / "images" / "bench.img"
    image.parent.mkdir()
    src = work / "source.img"
    print(f"preparing {args.size >> 20} MiB of random data in {work}", flush=True)
    with open(src, "wb") as f:
        left = args.size
        while left:
            chunk = os.urandom(min(left, 16 << 20))
            f.write(chunk)
            left -= len(chunk)
    shutil.copyfile(src, image)

    # (name, "up" or "down", moves the whole image, run(uri) -> figure)
    tests: list[tuple[str, str, bool, object]] = []
    if "seq" in only:
        tests += [
            (
                "seq read, nbdcopy default (MB/s)",
                "up",
                True,
                lambda u: seq_read(u, args.size, None),
            ),
            (
                "seq read, nbdcopy --connections=1 (MB/s)",
                "up",
                True,
                lambda u: seq_read(u, args.size, 1),
            ),
            (
                "seq write, nbdcopy default (MB/s)",
                "up",
                True,
                lambda u: seq_write(u, src, args.size, None),
            ),
            (
                "seq write, nbdcopy --connections=1 (MB/s)",
                "up",
                True,
                lambda u: seq_write(u, src, args.size, 1),
            ),
        ]
    if "fio" in only:
        for rw in ("randread", "randwrite"):
            for depth in (1, 16):
                tests.append(
                    (
                        f"4k {rw} iodepth={depth} (IOPS)",
                        "up",
                        False,
                        lambda u, rw=rw, d=depth: fio_iops(u, rw, d, args.runtime, args.fio_jobs),
                    )
                )
    if "connect" in only:
        tests.append(
            (
                "connect-to-ready, median (ms)",
                "down",
                False,
                lambda u: connect_latency(u, args.connects),
            )
        )

    runs: dict[str, dict[str, list[float]]] = {}
    cost = CopyCost(args.size, reference)
    # Both servers run side by side on the same image and take turns test by test (the order
    # swapped every round), so a burst of load on a shared machine lands on both, not on one
    # server's whole series.
    with contextlib.ExitStack() as stack:
        if args.baseline:
            first = stack.enter_context(nbdworker(image, work, args.baseline.resolve()))
        elif args.versus_workers:
            first = stack.enter_context(nbdworker(image, work, workers=args.versus_workers))
        else:
            first = stack.enter_context(nbdkit(image))
        theirs = stack.enter_context(nbdworker(image, work, workers=args.workers))
        servers = [(reference, first), ("nbdworker", theirs)]
        for round_no in range(args.rounds):
            for name, _better, whole, fn in tests:
                for server_name, (uri, pid) in servers if round_no % 2 == 0 else servers[::-1]:
                    if whole:
                        value, note = cost.measure(name, server_name, pid, fn, uri)
                    else:
                        value, note = fn(uri), ""  # type: ignore[operator]
                    runs.setdefault(name, {}).setdefault(server_name, []).append(value)
                    print(f"  {server_name:9} {name}: {value:.2f}{note}", flush=True)

    print()
    print_comparison(
        "benchmark",
        [(name, better == "up") for name, better, _whole, _fn in tests],
        runs,
        f"(ratio: nbdworker relative to {reference}, >1 is better; for latency, "
        f"{reference}/nbdworker)",
        reference,
    )
    cost.print_table()
    shutil.rmtree(work, ignore_errors=True)
    rows = [(name, better == "up") for name, better, _whole, _fn in tests]
    if "tls" in only and reference == "nbdkit":
        # The same comparison over TLS, against nbdkit --tls=require (bench/tls.py).
        import tls

        print()
        tls_runs = tls.run_tls_bench(args.size, args.runtime, args.rounds, "seq,fio", args.dir)
        runs.update(tls_runs)
        rows += [(name, True) for name in tls_runs]
    if args.markdown:
        title = f"{args.label or fstype} ({fstype}, `{args.dir}`)"
        with open(args.markdown, "a") as f:
            f.write(markdown_table(title, rows, runs, reference, args) + "\n")
    return 0


def filesystem_type(path: str) -> str:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", path], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


# Issue 20's targets, ratio of medians to nbdkit: every figure >= 1.0 but these.
TARGETS = {
    "seq read, nbdcopy default (MB/s)": 1.2,
    "seq read, nbdcopy --connections=1 (MB/s)": 1.2,
    "4k randread iodepth=16 (IOPS)": 1.2,
    "TLS 4k randread iodepth=1 (IOPS)": 0.9,
}


def markdown_table(
    title: str,
    rows: list[tuple[str, bool]],
    runs: dict[str, dict[str, list[float]]],
    reference: str,
    args: argparse.Namespace,
) -> str:
    """One filesystem's medians, ratios and targets as a Markdown table."""
    rounds = args.rounds
    lines = [
        f"#### {title}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.size >> 20} MiB image, "
        f"{rounds} interleaved round(s), fio {args.runtime} s; "
        f"`bench/run.py {args.dir} --rounds {rounds} --runtime {args.runtime}`",
        "",
        f"| figure | {reference} (median) | nbdworker (median) | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for name, up in rows:
        kit = statistics.median(runs[name][reference])
        worker = statistics.median(runs[name]["nbdworker"])
        ratio = worker / kit if up else kit / worker
        target = TARGETS.get(name, 1.0)
        mark = "met" if ratio >= target else "**missed**"
        lines.append(
            f"| {name} | {kit:,.2f} | {worker:,.2f} | {ratio:.2f}x | {target:.1f}x {mark} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
