"""Scale benchmark (issue 19): one control plane, M real nbdworker processes, N exports each.

    .venv/bin/python bench/scale.py --nodes 1 --exports 1000
    .venv/bin/python bench/scale.py --nodes 10 --exports 10 --json /tmp/scale.json
    make bench-scale                                  # the default size (fits 2 cores)

Brings up, on this machine and on free ports: a private redis-server, a scratch PostgreSQL
database (``<name of DATABASE_URL's database>_scale`` on DATABASE_URL's server, default
postgres://postgres@127.0.0.1:5432; dropped at the end), gunicorn with the project's defaults,
one Celery worker consuming every node's queue, and M nbdworker processes (one serving process
each), each following its node's config in Redis as in production (scripts/runstack.py's
command lines and per-process secrets).

The fleet is populated through the ORM (bulk_create of N ready exports per node over sparse
1 MiB images, then one publish per node); every measured operation goes over HTTP through
gunicorn with an API token. "Applied" is read from each worker's heartbeat in Redis (the worker
beats at once when it applies a config): the first generation above the one it ran before the
request. Figures (medians unless marked; p99 is nearest-rank over the samples):

* snapshot size (bytes at ``nbdweb:config:<node>``, first node);
* PATCH of one export's description: HTTP latency, and PATCH sent -> worker applied;
* POST create: HTTP latency;
* worker open file descriptors and RSS (/proc), at rest after start-up and after the run;
* PATCH of the TLS policy every node shares (min TLS version toggled): HTTP latency, and the
  time until each node applied it (p50 / p99 over nodes and samples);
* `--creates` creates in a row: HTTP total, and until all are ready and applied.

Not a test: nothing is asserted (tests/test_bench_scale.py runs a tiny size as a smoke test).
The output's figure names are stable: other tools read them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nbdworker.contract.entries import entries_key, head_key  # noqa: E402
from nbdworker.contract.nodekey import NODE_KEY_ENV, derive_node_key  # noqa: E402
from nbdworker.contract.snapshot import config_key, heartbeat_key, published_key  # noqa: E402
from scripts.runstack import COMMANDS, PYTHON, die_with_parent, free_port, process_env  # noqa: E402

IMAGE_SIZE = 1 << 20
START_TIMEOUT = 120.0
POLL_INTERVAL = 0.002
# Figures, in print order: (key, label). The labels are the stable interface.
FIGURES = [
    ("snapshot_bytes", "snapshot size"),
    ("patch_description_ms", "PATCH of one export's description (HTTP latency)"),
    ("patch_applied_ms", "PATCH sent -> worker applied"),
    ("create_ms", "POST create (HTTP latency)"),
    ("worker_fds", "worker open file descriptors"),
    ("worker_rss_kib", "worker RSS"),
    ("policy_patch_ms", "PATCH of the shared TLS policy (HTTP latency)"),
    ("policy_applied_ms", "all nodes applied after the policy PATCH: p50 / p99"),
    ("creates_in_a_row_s", "creates in a row: HTTP total"),
    ("creates_served_s", "creates in a row: until all ready and applied"),
    ("worker_fds_after", "worker open file descriptors after the run"),
    ("worker_rss_after_kib", "worker RSS after the run"),
]


def say(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


# -- the processes ----------------------------------------------------------------------------


class Processes:
    """The children, each logging to its own file; all stopped (TERM, then KILL) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        with log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.children[name] = proc
        return proc

    def check(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def scratch_database(base_url: str) -> tuple[str, str]:
    """(URL of a new empty database beside `base_url`'s, URL to drop it from)."""
    import psycopg

    parts = urlsplit(base_url)
    base = parts.path.lstrip("/") or "nbdweb"
    name = re.sub(r"[^a-z0-9_]", "_", f"{base}_scale".lower())
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}")), admin


