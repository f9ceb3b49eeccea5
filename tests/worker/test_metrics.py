"""The worker's Prometheus endpoint (nbdworker/metrics.py), scraped from a real worker."""

from __future__ import annotations

import socket
import time

from nbdworker.protocol import Errno, Option, Reply
from tests.support.metrics import scrape, value
from tests.support.nbdclient import encode_info_request
from tests.support.rawclient import RawClient
from tests.support.worker import RunningWorker

MiB = 1 << 20


def poll_metric(worker: RunningWorker, name: str, want: float, **labels: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(worker)
        if value(samples, name, **labels) == want or time.monotonic() > deadline:
            assert value(samples, name, **labels) == want, (name, labels, samples)
            return samples
        time.sleep(0.05)


def test_requests_bytes_errors_and_generation_are_counted(worker_factory) -> None:
    config = {
        "generation": 42,
        "exports": [{"name": "m", "backend": "memory", "size": 4 * MiB}],
    }
    worker = worker_factory(config, args=["--metrics-listen", "127.0.0.1:0"])
    with RawClient.open(worker.host, worker.port, "m") as c:
        for _ in range(3):
            assert c.write(0, b"x" * 4096) == 0
        for _ in range(5):
            assert c.read(0, 8192).error == 0
        # Past the end: EINVAL, counted as an error and not as a read.
        assert c.read(4 * MiB, 512).error == Errno.EINVAL
        samples = scrape(worker)  # while the connection is live
        assert value(samples, "nbdworker_open_connections", export="m") == 1
        assert value(samples, "nbdworker_requests_total", export="m", command="read") == 5
        assert value(samples, "nbdworker_requests_total", export="m", command="write") == 3
        assert value(samples, "nbdworker_request_bytes_total", export="m", command="read") == (
            5 * 8192
        )
        assert value(samples, "nbdworker_request_bytes_total", export="m", command="write") == (
            3 * 4096
        )
        assert value(samples, "nbdworker_errors_total", export="m", errno="EINVAL") == 1
        assert value(samples, "nbdworker_config_generation") == 42
        c.disconnect()
    # After the connection ended its counts stay (counters never go down).
    samples = poll_metric(worker, "nbdworker_open_connections", 0, export="m")
    assert value(samples, "nbdworker_requests_total", export="m", command="read") == 5
    assert value(samples, "nbdworker_connections_total", export="m") == 1


def test_handshake_failures_are_counted_by_reason(worker_factory) -> None:
    config = {
        "exports": [
            {"name": "far", "backend": "memory", "size": MiB, "allowed_networks": ["10.0.0.0/8"]}
        ],
        "limits": {"handshake_timeout": 0.5},
    }
    worker = worker_factory(config, args=["--metrics-listen", "127.0.0.1:0"])
    with RawClient(worker.host, worker.port) as c:
        c.greet()
        c.send(encode_info_request(Option.GO, "far"))
        assert c.collect_replies()[-1].reply == Reply.ERR_POLICY
    poll_metric(worker, "nbdworker_handshake_failures_total", 1, reason="not_authorized")
    # A client that never finishes the handshake.
    with socket.create_connection((worker.host, worker.port)) as sock:
        sock.recv(1024)
        poll_metric(worker, "nbdworker_handshake_failures_total", 1, reason="timeout")


def test_metrics_are_off_unless_asked_for(worker_factory) -> None:
    worker = worker_factory({"exports": []})
    assert "metrics on" not in worker.log
