"""docker-compose.yml's two-node example, run without Docker: each service of the profile
`two-nodes` (and the control plane it needs) runs its compose command with its compose
environment, every named volume a directory of its own and every container path in the
environment mapped onto the volume mounted there; `redis` and `postgres` are private servers.
A read-only mount (`:ro`) is made read-only for that process (a private mount namespace).

Checks what the example claims: `init-node2` registers node2 and gives node2's nbdworker its own
key in node2's data volume, from the control plane's secrets it can only read; each node's
Celery worker takes its own node's jobs and makes the image in its node's storage volume; each
nbdworker serves its own node's exports only, node2's with nothing but its key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.polling import poll
from tests.support.postgres import private_postgres
from tests.support.redisserver import free_port, private_redis
from tests.support.tools import client_env, require_tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 90.0
ADMIN_PASSWORD = "a-long-compose-admin-password"
REDIS_PASSWORD = "compose-redis-password"
# The one-shot services in the order compose runs them, then the long-running ones.
ONE_SHOT = ("init", "init-node2")
LONG_RUNNING = ("web", "celery", "nbdworker", "celery-node2", "nbdworker-node2")
NODES = {"default": ("celery", "nbdworker"), "node2": ("celery-node2", "nbdworker-node2")}
_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::([-?])([^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}`, `${NAME:?message}` and `$$`."""

    def value(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if variables.get(name):
            return variables[name]
        if operator == "?":
            pytest.fail(f"docker-compose.yml needs {name}: {argument}")
        return argument or ""

    return _VARIABLE.sub(value, text.replace("$$", "\0")).replace("\0", "$")


def interpolate_all(value, variables: dict[str, str]):
    """`interpolate` over every string of a loaded compose file (not its comments)."""
    if isinstance(value, dict):
        return {key: interpolate_all(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate_all(item, variables) for item in value]
    return interpolate(value, variables) if isinstance(value, str) else value


class ComposeWithoutDocker:
    def __init__(self, workdir: Path, variables: dict[str, str], overrides: dict[str, str]):
        loaded = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        self.services = interpolate_all(loaded["services"], variables)
        self.workdir = workdir
        self.overrides = overrides  # DATABASE_URL, REDIS_URL: the private servers
        self.listen: dict[str, str] = {}  # service -> NBD_LISTEN it got
        self.procs: dict[str, subprocess.Popen] = {}

    def volume(self, name: str) -> Path:
        path = self.workdir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mounts(self, service: str) -> list[tuple[str, Path, bool]]:
        """(target, directory, read-only) of each volume, the longest target first."""
        found = []
        for volume in self.services[service].get("volumes", []):
            source, target, *mode = volume.split(":")
            found.append((target, self.volume(source), mode == ["ro"]))
        return sorted(found, key=lambda mount: -len(mount[0]))

    def host_path(self, service: str, path: str) -> str:
        """Where `path` in `service`'s container is here. A path it does not mount (init-node2
        registers node2's storage root, /srv/nbd) is the one its node's other containers
        mount there: what the database records means the same on all of a node's hosts."""
        node = self.services[service]["environment"].get("NBDWORKER_NODE")
        same_node = [
            name
            for name, other in self.services.items()
            if name != service and other.get("environment", {}).get("NBDWORKER_NODE") == node
        ]
        for name in (service, *same_node):
            for target, directory, _ in self.mounts(name):
                if path == target or path.startswith(target + "/"):
                    return str(directory) + path[len(target) :]
        return path

    def env(self, service: str) -> dict[str, str]:
        base = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("NBDW", "REDIS_", "DJANGO_", "DATABASE_"))
            and key not in {"SECRET_KEY", "NBD_LISTEN", "NBD_PUBLIC_ADDRESS", "LOG_LEVEL"}
        }
        env = {key: str(value) for key, value in self.services[service]["environment"].items()}
        for key, value in env.items():
            if value.startswith("/"):
                env[key] = ":".join(self.host_path(service, part) for part in value.split(":"))
        env.update({key: value for key, value in self.overrides.items() if key in env})
        # Every process binds loopback on a port of its own instead of the container's.
        if "NBDWEB_HTTP_ADDR" in env:
            env["NBDWEB_HTTP_ADDR"] = self.overrides["NBDWEB_HTTP_ADDR"]
        if "NBD_LISTEN" in env:
            env["NBD_LISTEN"] = self.listen.setdefault(service, f"127.0.0.1:{free_port()}")
        return {**base, **env, "PYTHONUNBUFFERED": "1"}

    def argv(self, service: str) -> list[str]:
        command = self.services[service]["command"]
        assert command[0] == "python", service
        argv = [sys.executable] + [
            self.host_path(service, arg) if arg.startswith("/") else arg for arg in command[1:]
        ]
        read_only = [str(directory) for _, directory, ro in self.mounts(service) if ro]
        if not read_only:
            return argv
        # A private mount namespace in which the `:ro` volumes are read-only for this process.
        script = "".join(f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" "{d}" && '
                         for d in read_only)  # fmt: skip
        return [shutil.which("unshare") or "unshare", "-m", "sh", "-c", f'{script}exec "$@"',
                "sh", *argv]  # fmt: skip

    def run_once(self, service: str) -> str:
        result = subprocess.run(
            self.argv(service), cwd=ROOT, env=self.env(service), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, f"{service}:\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    def start(self, service: str) -> None:
        log = open(self.workdir / f"{service}.log", "wb")  # noqa: SIM115 (the child has it)
        self.procs[service] = subprocess.Popen(
            self.argv(service), cwd=ROOT, env=self.env(service), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def log(self, service: str) -> str:
        return (self.workdir / f"{service}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for service, proc in self.procs.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            assert proc.returncode is not None, service


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> Iterator[ComposeWithoutDocker]:
    workdir = tmp_path_factory.mktemp("compose")
    with (
        private_postgres() as postgres,
        private_redis(workdir / "redis", password=REDIS_PASSWORD) as redis_server,
    ):
        nbd_ports = {"default": free_port(), "node2": free_port()}
        variables = {
            "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
            "REDIS_PASSWORD": REDIS_PASSWORD,
            "NBD_PUBLIC_ADDRESS": f"127.0.0.1:{nbd_ports['default']}",
            "NBD_PUBLIC_ADDRESS_NODE2": f"127.0.0.1:{nbd_ports['node2']}",
        }
        overrides = {
            "DATABASE_URL": postgres.create_database("nbdweb"),
            "REDIS_URL": redis_server.url,
            "NBDWEB_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        }
        stack = ComposeWithoutDocker(workdir, variables, overrides)
        stack.listen = {
            "nbdworker": f"127.0.0.1:{nbd_ports['default']}",
            "nbdworker-node2": f"127.0.0.1:{nbd_ports['node2']}",
        }
        try:
            for service in ONE_SHOT:
                stack.run_once(service)
            for service in LONG_RUNNING:
                stack.start(service)
            yield stack
        finally:
            stack.stop()


def api(stack: ComposeWithoutDocker, token: str, method: str, path: str, body=None) -> dict:
    request = urllib.request.Request(
        f"http://{stack.overrides['NBDWEB_HTTP_ADDR']}/api/v1/{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def served_names(stack: ComposeWithoutDocker, worker: str) -> set[str] | None:
    result = subprocess.run(
        [require_tool("nbdinfo"), "--list", "--json", f"nbd://{stack.listen[worker]}"],
        capture_output=True, text=True, env=client_env(), timeout=30,
    )  # fmt: skip
    if result.returncode != 0:
        return None
    return {export["export-name"] for export in json.loads(result.stdout)["exports"]}


def test_init_node2_gives_node2s_worker_its_own_key_only(compose: ComposeWithoutDocker) -> None:
    node2_data = compose.volume("node2-data")
    assert (node2_data / "node_keys" / "node2").is_file()
    assert not (node2_data / "config_secret").exists()
    assert not (node2_data / "node_keys" / "default").exists()
    # Nothing of node2's went into the control plane's volume (read-only to init-node2).
    assert not (compose.volume("nbdweb-data") / "node_keys" / "node2").exists()


def test_each_node_makes_and_serves_its_own_exports(compose: ComposeWithoutDocker) -> None:
    def web_answers() -> bool:
        try:
            urllib.request.urlopen(f"http://{compose.overrides['NBDWEB_HTTP_ADDR']}/", timeout=2)
        except urllib.error.HTTPError:
            return True
        except OSError:
            for service, proc in compose.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{service} exited:\n{compose.log(service)[-3000:]}")
            return False
        return True

    poll(web_answers, "web answering", timeout=120)
    token = subprocess.run(
        [sys.executable, "manage.py", "create_api_token", "admin"],
        cwd=ROOT, env=compose.env("web"), capture_output=True, text=True, check=True, timeout=120,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    node_ids = {
        node["name"]: node["id"] for node in api(compose, token, "GET", "nodes/")["results"]
    }
    assert set(node_ids) == set(NODES)

    jobs = {}
    for node in NODES:
        made = api(
            compose,
            token,
            "POST",
            "exports/",
            {"node": node_ids[node], "name": f"disk-{node}", "size": "1M"},
        )
        jobs[node] = api(compose, token, "GET", f"jobs/{made['job']}/")["celery_task_id"]
    for node, (celery, worker) in NODES.items():
        storage = compose.host_path(worker, compose.services[worker]["environment"][
            "NBDWORKER_STORAGE_ROOTS"])  # fmt: skip

        def served(worker: str = worker, node: str = node) -> bool:
            return served_names(compose, worker) == {f"disk-{node}"}

        poll(served, f"{worker} serving disk-{node} alone", JOB_TIMEOUT)
        assert (Path(storage) / f"disk-{node}.img").is_file()
        # Its own node's Celery worker took the job ("Task ...run_job[<id>] received").
        assert f"[{jobs[node]}] received" in compose.log(celery)
        other = next(c for n, (c, _) in NODES.items() if n != node)
        assert jobs[node] not in compose.log(other)
    # Each image is in its own node's volume only.
    assert not list(compose.volume("node2-images").glob("disk-default*"))
    assert not list((compose.volume("nbdweb-data") / "images").glob("disk-node2*"))
    # node2's worker verified its config with the key in its own data dir, master secret unseen.
    node2_log = compose.log("nbdworker-node2")
    key_file = compose.volume("node2-data") / "node_keys" / "node2"
    assert f"node 'node2': key from {key_file}" in node2_log
    assert "can read the master config secret" not in node2_log