def drop_database(url: str, admin: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- measuring --------------------------------------------------------------------------------


class Api:
    """One kept-alive HTTP connection to gunicorn, authenticated with an API token."""

    def __init__(self, address: str, token: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: object = None) -> tuple[dict, float]:
        """(JSON answer, seconds from sending to the whole answer read)."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
                self.conn.connect()
            started = time.perf_counter()
            try:
                self.conn.request(method, path, data, self.headers)
                response = self.conn.getresponse()
                payload = response.read()
            except (http.client.HTTPException, OSError):
                # gunicorn closed the kept-alive connection (keepalive 5 s): once more, anew.
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            seconds = time.perf_counter() - started
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: {response.status} {payload[:500]!r}")
            return (json.loads(payload) if payload else {}), seconds
        raise AssertionError("unreachable")


class Fleet:
    """The nodes' Redis keys, read the way the web side reads them."""

    def __init__(self, redis_url: str, nodes: list[str]) -> None:
        import redis

        self.redis = redis.Redis.from_url(redis_url)
        self.nodes = nodes

    def applied(self) -> list[int]:
        """Each node's applied generation from its heartbeat (-1: no heartbeat)."""
        values = self.redis.mget([heartbeat_key(node) for node in self.nodes])
        return [json.loads(value)["generation"] if value else -1 for value in values]

    def published(self) -> list[int]:
        values = self.redis.mget([published_key(node) for node in self.nodes])
        return [int(value) if value else 0 for value in values]

    def current(self) -> bool:
        """Every worker runs the generation last published for it."""
        return self.applied() == self.published()

    def wait_applied(self, before: list[int], sent: float, timeout: float) -> list[float]:
        """Seconds from `sent` until each of the first len(`before`) nodes applied a generation
        above its entry in `before`."""
        times: list[float | None] = [None] * len(before)
        deadline = time.monotonic() + timeout
        while None in times:
            generations = self.applied()[: len(before)]
            now = time.perf_counter()
            for index, generation in enumerate(generations):
                if times[index] is None and generation > before[index]:
                    times[index] = now - sent
            if time.monotonic() > deadline:
                missing = [n for n, t in zip(self.nodes, times, strict=False) if t is None]
                raise RuntimeError(f"not applied within {timeout:.0f} s on {missing[:5]}")
            time.sleep(POLL_INTERVAL)
        return times  # type: ignore[return-value]


def worker_usage(pids: list[int]) -> tuple[list[int], list[int]]:
    """(open descriptors, RSS in KiB) of each process."""
    fds, rss = [], []
    for pid in pids:
        fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        status = Path(f"/proc/{pid}/status").read_text()
        rss.append(int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)))
    return fds, rss


def median(values: list[float]) -> float:
    return statistics.median(values)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def spread(values: list[float], scale: float = 1000.0) -> dict:
    return {
        "median": round(median(values) * scale, 1),
        "p99": round(p99(values) * scale, 1),
        "n": len(values),
    }


# -- the run ----------------------------------------------------------------------------------


