"""Chaos: the Celery worker SIGKILLed mid-job, Redis killed and restarted, PostgreSQL stopped
and started. Each runs against private instances (never the machine's shared Redis or
PostgreSQL). What must hold: serving never stops, no job is lost or left half-done without a
state that says so, and the next change still propagates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from exports_app.choices import ExportState, JobState
from exports_app.models import Export, Job, TLSPolicy, WorkerNode
from exports_app.services import images
from tests.e2e.test_jobs import EXPORTS, JOB_TIMEOUT, MiB, create_export, fill, partials
from tests.support.celery import database_url, start_celery_worker
from tests.support.livestack import (
    StartedStack,
    create_api_token,
    descendants,
    http_status,
    started_stack,
)
from tests.support.polling import poll
from tests.support.postgres import PrivatePostgres, private_postgres
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.tools import client_env, require_libnbd, require_tool

pytestmark = [pytest.mark.e2e]


def _sha256(path: Path) -> str:
    with open(path, "rb") as image:
        return images.sha256(image.fileno())


# -- the Celery worker SIGKILLed mid-job ---------------------------------------------------------


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_celery_worker_killed_whole_mid_job_runs_the_job_again_when_it_restarts(api, tmp_path):
    """SIGKILL to the worker and its pool at once (the OOM killer, a crash): nothing hands the
    message back and the broker would redeliver it only after the visibility timeout (hours),
    so the job shows `running` with a partial image. The same worker, started again, queues it
    again; the clone completes and the partial image is gone."""
    from django.db import connection

    storage = tmp_path / "images"
    storage.mkdir()
    name = f"chaos-{uuid.uuid4().hex[:8]}"
    node = WorkerNode.objects.create(
        name=name,
        listen="127.0.0.1:10809",
        storage_root=str(storage),
        tls_policy=TLSPolicy.objects.create(name=name),
    )
    env = {
        "DATABASE_URL": database_url(connection.settings_dict),
        "DATABASE_CONN_MAX_AGE": "0",
        "NBDWORKER_STORAGE_ROOTS": str(storage),
    }
    hostname = f"{name}@chaos"
    worker = start_celery_worker(node.celery_queue, env=env, hostname=hostname)
    try:
        assert create_export(api, node, worker, name="src", size="2G")["state"] == "succeeded"
        fill(storage / "src.img", 1536 * MiB, 0xC3)
        response = api.post(EXPORTS, {"node": node.pk, "name": "dst", "clone_from": "src"})
        assert response.status_code == 201, response.content
        job_id = response.json()["job"]
        poll(lambda: partials(storage), "the clone copying", JOB_TIMEOUT)
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
    finally:
        worker.stop(5)

    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.RUNNING and job.worker == hostname
    assert partials(storage), "the killed clone left its partial image"

    worker = start_celery_worker(node.celery_queue, env=env, hostname=hostname)
    try:
        # Deadlines with room for a loaded machine: the clone copies 1.5 GiB again.
        worker.wait_for_log(f"job {job_id} was interrupted", 60)
        poll(lambda: Job.objects.get(pk=job_id).is_finished, "the job finishing", 3 * JOB_TIMEOUT)
    finally:
        worker.stop()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert Export.objects.get(node=node, name="dst").state == ExportState.READY
    assert partials(storage) == []
    assert _sha256(storage / "dst.img") == _sha256(storage / "src.img")


# -- the whole stack (make run) on a private Redis and a private PostgreSQL -----------------------


class Api:
    """The stack's REST API over HTTP, with a token from `manage.py create_api_token`."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.base}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"{}")
            except ValueError:
                return exc.code, {"raw": raw[:200].decode("utf-8", "replace")}


