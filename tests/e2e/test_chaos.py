"""Chaos: the Celery worker SIGKILLed mid-job, Redis killed and restarted, PostgreSQL stopped
and started. Each runs against private instances (never the machine's shared Redis or
PostgreSQL). What must hold: serving never stops, no job is lost or left half-done without a
state that says so, and the next change still propagates."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from exports_app.choices import ExportState, JobState
from exports_app.models import Export, Job, TLSPolicy, WorkerNode
from exports_app.services import images
from tests.e2e.test_jobs import EXPORTS, JOB_TIMEOUT, MiB, create_export, fill, partials
from tests.support.celery import database_url, start_celery_worker
from tests.support.polling import poll

pytestmark = [pytest.mark.e2e]


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
    env = {"DATABASE_URL": database_url(connection.settings_dict), "DATABASE_CONN_MAX_AGE": "0"}
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
        worker.wait_for_log(f"job {job_id} was interrupted", 30)
        poll(lambda: Job.objects.get(pk=job_id).is_finished, "the job finishing", JOB_TIMEOUT)
    finally:
        worker.stop()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert Export.objects.get(node=node, name="dst").state == ExportState.READY
    assert partials(storage) == []
    assert images.sha256(str(storage / "dst.img")) == images.sha256(str(storage / "src.img"))