def populate(nodes: int, exports: int, storage: Path) -> dict:
    """The fleet in the database (ORM, bulk), its images on disk, and one publish per node."""
    from django.contrib.auth import get_user_model

    from exports_app.choices import CertificateKind, ExportState, TLSMode
    from exports_app.models import Export, TLSPolicy, WorkerNode
    from exports_app.models.exports import name_digest
    from exports_app.services import ca, publishing
    from exports_app.services.api_tokens import issue_token
    from exports_app.services.images import identity_of

    get_user_model().objects.create_superuser("bench", password=None)
    _, token = issue_token("bench", ttl=None)
    authority = ca.create_authority("bench-ca", "nbdweb scale bench CA")
    certificate = ca.issue_certificate(
        authority, CertificateKind.SERVER, "127.0.0.1", name="bench-server",
        ip_addresses=["127.0.0.1"],
    )  # fmt: skip
    # SELECTIVETLS with a server certificate: the snapshot carries the key, as in production;
    # no export requires TLS, so plaintext clients still reach them.
    policy = TLSPolicy.objects.create(
        name="bench-shared", mode=TLSMode.SELECTIVETLS, server_certificate=certificate
    )
    WorkerNode.objects.filter(name="default").delete()  # the migration's node: no worker here
    made = []
    for index in range(nodes):
        name = f"bench{index:03d}"
        root = storage / name
        root.mkdir(mode=0o700)
        node = WorkerNode.objects.create(
            name=name,
            listen=f"127.0.0.1:{free_port()}",
            storage_root=str(root),
            tls_policy=policy,
        )
        rows = []
        for number in range(exports):
            export_name = f"disk-{number:05d}"
            path = root / f"{export_name}.img"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, IMAGE_SIZE)
            identity = identity_of(os.fstat(fd))
            os.close(fd)
            rows.append(
                Export(
                    node=node,
                    name=export_name,
                    name_digest=name_digest(export_name),
                    image_path=path.name,
                    size=IMAGE_SIZE,
                    state=ExportState.READY,
                    image_identity=identity,
                    image_imported=True,
                )
            )
        Export.objects.bulk_create(rows, batch_size=2000)
        made.append(node)
    publishing.publish_nodes([node.pk for node in made])
    first = Export.objects.filter(node=made[0]).order_by("pk").first()
    return {
        "token": token,
        "policy": policy.pk,
        "nodes": [(node.pk, node.name, node.listen) for node in made],
        "export": first.pk if first else None,
    }


def creates_pending(node_ids: list[int]) -> int:
    from exports_app.choices import ExportState
    from exports_app.models import Export

    return Export.objects.filter(node__in=node_ids).exclude(state=ExportState.READY).count()


@contextlib.contextmanager
def control_plane(args: argparse.Namespace, scratch: Path) -> Iterator[dict]:
    """Redis, the scratch database, migrate, the fleet, workers, gunicorn and Celery."""
    processes = Processes(scratch)
    database_url, admin_url = scratch_database(args.database_url)
    try:
        redis_port = free_port()
        processes.spawn(
            "redis",
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(scratch)],
            dict(os.environ),
        )  # fmt: skip
        storage = scratch / "storage"
        storage.mkdir(mode=0o700)
        http_address = f"127.0.0.1:{free_port()}"
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("NBDW", "DJANGO_", "GUNICORN_")) and key != "SECRET_KEY"
        }
        env.update(
            DATABASE_URL=database_url,
            REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            NBDWEB_DATA_DIR=str(scratch / "data"),
            NBDWEB_STORAGE_ROOT=str(storage),
            NBDWORKER_STORAGE_ROOTS=str(storage),
            NBDWEB_HTTP_ADDR=http_address,
            GUNICORN_ACCESS_LOG=os.devnull,
            DEBUG="",
            PYTHONUNBUFFERED="1",
        )
        secret_values = {
            "SECRET_KEY": secrets.token_urlsafe(48),
            "NBDWEB_CONFIG_SECRET": secrets.token_urlsafe(48),
            "NBDWEB_KEY_ENCRYPTION_KEY": secrets.token_urlsafe(48),
        }
        web_env = process_env(env, secret_values, "web")
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "--noinput", "-v0"], cwd=REPO, env=web_env, check=True
        )
        # This process is the operator's shell: the ORM for the bulk work, as web.
        os.environ.clear()
        os.environ.update(web_env, DJANGO_SETTINGS_MODULE="nbdweb.settings")
        import django

        django.setup()
        # The publishes of the bulk population log a line per node: the figures are the output.
        logging.getLogger("exports_app").setLevel(logging.WARNING)
        started = time.perf_counter()
        fleet = populate(args.nodes, args.exports, storage)
        say(
            f"populated {args.nodes} node(s) x {args.exports} exports in "
            f"{time.perf_counter() - started:.1f} s"
        )
        names = [name for _, name, _ in fleet["nodes"]]
        workers = []
        for _, name, listen in fleet["nodes"]:
            # Each worker holds its own node's key only, as in a deployment.
            master = secret_values["NBDWEB_CONFIG_SECRET"]
            node_secrets = {NODE_KEY_ENV: derive_node_key(master, name)}
            worker_env = process_env(env, node_secrets, "nbdworker")
            worker_env.update(NBDWORKER_NODE=name, NBDWORKER_WORKERS="1")
            argv = COMMANDS["nbdworker"] + ["--listen", listen]
            argv += ["--storage-root", str(storage / name)]
            workers.append(processes.spawn(f"nbdworker-{name}", argv, worker_env))
        processes.spawn("web", COMMANDS["web"], web_env)
        celery_env = process_env(env, secret_values, "celery")
        queues = ",".join(f"node.{name}" for name in names)
        processes.spawn("celery", COMMANDS["celery"] + ["-Q", queues], celery_env)
        state = Fleet(env["REDIS_URL"], names)

        def up() -> bool:
            processes.check()
            return state.current() and web_answers(http_address)

        wait_for(up, "workers applying their config and gunicorn answering")
        yield {
            "api": Api(http_address, fleet["token"]),
            "fleet": state,
            "worker_pids": [proc.pid for proc in workers],
            "policy": fleet["policy"],
            "node_ids": [pk for pk, _, _ in fleet["nodes"]],
            "export": fleet["export"],
            "processes": processes,
        }
    finally:
        processes.stop()
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        drop_database(database_url, admin_url)