class NBDReader(threading.Thread):
    """One NBD connection reading its export over and over: every read must succeed."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.handle = require_libnbd().NBD()
        self.handle.connect_uri(uri)
        self.reads = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.handle.pread(4096, (self.reads % 64) * 4096)
                self.reads += 1
            except Exception as exc:  # any failure is what the test reports
                self.errors.append(str(exc))
                return
            time.sleep(0.01)  # a steady reader, not a benchmark

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        self.handle.shutdown()


class ChaosStack:
    def __init__(
        self, stack: StartedStack, api: Api, redis: PrivateRedis, pg: PrivatePostgres
    ) -> None:
        self.stack = stack
        self.api = api
        self.redis = redis
        self.pg = pg

    def uri(self, name: str) -> str:
        return f"nbd://{self.stack.nbd}/{name}"

    def size(self, name: str) -> int | None:
        result = subprocess.run(
            [require_tool("nbdinfo"), "--size", self.uri(name)],
            capture_output=True,
            timeout=20,
            env=client_env(),
        )
        return int(result.stdout) if result.returncode == 0 else None

    def create(self, name: str, **fields: str) -> dict:
        status, body = self.api.call("POST", "exports/", {"name": name, "size": "1M", **fields})
        assert status == 201, body
        return body

    def wait_served(self, name: str, what: str, size: int = MiB) -> None:
        self.stack.wait_for(lambda: self.size(name) == size, what)


@pytest.fixture
def chaos_stack(tmp_path: Path) -> Iterator[ChaosStack]:
    with (
        private_redis(tmp_path / "redis", password="chaos-redis-password") as redis_server,
        private_postgres() as pg,
    ):
        database = pg.create_database("nbdweb")
        with started_stack(
            tmp_path, {"REDIS_URL": redis_server.url, "DATABASE_URL": database}
        ) as stack:
            stack.wait_for(lambda: http_status(stack.api) is not None, "the web answering")
            stack.wait_for(lambda: any(" ready." in line for line in stack.lines), "celery ready")
            api = Api(stack.api, create_api_token(stack.env))
            yield ChaosStack(stack, api, redis_server, pg)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _job(api: Api, job_id: int) -> dict:
    status, body = api.call("GET", f"jobs/{job_id}/")
    assert status == 200, body
    return body


def test_redis_killed_and_restarted(chaos_stack: ChaosStack) -> None:
    """SIGKILL to Redis (broker, config store, status) with a client reading: the client never
    sees an error and new clients connect; a change made during the outage answers at once
    (its job, which could not be queued, says so and succeeds when retried); after the restart
    the next change propagates to nbdworker through Celery and Redis."""
    c = chaos_stack
    before = c.create("before")
    c.wait_served("before", "the first export served")
    reader = NBDReader(c.uri("before"))
    reader.start()

    c.redis.proc.kill()
    c.redis.proc.wait(10)
    c.redis.proc = None
    reads_at_kill = reader.reads
    status, body = c.api.call(
        "PATCH", f"exports/{before['id']}/", {"description": "during the outage"}
    )
    assert status == 200, body
    during = c.create("during")
    job = poll(lambda: (j := _job(c.api, during["job"]))["state"] == "failed" and j, "job failed")
    assert "Could not queue" in job["error"], job
    assert c.size("before") == MiB, "a new connection during the outage"
    c.stack.wait_for(lambda: reader.reads > reads_at_kill + 20, "reads during the outage")

    c.redis.start()
    c.create("after")
    c.wait_served("after", "the first change after the restart served")
    status, retried = c.api.call("POST", f"jobs/{during['job']}/retry/")
    assert status == 202, retried
    c.wait_served("during", "the retried export served")
    reader.stop()
    assert reader.errors == []


def test_postgresql_stopped_and_started(chaos_stack: ChaosStack, tmp_path: Path) -> None:
    """PostgreSQL stopped in the middle of a clone: nbdworker (which needs no database) serves
    on; the API answers 503, not a 500 or a hang; the clone, which cannot even record a failure,
    waits for the database. Started again: the very next request works, the clone runs again
    and succeeds (no partial image left), and the next change propagates."""
    c = chaos_stack
    c.create("before")
    c.wait_served("before", "the first export served")
    reader = NBDReader(c.uri("before"))
    reader.start()
    c.create("src", size="2G")
    c.wait_served("src", "the clone's source served", 2 << 30)
    images_dir = tmp_path / "data" / "images"
    fill(images_dir / "src.img", 1536 * MiB, 0x3C)
    clone = c.create("dst", size="2G", clone_from="src")
    poll(lambda: partials(images_dir), "the clone copying", JOB_TIMEOUT)
    # Celery is held still while PostgreSQL stops, so the clone surely outlives the database.
    celery = [pid for pid in descendants(c.stack.proc.pid) if b"celery" in _cmdline(pid)]
    for pid in celery:
        os.kill(pid, signal.SIGSTOP)
    try:
        c.pg.stop()
    finally:
        for pid in celery:
            os.kill(pid, signal.SIGCONT)
    reads_at_stop = reader.reads
    status, body = c.api.call("GET", "exports/")
    assert status == 503, body
    status, body = c.api.call("POST", "exports/", {"name": "refused", "size": "1M"})
    assert status == 503, body
    assert c.size("before") == MiB, "a new connection during the outage"
    c.stack.wait_for(lambda: reader.reads > reads_at_stop + 20, "reads during the outage")

    c.stack.wait_for(
        lambda: any("database unreachable" in line for line in c.stack.lines),
        "the clone finding the database gone",
    )

    c.pg.start()
    status, body = c.api.call("GET", "exports/")
    assert status == 200, body
    c.create("after")
    c.wait_served("after", "the first change after the restart served")
    job = poll(
        lambda: (j := _job(c.api, clone["job"]))["state"] in ("succeeded", "failed") and j,
        "the interrupted clone ending",
        JOB_TIMEOUT,
    )
    assert job["state"] == "succeeded", job
    c.wait_served("dst", "the clone served", 2 << 30)
    assert partials(images_dir) == []
    assert _sha256(images_dir / "dst.img") == _sha256(images_dir / "src.img")
    reader.stop()
    assert reader.errors == []
