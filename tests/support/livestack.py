"""`make run`'s whole stack (scripts/runstack.py: gunicorn, Celery, beat, nbdworker and a
private Redis) on free ports and a fresh data dir, with an API token for its admin.

    with running_stack(tmp_path) as stack:
        stack.url, stack.token, stack.nbd_port, stack.images, stack.env

`env` overrides the stack's environment (e.g. a REDIS_URL that answers: no private Redis then).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.polling import poll
from tests.support.redisserver import free_port

__all__ = ["ADMIN_PASSWORD", "RunningStack", "running_stack"]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 180.0
ADMIN_PASSWORD = "a-long-live-stack-password"


@dataclass
class RunningStack:
    url: str
    token: str
    nbd_port: int
    images: Path
    env: dict[str, str]
    log: Path


def _stack_env(data: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "SECRET_KEY", "DJANGO_SETTINGS_MODULE"}
        and not key.startswith("NBDW")
    }
    env.update(
        NBDWEB_DATA_DIR=str(data),
        NBDWEB_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        NBD_LISTEN=f"127.0.0.1:{free_port()}",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # runstack starts a private one
        DJANGO_SUPERUSER_USERNAME="admin",
        DJANGO_SUPERUSER_PASSWORD=ADMIN_PASSWORD,
        GUNICORN_WORKERS="2",
        NBDWORKER_WORKERS="1",
    )
    return env


@contextlib.contextmanager
def running_stack(workdir: Path, env: dict[str, str] | None = None) -> Iterator[RunningStack]:
    data = workdir / "data"
    env = {**_stack_env(data), **(env or {})}
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "runstack.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "scripts/runstack.py"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"make run exited:\n{log_path.read_text()[-5000:]}")
            return "ready: admin" in log_path.read_text()

        poll(ready, "make run's ready line", timeout=START_TIMEOUT)
        # An operator's shell: the same data dir (SQLite, secrets); a token needs no Redis.
        result = subprocess.run(
            [sys.executable, "manage.py", "create_api_token", "admin"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        yield RunningStack(
            url=f"http://{env['NBDWEB_HTTP_ADDR']}",
            token=result.stdout.strip().splitlines()[-1],
            nbd_port=int(env["NBD_LISTEN"].rsplit(":", 1)[1]),
            images=data / "images",
            env=env,
            log=log_path,
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