def web_answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", "/admin/login/")
        return conn.getresponse().status < 500
    except OSError:
        return False
    finally:
        conn.close()


def settle(stack: dict, timeout: float = 600.0) -> None:
    """No create job pending and every worker on its latest generation."""
    fleet: Fleet = stack["fleet"]

    def quiet() -> bool:
        stack["processes"].check()
        return creates_pending(stack["node_ids"]) == 0 and fleet.current()

    wait_for(quiet, "the fleet settling", timeout)


def measure(args: argparse.Namespace, stack: dict) -> dict:
    api: Api = stack["api"]
    fleet: Fleet = stack["fleet"]
    first_node = fleet.nodes[0]
    results: dict = {"nodes": args.nodes, "exports": args.exports}
    # The node's whole config as published (its signed entries and head): what a worker reads
    # at start or resync. A change sends only its own entries.
    results["snapshot_bytes"] = fleet.redis.strlen(config_key(first_node)) or (
        fleet.redis.strlen(head_key(first_node))
        + sum(len(v) for v in fleet.redis.hvals(entries_key(first_node)))
    )
    fds, rss = worker_usage(stack["worker_pids"])
    results["worker_fds"] = {"first": fds[0], "max": max(fds)}
    results["worker_rss_kib"] = {"first": rss[0], "max": max(rss)}
    # Warm up the connection's gunicorn worker (imports, first queries) off the figures.
    for _ in range(3):
        api.call("GET", f"/api/v1/exports/{stack['export']}/")
        api.call("GET", f"/api/v1/tls-policies/{stack['policy']}/")

    latencies, applied = [], []
    for sample in range(args.samples):
        settle(stack)
        before = fleet.applied()
        sent = time.perf_counter()
        _, seconds = api.call(
            "PATCH", f"/api/v1/exports/{stack['export']}/", {"description": f"scale {sample}"}
        )
        latencies.append(seconds)
        applied.append(fleet.wait_applied(before[:1], sent, args.timeout)[0])
    results["patch_description_ms"] = spread(latencies)
    results["patch_applied_ms"] = spread(applied)

    latencies, applied = [], []
    versions = ["1.3", "1.2"]
    for sample in range(args.policy_samples):
        settle(stack)
        before = fleet.applied()
        sent = time.perf_counter()
        _, seconds = api.call(
            "PATCH",
            f"/api/v1/tls-policies/{stack['policy']}/",
            {"min_tls_version": versions[sample % 2]},
        )
        latencies.append(seconds)
        applied += fleet.wait_applied(before, sent, args.timeout)
    results["policy_patch_ms"] = spread(latencies)
    results["policy_applied_ms"] = {
        "p50": round(median(applied) * 1000, 1),
        "p99": round(p99(applied) * 1000, 1),
        "n": len(applied),
    }

    latencies = []
    node_id = stack["node_ids"][0]
    for sample in range(args.samples):
        settle(stack)
        _, seconds = api.call(
            "POST",
            "/api/v1/exports/",
            {"node": node_id, "name": f"scale-new-{sample:04d}", "size": IMAGE_SIZE},
        )
        latencies.append(seconds)
    results["create_ms"] = spread(latencies)

    settle(stack)
    started = time.perf_counter()
    for number in range(args.creates):
        api.call(
            "POST",
            "/api/v1/exports/",
            {"node": node_id, "name": f"scale-row-{number:04d}", "size": IMAGE_SIZE},
        )
    results["creates_in_a_row_s"] = {
        "count": args.creates,
        "total": round(time.perf_counter() - started, 2),
    }
    try:
        settle(stack, args.timeout)
        served = round(time.perf_counter() - started, 2)
    except RuntimeError:
        served = None
    results["creates_served_s"] = {"count": args.creates, "total": served}

    fds, rss = worker_usage(stack["worker_pids"])
    results["worker_fds_after"] = {"first": fds[0], "max": max(fds)}
    results["worker_rss_after_kib"] = {"first": rss[0], "max": max(rss)}
    return results


