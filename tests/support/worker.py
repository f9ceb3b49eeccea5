"""Run a real nbdworker subprocess for a test.

    with run_worker(config, storage_root=tmp_path) as w:
        subprocess.run(["nbdinfo", w.uri("disk")])

`config` is a dict (the JSON snapshot) or a `WorkerConfig`; None starts the worker without
`--config`, following its node's config in Redis (pass REDIS_URL and the secret in `env`).
The worker listens on a free port (`--listen 127.0.0.1:0`; the harness reads the port from the
"listening on" log line), or on the addresses given. Startup waits for the "ready" line with a
deadline; the context always stops the worker (SIGTERM, then SIGKILL) and, on failure, the log
is in the assertion message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbdworker.contract.config import WorkerConfig

__all__ = [
    "RunningWorker",
    "WorkerError",
    "file_export",
    "memory_export",
    "run_worker",
    "run_worker_main",
]

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0
_LISTEN_RE = re.compile(r"listening on (unix:\S+|\[[^\]]+\]:\d+|[^\s:]+:\d+)")


class WorkerError(AssertionError):
    pass


def memory_export(name: str, size: int = 16 << 20, **kw: Any) -> dict[str, Any]:
    return {"name": name, "backend": "memory", "size": size, **kw}


def file_export(name: str, path: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    return {"name": name, "backend": "file", "path": str(path), **kw}


@dataclass
class RunningWorker:
    proc: subprocess.Popen
    config_path: Path | None
    addresses: list[str] = field(default_factory=list)
    _lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    # -- addresses ------------------------------------------------------------------------------

    @property
    def tcp(self) -> tuple[str, int]:
        """(host, port) of the first TCP listener."""
        for addr in self.addresses:
            if not addr.startswith("unix:"):
                host, _, port = addr.rpartition(":")
                return host.strip("[]"), int(port)
        raise WorkerError("the worker has no TCP listener")

    @property
    def host(self) -> str:
        return self.tcp[0]

    @property
    def port(self) -> int:
        return self.tcp[1]

    def uri(self, export: str = "") -> str:
        """nbd:// URI of `export` on the first TCP listener ("" = the default export)."""
        host, port = self.tcp
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{port}/{export}"

    # -- log --------------------------------------------------------------------------------------

    @property
    def log(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """Wait until a log line (from line number `start` on) matches `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and self._eof):
                    raise WorkerError(f"no log line matching {pattern!r}; log:\n{self.log_tail()}")
                self._cond.wait(min(left, 0.5))

    def log_lines(self) -> int:
        with self._cond:
            return len(self._lines)

    def log_tail(self, n: int = 60) -> str:
        return "".join(self._lines[-n:])

    _eof: bool = False

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # -- lifecycle ------------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WorkerError(
                f"worker did not exit in {timeout}s; log:\n{self.log_tail()}"
            ) from None

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful stop (SIGTERM); SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (durability tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _config_dict(config: dict[str, Any] | WorkerConfig) -> dict[str, Any]:
    if isinstance(config, WorkerConfig):
        return config.to_dict()
    d = dict(config)
    d.setdefault("version", 1)
    return d


def start_worker(
    config: dict[str, Any] | WorkerConfig | None,
    *,
    workdir: str | os.PathLike,
    storage_root: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    listen: Sequence[str] = ("127.0.0.1:0",),
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_level: str = "INFO",
    timeout: float = STARTUP_TIMEOUT,
) -> RunningWorker:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nbdworker", "--log-level", log_level]
    config_path = None
    if config is not None:
        config_path = workdir / "worker-config.json"
        config_path.write_text(json.dumps(_config_dict(config)))
        cmd += ["--config", str(config_path)]
    for addr in listen:
        cmd += ["--listen", addr]
    if storage_root is None:
        roots: list[str] = [str(workdir)]
    elif isinstance(storage_root, str | os.PathLike):
        roots = [str(storage_root)]
    else:
        roots = [str(r) for r in storage_root]
    for root in roots:
        cmd += ["--storage-root", root]
    cmd += list(args)
    full_env = dict(os.environ)
    full_env.pop("NBD_LISTEN", None)
    full_env.pop("NBDWORKER_STORAGE_ROOTS", None)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    worker = RunningWorker(proc, config_path)
    threading.Thread(target=worker._pump, daemon=True).start()
    try:
        worker.wait_for_log(r"\bready\b", timeout=timeout)
    except WorkerError:
        worker.stop(5)
        raise
    worker.addresses = _LISTEN_RE.findall(worker.log)
    return worker


@contextlib.contextmanager
def run_worker(
    config: dict[str, Any] | WorkerConfig | None, *, workdir: str | os.PathLike, **kw: Any
) -> Iterator[RunningWorker]:
    """Start a worker (see `start_worker`), yield it, always stop it."""
    worker = start_worker(config, workdir=workdir, **kw)
    try:
        yield worker
    finally:
        worker.stop()


def run_worker_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m nbdworker ARGS` to its exit (start-up errors); `env` replaces the environment."""
    return subprocess.run(
        [sys.executable, "-m", "nbdworker", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
