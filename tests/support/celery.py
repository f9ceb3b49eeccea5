"""A real Celery worker subprocess for tests (`celery -A nbdweb worker`), consuming one queue.

    worker = start_celery_worker("node.e2e-1a2b", workdir=tmp_path)
    ...
    worker.stop()

Or, in a test module or conftest, the session fixtures:

    from tests.support.celery import celery_node_name, celery_worker  # noqa: F401

`celery_worker` serves the queue `node.<celery_node_name>` (a name unique to this test session,
so a stray worker of another run never takes its jobs) against the test database: the
subprocess gets `DATABASE_URL` built from the test connection's settings (on SQLite the test
database is a file; see the SQLite block in nbdweb/settings.py). Tests that use it need
`@pytest.mark.django_db(transaction=True)`: the worker only sees committed rows.

The worker runs with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from its bounding set
(`setpriv`), so that even as root it gets EACCES from file modes, like a real unprivileged
Celery worker does; tests of "permission denied" rely on it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

__all__ = [
    "STARTUP_TIMEOUT",
    "RunningCelery",
    "celery_node_name",
    "celery_worker",
    "database_url",
    "start_celery_worker",
]

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60.0
_DROPPED_CAPABILITIES = "-dac_override,-dac_read_search"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills the worker if the test process dies
    without its teardown (a killed pytest), so no worker outlives the run."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def database_url(settings_dict: dict) -> str:
    """A DATABASE_URL (dj-database-url syntax) for a Django connection's settings."""
    engine = settings_dict["ENGINE"].rsplit(".", 1)[-1]
    if engine == "sqlite3":
        name = str(settings_dict["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise ValueError("an in-memory SQLite database cannot be shared with a subprocess")
        return f"sqlite:///{os.path.abspath(name)}"
    scheme = {"postgresql": "postgres", "mysql": "mysql"}.get(engine)
    if scheme is None:
        raise ValueError(f"no DATABASE_URL scheme for the {engine} backend")
    user = quote(settings_dict.get("USER") or "", safe="")
    password = quote(settings_dict.get("PASSWORD") or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "localhost"
    if ":" in host:
        host = f"[{host}]"
    port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
    return f"{scheme}://{credentials}{host}{port}/{quote(settings_dict['NAME'], safe='')}"


@dataclass
class RunningCelery:
    proc: subprocess.Popen
    queue: str | None
    _lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False

    @property
    def log(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def log_tail(self, n: int = 80) -> str:
        with self._cond:
            return "".join(self._lines[-n:])

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(text in line for line in self._lines):
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(
                        f"celery worker: no {text!r} in its log within {timeout:.0f}s "
                        f"(exit status {self.proc.poll()}):\n{self.log_tail()}"
                    )
                self._cond.wait(min(left, 0.5))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM: running jobs finish); SIGKILL the group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_celery_worker(
    queue: str | None,
    *,
    env: dict[str, str] | None = None,
    concurrency: int = 2,
    timeout: float = STARTUP_TIMEOUT,
    hostname: str | None = None,
) -> RunningCelery:
    """Start `celery -A nbdweb worker -Q queue` and wait until it is ready to take jobs; with
    `queue=None`, without `-Q`, as in production (the queue of `NBDWORKER_NODE` in `env`).

    `hostname`: the Celery node name (default: a new one), the same again to restart "the same"
    worker after killing it."""
    argv = [
        sys.executable, "-m", "celery", "-A", "nbdweb", "worker",
        *(["--queues", queue] if queue is not None else []),
        "--hostname", hostname or f"test-{uuid.uuid4().hex[:8]}@%h",
        "--concurrency", str(concurrency),
        "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv:
        argv = [setpriv, f"--bounding-set={_DROPPED_CAPABILITIES}", "--", *argv]
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        # Its own process group: the pool children go down with it if it must be killed.
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    worker = RunningCelery(proc, queue)
    threading.Thread(target=worker._pump, daemon=True).start()
    try:
        worker.wait_for_log(" ready.", timeout)
    except AssertionError:
        worker.stop(5)
        raise
    return worker


@pytest.fixture(scope="session")
def celery_node_name() -> str:
    """A node name unique to this test session; its queue is `node.<name>`."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def celery_worker(
    django_db_setup, django_db_blocker, celery_node_name: str, job_storage_roots: list[str]
) -> Iterator[RunningCelery]:
    """A Celery worker subprocess on the queue of `celery_node_name`, against the test DB, whose
    storage roots are the in-process jobs' (tests/conftest.py)."""
    from django.db import connection

    with django_db_blocker.unblock():
        url = database_url(connection.settings_dict)
    worker = start_celery_worker(
        f"node.{celery_node_name}",
        # Connections closed after each job: the test database can be flushed and dropped.
        env={
            "DATABASE_URL": url,
            "DATABASE_CONN_MAX_AGE": "0",
            "NBDWORKER_STORAGE_ROOTS": ":".join(job_storage_roots),
        },
    )
    yield worker
    worker.stop()