def render(key: str, value: dict | int) -> str:
    if key == "snapshot_bytes":
        return f"{value / 1000:.1f} KB ({value} bytes)"
    if key in ("worker_fds", "worker_fds_after"):
        return f"{value['first']} (max over nodes {value['max']})"
    if key in ("worker_rss_kib", "worker_rss_after_kib"):
        return f"{value['first'] / 1024:.1f} MiB (max over nodes {value['max'] / 1024:.1f} MiB)"
    if key == "policy_applied_ms":
        return f"{value['p50']} / {value['p99']} ms (n={value['n']})"
    if key.endswith("_ms"):
        return f"median {value['median']} ms, p99 {value['p99']} ms (n={value['n']})"
    if key.endswith("_s"):
        total = "timed out" if value["total"] is None else f"{value['total']} s"
        return f"{total} ({value['count']} creates)"
    raise KeyError(key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1, help="worker nodes (default 1)")
    parser.add_argument("--exports", type=int, default=100, help="exports per node (default 100)")
    parser.add_argument("--samples", type=int, default=20, help="PATCH and POST samples")
    parser.add_argument("--policy-samples", type=int, default=10, help="TLS policy PATCHes")
    parser.add_argument("--creates", type=int, default=200, help="creates in a row (default 200)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per step")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/nbdweb",
        help="the PostgreSQL server (its database name + _scale is the scratch database)",
    )
    parser.add_argument("--json", help="also write the figures to this file as JSON")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.exports < 1 or args.samples < 1 or args.policy_samples < 1:
        parser.error("--nodes, --exports and the sample counts must be at least 1")
    if not args.database_url.startswith(("postgres://", "postgresql://")):
        parser.error("--database-url: a postgres:// URL")
    if shutil.which("redis-server") is None:
        parser.error("redis-server is missing (apt-get install redis-server)")
    scratch = Path(tempfile.mkdtemp(prefix="nbdweb-scale-"))
    try:
        started = time.perf_counter()
        with control_plane(args, scratch) as stack:
            say(f"stack up in {time.perf_counter() - started:.1f} s; measuring")
            results = measure(args, stack)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"scale: {args.nodes} node(s) x {args.exports} exports", flush=True)
    for key, label in FIGURES:
        print(f"  {label:<55} {render(key, results[key])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
