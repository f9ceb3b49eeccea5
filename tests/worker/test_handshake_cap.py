"""One client address cannot hold every connection slot with idle handshakes: the connections
of one address still negotiating are capped (`--max-handshakes-per-address`,
NBDWORKER_MAX_HANDSHAKES_PER_ADDRESS). Two loopback addresses play the two peers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from nbdworker.contract.config import ConfigError
from nbdworker.server import handshake_peer_key
from nbdworker.settings import WorkerSettings
from tests.support.metrics import scrape, value
from tests.support.nbdclient import GREETING_SIZE
from tests.support.polling import poll
from tests.support.rawclient import RawClient
from tests.support.worker import RunningWorker

ATTACKER, OTHER = "127.0.0.1", "127.0.0.2"
CAP = 4
MAX_CONNECTIONS = 8
MiB = 1 << 20


@pytest.fixture
def worker(worker_factory) -> RunningWorker:
    config = {
        "exports": [{"name": "m", "backend": "memory", "size": 4 * MiB}],
        # Slots enough for the attacker to take them all without the cap.
        "limits": {"max_connections": MAX_CONNECTIONS, "handshake_timeout": 30.0},
    }
    return worker_factory(
        config,
        args=["--workers", "1", "--metrics-listen", "127.0.0.1:0"],
        env={"NBDWORKER_MAX_HANDSHAKES_PER_ADDRESS": str(CAP)},
    )


def idle_handshake(worker: RunningWorker, source: str) -> RawClient:
    """A connection that reads the greeting and then says nothing (until the deadline)."""
    c = RawClient(worker.host, worker.port, source=source)
    c.recv_exact(GREETING_SIZE)
    return c


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def test_one_address_cannot_lock_another_out(worker, stack) -> None:
    held = [stack.enter_context(idle_handshake(worker, ATTACKER)) for _ in range(CAP)]
    extras = [
        stack.enter_context(RawClient(worker.host, worker.port, source=ATTACKER))
        for _ in range(MAX_CONNECTIONS - CAP)
    ]
    # Without the cap these eight held every slot (until the handshake deadline) and this
    # peer was turned away. Now it gets in and is served.
    with RawClient.open(worker.host, worker.port, "m", source=OTHER) as c:
        assert c.write(0, b"z" * 4096) == 0
        assert c.read(0, 4096).data == b"z" * 4096
    # Over the cap: closed at once.
    for extra in extras:
        assert extra.closed_by_server()
    worker.wait_for_log(rf"{ATTACKER}:\d+: refused: {CAP} connections from {ATTACKER} are")
    samples = scrape(worker)
    refused = value(samples, "nbdworker_handshake_failures_total", reason="handshake_cap")
    assert refused == MAX_CONNECTIONS - CAP
    # One of the attacker's handshakes ends: its address may start another.
    held.pop().close()
    poll(
        lambda: value(scrape(worker), "nbdworker_open_connections", export="") == CAP - 1,
        "the closed handshake to be forgotten",
    )
    again = stack.enter_context(RawClient.open(worker.host, worker.port, "m", source=ATTACKER))
    assert again.read(0, 4096).error == 0


def test_connections_in_transmission_do_not_count(worker, stack) -> None:
    """The cap is on handshakes only: an address may have many connections serving."""
    for _ in range(CAP + 2):
        c = stack.enter_context(RawClient.open(worker.host, worker.port, "m", source=ATTACKER))
        assert c.read(0, 512).error == 0
    stack.enter_context(idle_handshake(worker, ATTACKER))


def test_the_cap_is_a_setting(tmp_path) -> None:
    assert WorkerSettings.from_sources([str(tmp_path)], environ={}).handshakes_per_address > 0
    env = {"NBDWORKER_MAX_HANDSHAKES_PER_ADDRESS": "7"}
    assert WorkerSettings.from_sources([str(tmp_path)], environ=env).handshakes_per_address == 7
    for bad in ("x", "-1", "\u00b2"):
        with pytest.raises(ConfigError):
            WorkerSettings.from_sources(
                [str(tmp_path)], environ={"NBDWORKER_MAX_HANDSHAKES_PER_ADDRESS": bad}
            )


@pytest.mark.parametrize(
    ("first", "second", "same_peer"),
    [
        # One host picks any address of its /64: they count as one peer.
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("fe80::1%eth0", "fe80::2%eth1", True),
        ("::ffff:192.0.2.7", "192.0.2.7", True),
        ("192.0.2.7", "192.0.2.8", False),
    ],
)
def test_ipv6_peers_are_counted_by_their_64(first, second, same_peer) -> None:
    assert (handshake_peer_key(first) == handshake_peer_key(second)) is same_peer


# -- the cap per serving process, whoever negotiates -------------------------------------------

PROCESS_LIMIT = 6
SOURCES = [f"127.0.0.{i}" for i in range(10, 20)]  # many peers, each under its own cap


@pytest.fixture
def limited_worker(worker_factory) -> RunningWorker:
    config = {
        "exports": [{"name": "m", "backend": "memory", "size": 4 * MiB}],
        "limits": {"max_connections": 64, "handshake_timeout": 30.0},
    }
    return worker_factory(
        config,
        args=["--workers", "1", "--metrics-listen", "127.0.0.1:0"],
        env={
            "NBDWORKER_MAX_HANDSHAKES_PER_ADDRESS": str(CAP),
            "NBDWORKER_MAX_HANDSHAKES": str(PROCESS_LIMIT),
        },
    )


def test_many_addresses_cannot_hold_more_handshakes_than_the_process_allows(
    limited_worker, stack
) -> None:
    """Idle handshakes from many addresses (each under its own cap) were limited only by the
    connection limit: all of its slots negotiating at once. Now one serving process negotiates
    at most NBDWORKER_MAX_HANDSHAKES; the rest are closed at once, counted; once handshakes end,
    clients get in again, and sessions already serving are untouched."""
    worker = limited_worker
    serving = stack.enter_context(RawClient.open(worker.host, worker.port, "m", source=OTHER))
    held = [
        stack.enter_context(idle_handshake(worker, SOURCES[i % len(SOURCES)]))
        for i in range(PROCESS_LIMIT)
    ]
    extras = [
        stack.enter_context(RawClient(worker.host, worker.port, source=source))
        for source in SOURCES[:4]
    ]
    for extra in extras:
        assert extra.closed_by_server()
    worker.wait_for_log(rf"refused: {PROCESS_LIMIT} connections are still negotiating")
    samples = scrape(worker)
    assert value(samples, "nbdworker_handshake_failures_total", reason="handshake_limit") == 4
    assert value(samples, "nbdworker_open_connections", export="") == PROCESS_LIMIT
    assert serving.read(0, 4096).error == 0
    for c in held:
        c.close()
    poll(
        lambda: value(scrape(worker), "nbdworker_open_connections", export="") == 0,
        "the idle handshakes to be forgotten",
    )
    with RawClient.open(worker.host, worker.port, "m", source=SOURCES[0]) as c:
        assert c.read(0, 4096).error == 0


def test_the_process_limit_is_a_setting(tmp_path) -> None:
    assert WorkerSettings.from_sources([str(tmp_path)], environ={}).max_handshakes > 0
    env = {"NBDWORKER_MAX_HANDSHAKES": "9"}
    assert WorkerSettings.from_sources([str(tmp_path)], environ=env).max_handshakes == 9
    for bad in ("x", "-1", "\u00b2", "\u0661"):
        with pytest.raises(ConfigError):
            WorkerSettings.from_sources([str(tmp_path)], environ={"NBDWORKER_MAX_HANDSHAKES": bad})
