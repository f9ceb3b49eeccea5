"""Busy polling before the event loop sleeps (nbdworker/spin.py) and its setting."""

from __future__ import annotations

import socket
import time

import pytest

from nbdworker.contract.config import ConfigError
from nbdworker.settings import WorkerSettings
from nbdworker.spin import BACKOFF_SECONDS, MAX_EMPTY_SPINS, IdleSpinner
from tests.support.rawclient import RawClient


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_spin_ends_as_soon_as_a_watched_socket_is_readable(pair):
    ours, theirs = pair
    spinner = IdleSpinner(1_000_000)  # a second: only data may end it early
    spinner.watch(ours.fileno())
    theirs.send(b"x")
    started = time.perf_counter()
    assert spinner.spin() is True
    assert time.perf_counter() - started < 0.5


def test_spin_gives_up_after_its_budget(pair):
    ours, _theirs = pair
    spinner = IdleSpinner(2000)  # 2 ms
    spinner.watch(ours.fileno())
    started = time.perf_counter()
    assert spinner.spin() is False
    assert time.perf_counter() - started >= 0.002


def test_empty_spins_back_off_and_data_resets_them(pair):
    ours, theirs = pair
    spinner = IdleSpinner(100)
    spinner.watch(ours.fileno())
    for _ in range(MAX_EMPTY_SPINS):
        assert spinner.spin() is False
    # Backing off: even readable data is not polled for until the pause is over.
    theirs.send(b"x")
    assert spinner.spin() is False
    spinner._resume_at = time.perf_counter()  # the pause (BACKOFF_SECONDS) is over
    assert BACKOFF_SECONDS > 0
    assert spinner.spin() is True
    assert spinner._empty == 0


def test_forgotten_sockets_are_not_polled(pair):
    ours, theirs = pair
    spinner = IdleSpinner(2000)
    spinner.watch(ours.fileno())
    spinner.forget(ours.fileno())
    spinner.forget(ours.fileno())  # twice is harmless
    theirs.send(b"x")
    assert spinner.spin() is False


def test_zero_budget_is_off():
    assert not IdleSpinner(0).enabled
    assert IdleSpinner(50).enabled


def test_setting_from_the_environment(tmp_path):
    env = {"NBDWEB_DATA_DIR": str(tmp_path)}
    assert WorkerSettings.from_sources(environ=env).busy_poll_us == 50
    assert (
        WorkerSettings.from_sources(environ={**env, "NBDWORKER_BUSY_POLL_US": "0"}).busy_poll_us
        == 0
    )
    for bad in ("fast", "-1", "1001"):
        with pytest.raises(ConfigError, match="NBDWORKER_BUSY_POLL_US"):
            WorkerSettings.from_sources(environ={**env, "NBDWORKER_BUSY_POLL_US": bad})


@pytest.mark.parametrize("budget", ["0", "50"])
def test_worker_serves_with_busy_polling_on_and_off(worker_factory, budget):
    w = worker_factory(
        {"version": 1, "exports": [{"name": "m", "backend": "memory", "size": 1 << 20}]},
        env={"NBDWORKER_BUSY_POLL_US": budget},
    )
    with RawClient.open(w.host, w.port, "m") as c:
        for i in range(50):
            assert c.write(i * 4096, bytes([i]) * 4096) == 0
        for i in range(50):
            assert c.read(i * 4096, 4096).data == bytes([i]) * 4096


def test_bad_setting_stops_the_worker(worker_factory):
    from tests.support.worker import WorkerError

    with pytest.raises(WorkerError):
        worker_factory(
            {"version": 1, "exports": []}, env={"NBDWORKER_BUSY_POLL_US": "lots"}, timeout=10
        )
