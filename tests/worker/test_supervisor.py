"""`--workers N`: a supervisor and N serving processes (nbdworker/supervisor.py), driven as a
real worker: connections spread over the processes, limits that hold across them, one RAM
disk seen by all, metrics summed, a crashed process replaced, and clean ends."""

from __future__ import annotations

import functools
import glob
import os
import re
import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nbdworker.slots import ConnectionSlots
from nbdworker.supervisor import remove_stale_shared_memory
from tests.support.fixtures import make_image
from tests.support.polling import poll as wait_for
from tests.support.rawclient import RawClient, serves_fresh_client
from tests.support.worker import memory_export as mem
from tests.support.worker import run_worker_main

MiB = 1 << 20
DEADLINE = 15.0


def config(*exports: dict, **top) -> dict:
    return {"version": 1, "exports": list(exports), **top}


poll = functools.partial(wait_for, timeout=DEADLINE)


def serving_pids(worker) -> list[int]:
    match = re.search(r"serving processes \(pids ([\d, ]+)\)", worker.log)
    assert match, worker.log_tail()
    return [int(p) for p in match.group(1).split(", ")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def connected_pids(worker, start: int = 0) -> list[int]:
    """Serving process of each connection, in order, from the DEBUG 'connected' lines."""
    return [
        int(m.group(1))
        for m in re.finditer(r"nbdworker\.connection\[(\d+)\]: \S+: connected", worker.log[start:])
    ]


def wait_connected(worker, n: int) -> list[int]:
    return poll(lambda: (len(p := connected_pids(worker)) >= n) and p, f"{n} connections")


def test_connections_are_spread_over_the_serving_processes(worker_factory):
    w = worker_factory(config(mem("a")), args=["--workers", "2"], log_level="DEBUG")
    pids = serving_pids(w)
    assert len(set(pids)) == 2 and w.proc.pid not in pids
    clients = [RawClient.open(w.host, w.port, "a") for _ in range(4)]
    try:
        got = wait_connected(w, 4)
        # The least loaded process accepts: two and two, whatever order the kernel wakes them.
        assert sorted(got.count(p) for p in pids) == [2, 2], got
        for c in clients:
            assert c.read(0, 4096).error == 0
    finally:
        for c in clients:
            c.close()


def test_connections_opened_together_are_spread_too(worker_factory):
    # nbdcopy opens its connections together: all four are in the backlog before any handshake.
    w = worker_factory(config(mem("a")), args=["--workers", "2"], log_level="DEBUG")
    pids = serving_pids(w)
    clients = [RawClient(w.host, w.port) for _ in range(4)]
    try:
        got = wait_connected(w, 4)
        assert sorted(got.count(p) for p in pids) == [2, 2], got
        for c in clients:
            c.greet()
            c.go("a")
            assert c.read(0, 4096).error == 0
    finally:
        for c in clients:
            c.close()


def test_memory_export_is_one_disk_for_every_process(worker_factory):
    w = worker_factory(config(mem("a")), args=["--workers", "2"], log_level="DEBUG")
    data = os.urandom(256 * 1024)
    first = RawClient.open(w.host, w.port, "a")
    second = RawClient.open(w.host, w.port, "a")
    try:
        pids = wait_connected(w, 2)
        assert pids[0] != pids[1]
        assert first.write(MiB, data) == 0
        assert second.read(MiB, len(data)).data == data
    finally:
        first.close()
        second.close()


def test_file_export_writes_reach_the_image(worker_factory, tmp_path):
    image = make_image(tmp_path / "images" / "disk.img", 8 * MiB)
    w = worker_factory(
        config({"name": "d", "backend": "file", "path": str(image)}), args=["--workers", "3"]
    )
    data = os.urandom(64 * 1024)
    clients = [RawClient.open(w.host, w.port, "d") for _ in range(3)]
    try:
        for i, c in enumerate(clients):
            assert c.write(i * MiB, data) == 0
        for i in range(3):
            other = clients[(i + 1) % 3]
            assert other.read(i * MiB, len(data)).data == data
    finally:
        for c in clients:
            c.close()
    with open(image, "rb") as f:
        content = f.read()
    assert all(content[i * MiB : i * MiB + len(data)] == data for i in range(3))


def test_global_limit_holds_across_processes(worker_factory):
    w = worker_factory(config(mem("a"), limits={"max_connections": 2}), args=["--workers", "2"])
    first = RawClient.open(w.host, w.port, "a")
    second = RawClient.open(w.host, w.port, "a")
    try:
        # Whichever process takes the third, the worker as a whole is full.
        for _ in range(3):
            with RawClient(w.host, w.port) as extra:
                assert extra.closed_by_server()
        w.wait_for_log("connection limit reached")
        first.close()

        poll(lambda: serves_fresh_client(w.host, w.port, "a"), "a slot to free up")
    finally:
        first.close()
        second.close()


def test_export_limit_holds_across_processes(worker_factory):
    w = worker_factory(
        config(mem("a", max_connections=1), mem("b")), args=["--workers", "2"], log_level="DEBUG"
    )
    holder = RawClient.open(w.host, w.port, "a")
    try:
        # The next client goes to the other process (it has fewer connections): the refusal
        # must come from the count shared with the holder's process.
        with RawClient(w.host, w.port) as c:
            c.greet()
            c.refused_go("a")
            c.go("b")  # other exports are not affected
        holder_pid, refused_pid = wait_connected(w, 2)[:2]
        assert holder_pid != refused_pid
    finally:
        holder.close()


def test_metrics_are_summed_over_the_processes(worker_factory):
    w = worker_factory(
        config(mem("m"), generation=7),
        args=["--workers", "2", "--metrics-listen", "127.0.0.1:0"],
        log_level="DEBUG",
    )
    clients = [RawClient.open(w.host, w.port, "m") for _ in range(2)]
    try:
        poll(lambda: len(set(connected_pids(w))) == 2, "one connection per process")
        for n, c in enumerate(clients, start=1):
            for _ in range(n):
                assert c.read(0, 4096).error == 0
        address = w.wait_for_log(r"metrics on (http://\S+/metrics)").group(1)
        with urllib.request.urlopen(address, timeout=10) as response:
            text = response.read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples["nbdworker_open_connections", (("export", "m"),)] == 2
        assert samples["nbdworker_requests_total", (("command", "read"), ("export", "m"))] == 3
        assert samples["nbdworker_config_generation", ()] == 7
    finally:
        for c in clients:
            c.close()


def test_a_crashed_serving_process_is_replaced(worker_factory):
    w = worker_factory(config(mem("a"), limits={"max_connections": 2}), args=["--workers", "2"])
    pids = serving_pids(w)
    victim = RawClient.open(w.host, w.port, "a")
    survivor = RawClient.open(w.host, w.port, "a")
    try:
        os.kill(pids[0], signal.SIGKILL)
        w.wait_for_log(rf"serving process 0 \(pid {pids[0]}\) exited .*: starting it again")
        new_pid = int(w.wait_for_log(r"serving process 0 serves again \(pid (\d+)\)").group(1))
        assert new_pid != pids[0] and alive(new_pid)
        # The dead process's connection no longer holds a slot: two fresh clients fit, one of
        # them on the new process.
        victim.close()
        survivor.close()

        def two_fit() -> bool:
            try:
                a = RawClient.open(w.host, w.port, "a")
                b = RawClient.open(w.host, w.port, "a")
            except (EOFError, ConnectionError, AssertionError):
                return False
            ok = a.read(0, 512).error == 0 and b.read(0, 512).error == 0
            a.close()
            b.close()
            return ok

        poll(two_fit, "two connections after the restart")
    finally:
        victim.close()
        survivor.close()


def test_sigterm_ends_every_process_and_cleans_up(worker_factory):
    w = worker_factory(config(mem("a")), args=["--workers", "2"])
    pids = serving_pids(w)
    c = RawClient.open(w.host, w.port, "a")
    assert c.write(0, b"x" * 4096) == 0
    shm = glob.glob(f"/dev/shm/nbdworker-{w.proc.pid}-*")
    assert shm, "memory export not in shared memory"
    w.signal(signal.SIGTERM)
    assert c.closed_by_server()
    c.close()
    assert w.wait() == 0
    poll(lambda: not any(alive(p) for p in pids), "serving processes to exit")
    assert not glob.glob(f"/dev/shm/nbdworker-{w.proc.pid}-*")


def test_serving_processes_die_with_the_supervisor(worker_factory):
    w = worker_factory(config(mem("a")), args=["--workers", "2"])
    pids = serving_pids(w)
    with RawClient.open(w.host, w.port, "a") as c:
        assert c.write(0, b"x" * 4096) == 0
    w.kill()
    poll(lambda: not any(alive(p) for p in pids), "serving processes to follow the supervisor")
    # SIGKILL left the memory export's file behind; the next supervisor removes it.
    left = glob.glob(f"/dev/shm/nbdworker-{w.proc.pid}-*")
    assert left
    worker_factory(config(mem("a")), args=["--workers", "2"])
    assert not any(os.path.exists(p) for p in left)


def test_stale_shared_memory_of_live_supervisors_is_kept(tmp_path):
    live = tmp_path / f"nbdworker-{os.getpid()}-abc"
    gone = tmp_path / "nbdworker-999999999-abc"
    other = tmp_path / "nbdworker-notapid-abc"
    for path in (live, gone, other):
        path.write_bytes(b"x")
    assert remove_stale_shared_memory(str(tmp_path)) == [str(gone)]
    assert live.exists() and other.exists() and not gone.exists()


@pytest.mark.parametrize("value", ["0", "65", "lots"])
def test_bad_workers_value_is_a_usage_error(value):
    proc = run_worker_main("--workers", value, "--config", "/nonexistent")
    assert proc.returncode == 2
    assert "--workers" in proc.stderr


def test_slots_count_across_processes():
    slots = ConnectionSlots.create(3)
    other = slots.for_process(2)
    assert slots.try_open_connection(2) and other.try_open_connection(2)
    assert not slots.try_open_connection(2) and not other.try_open_connection(2)
    assert slots.total_connections() == 2
    assert not slots.least_loaded() and not other.least_loaded()
    assert slots.for_process(1).least_loaded()  # process 1 has none
    slots.open_export("disk")
    other.open_export("disk")
    assert slots.for_process(1).export_connections("disk") == 2
    assert slots.export_connections("other") == 0
    slots.reset(2)  # process 2 died: its counts go
    assert slots.total_connections() == 1
    assert slots.export_connections("disk") == 1
    slots.close_export("disk")
    slots.close_connection()
    assert slots.total_connections() == 0 and slots.export_connections("disk") == 0
