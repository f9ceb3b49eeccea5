"""`make run` end to end: scripts/runstack.py brings up web, Celery and nbdworker with a private
Redis and an SQLite database in a fresh data dir, answers on HTTP and NBD, and leaves no process
behind after SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdworker.supervisor import SERVING_ENV
from tests.support.livestack import (
    ROOT,
    StartedStack,
    alive,
    create_api_token,
    descendants,
    http_status,
    started_stack,
)
from tests.support.redisserver import free_port
from tests.support.tools import require_tool


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[StartedStack]:
    # Nothing listens at stack_env's REDIS_URL: runstack must start its private redis-server.
    with started_stack(tmp_path) as running:
        yield running


def test_make_run_serves_http_and_nbd_and_stops_cleanly(stack: StartedStack) -> None:
    nbdinfo = require_tool("nbdinfo")
    api = f"http://{stack.http}/api/v1/"
    stack.wait_for(lambda: http_status(api) is not None, "the web server answering")
    assert http_status(api) in (401, 403), "the API must refuse anonymous clients"

    host, port = stack.nbd.rsplit(":", 1)

    def nbd_lists() -> bool:
        result = subprocess.run(
            [nbdinfo, "--list", f"nbd://{host}:{port}"],
            capture_output=True,
            timeout=20,
        )
        return result.returncode == 0

    stack.wait_for(nbd_lists, "nbdinfo --list connecting to nbdworker")
    # One line says the stack is ready, once, with where the admin, the API docs and the CLI are.
    web = f"http://{stack.http}"
    stack.wait_for(lambda: any("ready:" in line for line in stack.lines), "the ready line")
    (ready,) = [line for line in stack.lines if "ready:" in line]
    for where in (f"{web}/admin/", f"{web}/api/docs/", f"{web}/api/v1/", "nbdweb --url"):
        assert where in ready, ready
    assert any("private redis-server" in line for line in stack.lines), stack.output()
    for name in ("web", "celery", "beat", "nbdworker"):
        # Each process prints in its own time (Celery's banner can come after nbdworker answers).
        stack.wait_for(
            lambda name=name: any(line.startswith(f"{name} ") for line in stack.lines),
            f"output from {name}",
        )

    children = descendants(stack.proc.pid)
    assert len(children) >= 4, (
        f"expected redis, web, celery and nbdworker below runstack: {children}"
    )
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(timeout=60) == 0, stack.output()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in children if alive(pid)]
    assert not survivors, f"processes left behind after SIGTERM: {survivors}"


def test_make_run_without_redis_and_without_redis_server_says_how_to_install(
    tmp_path: Path,
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(
        NBDWEB_DATA_DIR=str(tmp_path / "data"),
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        PATH=str(Path(sys.executable).parent),  # the venv only: no redis-server on it
    )
    result = subprocess.run(
        [sys.executable, "scripts/runstack.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "apt-get install redis-server" in result.stdout + result.stderr


def test_make_run_with_an_unencoded_password_in_redis_url_stops_showing_none_of_it(
    tmp_path: Path,
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(
        NBDWEB_DATA_DIR=str(tmp_path / "data"),
        # A "/" in the password ends the URL's authority: redacted() found no password to mask.
        REDIS_URL=f"redis://:hunt/er2@127.0.0.1:{free_port()}/0",
        PATH=str(Path(sys.executable).parent),
    )
    result = subprocess.run(
        [sys.executable, "scripts/runstack.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "REDIS_URL: malformed Redis URL" in output
    assert "hunt" not in output and "er2" not in output


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _role(pid: int) -> str | None:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    for role, marker in (
        ("web", "gunicorn"),
        ("beat", "nbdweb beat"),
        ("celery", "celery"),
        ("nbdworker", "nbdworker"),
        ("redis", "redis-server"),
    ):
        if marker in cmdline:
            return role
    return None


def test_make_run_gives_each_process_only_the_secrets_it_uses(stack: StartedStack, tmp_path: Path):
    """The web gets all three secrets, Celery the config secret and the key-encryption key,
    nbdworker its node's key alone (not the master secret) and its serving processes nothing,
    Redis none; none may read the others from the data dir
    (NBDWEB_SECRET_FILES=0). An export made through the API with a `create_api_token` token
    still becomes ready (Celery's job published the config) and nbdworker serves it. The
    private Redis refuses clients without its password."""
    nbdinfo = require_tool("nbdinfo")
    api = f"http://{stack.http}/api/v1/"
    stack.wait_for(lambda: http_status(api) is not None, "the web server answering")
    expected = {
        "web": {"SECRET_KEY", "NBDWEB_CONFIG_SECRET", "NBDWEB_KEY_ENCRYPTION_KEY"},
        "celery": {"NBDWEB_CONFIG_SECRET", "NBDWEB_KEY_ENCRYPTION_KEY"},
        "nbdworker": {"NBDWEB_NODE_KEY"},
        "nbdworker serving": set(),
        "beat": set(),
        "redis": set(),
    }
    secrets = set().union(*expected.values())
    seen: dict[str, int] = {}
    for pid in descendants(stack.proc.pid):
        try:
            role, environ = _role(pid), _environ(pid)
        except OSError:
            continue  # gone meanwhile (a short-lived helper)
        if role is None:
            continue
        if role == "nbdworker" and SERVING_ENV in environ:
            role = "nbdworker serving"
        seen[role] = seen.get(role, 0) + 1
        given = {name for name in secrets if name in environ}
        assert given == expected[role], (role, pid, given)
        if role == "nbdworker":
            # Read at start, then overwritten where its /proc/PID/environ shows it: its
            # serving processes run as its user.
            assert environ["NBDWEB_NODE_KEY"].strip("\0") == "", (role, pid)
            assert not environ.get("REDIS_URL", "").strip("\0"), (role, pid)
        if role != "redis":
            assert environ.get("NBDWEB_SECRET_FILES") == "0", (role, pid)
    assert set(seen) >= set(expected) - {"nbdworker serving"}, seen

    # The private Redis wants the password generated into the data dir (0600).
    data = tmp_path / "data"
    password = (data / "redis_password").read_text().strip()
    assert (data / "redis_password").stat().st_mode & 0o077 == 0
    web_pid = next(pid for pid in descendants(stack.proc.pid) if _role(pid) == "web")
    redis_url = _environ(web_pid)["REDIS_URL"]
    assert password in redis_url
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n")
        assert sock.recv(64).startswith(b"-NOAUTH")
    assert not any(password in line for line in stack.lines), "the Redis password was logged"

    manage_env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"} and not key.startswith("NBDW")
    }
    manage_env["NBDWEB_DATA_DIR"] = str(data)
    token = create_api_token(manage_env)
    request = urllib.request.Request(
        f"{api}exports/",
        data=b'{"name": "disk1", "size": "1M"}',
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    host, port = stack.nbd.rsplit(":", 1)

    def served() -> bool:
        result = subprocess.run(
            [nbdinfo, "--size", f"nbd://{host}:{port}/disk1"], capture_output=True, timeout=20
        )
        return result.returncode == 0 and result.stdout.strip() == b"1048576"

    stack.wait_for(served, "disk1 created by Celery and served by nbdworker")
