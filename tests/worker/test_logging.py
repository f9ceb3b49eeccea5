"""LOG_FORMAT and LOG_LEVEL in nbdworker (nbdworker/logformat.py): JSON lines from the supervisor
and its serving processes, the same fields as the web side, a bad LOG_FORMAT refused at start,
and LOG_LEVEL as the default of --log-level."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.worker import REPO, run_worker_main

FIELDS = {"time", "level", "logger", "message", "process"}
DEADLINE = 20.0


def config(**top) -> dict:
    return {
        "version": 1,
        "exports": [{"name": "a", "backend": "memory", "size": 1 << 20}],
        **top,
    }


def json_lines(log: str) -> list[dict]:
    entries = []
    for line in log.splitlines():
        entry = json.loads(line)  # every line, not only most of them
        assert isinstance(entry, dict), line
        assert entry.keys() >= FIELDS, line
        entries.append(entry)
    return entries


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("NBD_LISTEN", "NBDWORKER_STORAGE_ROOTS", "LOG_FORMAT", "LOG_LEVEL"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def test_json_lines_from_the_supervisor_and_every_serving_process(worker_factory):
    w = worker_factory(config(), args=["--workers", "2"], env={"LOG_FORMAT": "json"})
    # A connection makes a serving process log too, after start-up.
    with socket.create_connection((w.host, w.port), timeout=5) as sock:
        assert sock.recv(8) == b"NBDMAGIC"
    assert w.stop() == 0
    entries = json_lines(w.log)

    supervisor = w.proc.pid
    by_pid: dict[int, list[dict]] = {}
    for entry in entries:
        by_pid.setdefault(entry["process"], []).append(entry)
    serving = next(e for e in entries if e["message"].startswith("2 serving processes"))
    assert serving["process"] == supervisor
    assert any(e["message"].startswith("ready") for e in by_pid[supervisor])
    children = set(by_pid) - {supervisor}
    assert len(children) == 2, sorted(by_pid)
    for pid in children:
        assert any(e["message"] == "stopped" for e in by_pid[pid]), by_pid[pid]
    first = entries[0]
    assert first["level"] == "INFO" and first["logger"] == "nbdworker"
    assert first["time"].endswith("+00:00")


def test_plain_is_still_the_default_and_unchanged(worker_factory):
    w = worker_factory(config(), args=["--workers", "1"])
    line = next(line for line in w.log.splitlines() if "ready" in line)
    # time level logger: message, without a pid with a single process
    date, clock, level, rest = line.split(" ", 3)
    assert (level, rest.split(": ", 1)[0]) == ("INFO", "nbdworker")
    time.strptime(f"{date} {clock.split(',')[0]}", "%Y-%m-%d %H:%M:%S")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be plain or json, not 'xml'"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL must be one of"),
    ],
)
def test_an_unknown_log_setting_stops_the_worker_with_exit_code_2(
    tmp_path, variable, value, message
):
    result = run_worker_main(
        "--config", str(tmp_path / "none.json"), env=worker_env(**{variable: value})
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_log_level_warning_hides_info_lines(tmp_path):
    path = tmp_path / "config.json"
    # A config for another node: the worker warns and serves it anyway.
    path.write_text(json.dumps(config(node="elsewhere")))
    sock_path = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbdworker",
            "--config",
            str(path),
            "--listen",
            f"unix:{sock_path}",
            "--storage-root",
            str(tmp_path),
            "--workers",
            "1",
        ],
        cwd=REPO,
        env=worker_env(LOG_LEVEL="WARNING", LOG_FORMAT="json"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_serving(sock_path, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    entries = json_lines(stderr)
    assert [e["level"] for e in entries] == ["WARNING"], stderr
    assert "config is for node 'elsewhere'" in entries[0]["message"]


def test_log_level_option_wins_over_the_environment(worker_factory):
    # start_worker passes --log-level INFO; it returns only once the INFO "ready" line is seen.
    w = worker_factory(config(), args=["--workers", "1"], env={"LOG_LEVEL": "WARNING"})
    assert "ready" in w.log


def test_exceptions_are_one_json_line_with_the_traceback_in_a_field():
    script = (
        "import logging\n"
        "from nbdworker.logformat import configure_logging\n"
        "configure_logging('json', 'INFO')\n"
        "try:\n"
        "    raise ValueError('bad')\n"
        "except ValueError:\n"
        "    logging.getLogger('nbdworker').exception('internal error')\n"
        "raise RuntimeError('uncaught')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    handled, uncaught = json_lines(result.stderr)
    assert handled["message"] == "internal error" and handled["level"] == "ERROR"
    assert "Traceback" in handled["exc_info"] and "ValueError: bad" in handled["exc_info"]
    assert uncaught["level"] == "CRITICAL"
    assert "RuntimeError: uncaught" in uncaught["exc_info"]


def wait_until_serving(sock_path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(sock_path))
                if sock.recv(8) == b"NBDMAGIC":
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the worker did not start serving"
        time.sleep(0.05)
