"""Pytest fixtures for conftest.py files to import: `worker_factory` (around `run_worker`), and
`redis_server` / `web_redis` (a private Redis the web side talks to):

from tests.support.fixtures import worker_factory  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.worker import RunningWorker, start_worker

__all__ = ["make_image", "redis_server", "web_redis", "worker_factory"]


def make_image(path: Path, size: int, data: bytes = b"", offset: int = 0) -> Path:
    """A sparse image file of `size` bytes, optionally with `data` written at `offset`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.seek(offset)
            f.write(data)
    return path


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., RunningWorker]]:
    """Start workers for this test (`factory(config, **start_worker_kwargs)`); all are stopped
    at teardown. The storage root defaults to `tmp_path / "images"`."""
    workers: list[RunningWorker] = []

    def factory(config: dict[str, Any], **kw: Any) -> RunningWorker:
        kw.setdefault("storage_root", tmp_path / "images")
        (tmp_path / "images").mkdir(exist_ok=True)
        w = start_worker(config, workdir=tmp_path / f"worker{len(workers)}", **kw)
        workers.append(w)
        return w

    yield factory
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[PrivateRedis]:
    """A private redis-server for the test module (tests.support.redisserver)."""
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def web_redis(redis_server: PrivateRedis, settings) -> redis.Redis:
    """The Redis the web side reads and writes (sessions, heartbeats, events, snapshots): the
    module's private server, emptied, with settings.REDIS_URL pointing at it."""
    settings.REDIS_URL = redis_server.url
    client = redis_server.client()
    client.flushdb()
    return client
