"""`make run`'s whole stack (scripts/runstack.py: gunicorn, Celery, beat, nbdworker and a
private Redis) on free ports and a fresh data dir, with an API token for its admin.

    with running_stack(tmp_path) as stack:
        stack.url, stack.token, stack.nbd_port, stack.images, stack.env

`env` overrides the stack's environment (e.g. a REDIS_URL that answers: no private Redis then).

For tests of the start-up itself (its output, its processes, what they survive),
`started_stack` yields as soon as runstack runs, with its output read line by line:

    with started_stack(tmp_path, {"REDIS_URL": ...}) as stack:
        stack.wait_for(lambda: http_status(stack.api) is not None, "the web answering")
        stack.lines, stack.output(), stack.proc, stack.http, stack.nbd, stack.env
        create_api_token(stack.env)

`descendants(pid)`, `alive(pid)` and `http_status(url)` look at its processes and its web.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.polling import poll
from tests.support.redisserver import free_port
from tests.support.tools import client_env, require_tool

__all__ = [
    "ADMIN_PASSWORD",
    "ROOT",
    "RunningStack",
    "StartedStack",
    "alive",
    "create_api_token",
    "descendants",
    "http_status",
    "running_stack",
    "stack_env",
    "started_stack",
]

ROOT = Path(__file__).resolve().parents[2]
# A loaded CI machine takes minutes to bring every process up.
START_TIMEOUT = 180.0
ADMIN_PASSWORD = "a-long-live-stack-password"


def api_call(url: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    """One call of the REST API at `url` with `token`, answered in JSON."""
    request = urllib.request.Request(
        f"{url}/api/v1/{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@dataclass
class RunningStack:
    url: str
    token: str
    nbd_port: int
    images: Path
    env: dict[str, str]
    log: Path

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call of the stack's REST API with its admin token, answered in JSON."""
        return api_call(self.url, self.token, method, path, body)

    def served_export(self, name: str) -> dict | None:
        """nbdinfo's view of export `name` on the stack's nbdworker, or None if not served."""
        result = subprocess.run(
            [require_tool("nbdinfo"), "--json", f"nbd://127.0.0.1:{self.nbd_port}/{name}"],
            capture_output=True,
            text=True,
            env=client_env(),
            timeout=30,
        )
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)["exports"][0]


def stack_env(data: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stack of its own: none of this shell's nbdweb, Redis or database
    settings; free ports, the data dir `data`, an admin; then `overrides`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"SECRET_KEY", "DJANGO_SETTINGS_MODULE"}
        and not key.startswith(("NBDW", "REDIS_", "DATABASE_"))
    }
    env.update(
        NBDWEB_DATA_DIR=str(data),
        NBDWEB_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        NBD_LISTEN=f"127.0.0.1:{free_port()}",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # runstack starts a private one
        DJANGO_SUPERUSER_USERNAME="admin",
        DJANGO_SUPERUSER_PASSWORD=ADMIN_PASSWORD,
        GUNICORN_WORKERS="1",
    )
    env.update(overrides or {})
    return env


def create_api_token(env: dict[str, str]) -> str:
    """A token for the stack's admin, made as an operator would (`manage.py`, the stack's
    data dir and database); a token needs no Redis."""
    result = subprocess.run(
        [sys.executable, "manage.py", "create_api_token", "admin"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def http_status(url: str) -> int | None:
    """The status `url` answers with; None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class StartedStack:
    """runstack's process, its addresses and environment, and its output so far (`lines`)."""

    def __init__(self, proc: subprocess.Popen, env: dict[str, str]) -> None:
        self.proc = proc
        self.env = env
        self.http = env["NBDWEB_HTTP_ADDR"]
        self.nbd = env["NBD_LISTEN"]
        self.api = f"http://{self.http}/api/v1/"
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def wait_for(self, predicate: Callable[[], object], what: str, timeout: float = START_TIMEOUT):
        """Poll `predicate` until it is true; fail naming `what` (with the output) when runstack
        exits first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                pytest.fail(
                    f"make run exited ({self.proc.returncode}) before {what}:\n{self.output()}"
                )
            time.sleep(0.2)
        pytest.fail(f"{what} did not happen within {timeout:.0f}s:\n{self.output()}")


@contextlib.contextmanager
def started_stack(workdir: Path, env: dict[str, str] | None = None) -> Iterator[StartedStack]:
    """Start runstack with `stack_env(workdir / "data", env)`; stop it at the end (SIGTERM,
    then SIGKILL to it and everything below it if it has not stopped within 30 s)."""
    full_env = stack_env(workdir / "data", env)
    proc = subprocess.Popen(
        [sys.executable, "scripts/runstack.py"],
        cwd=ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield StartedStack(proc, full_env)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                # Children first: once runstack is gone they belong to init, and a Celery
                # worker whose Redis died with it would wait for it forever.
                for pid in descendants(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def running_stack(workdir: Path, env: dict[str, str] | None = None) -> Iterator[RunningStack]:
    data = workdir / "data"
    env = stack_env(data, {"GUNICORN_WORKERS": "2", "NBDWORKER_WORKERS": "1", **(env or {})})
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
        yield RunningStack(
            url=f"http://{env['NBDWEB_HTTP_ADDR']}",
            # An operator's shell: the same data dir (SQLite, secrets).
            token=create_api_token(env),
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
