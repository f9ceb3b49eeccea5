"""Celery routing is one queue per node: two Celery workers started as in production (no `-Q`;
each with its own `NBDWORKER_NODE` and storage root) each consume only their node's queue,
`node.<name>`, and a job goes to the queue of its export's node whichever process asked for it
(this test process is node `default`): each image is made by its own node's worker, under its
own storage root, and the other node's worker never sees the job."""

from __future__ import annotations

import re
import uuid

import pytest
from django.conf import settings

from exports_app.models import Job, TLSPolicy, WorkerNode
from tests.e2e.test_jobs import create_export
from tests.support.celery import database_url, start_celery_worker

pytestmark = pytest.mark.e2e

# The "[queues]" block of a Celery worker's start banner: one ".> <queue> exchange=..." per queue.
QUEUE_LINE = re.compile(r"^\s*\.> (\S+)\s+exchange=", re.MULTILINE)


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_each_nodes_jobs_run_on_its_own_celery_worker_only(api, tmp_path) -> None:
    from django.db import connection

    suffix = uuid.uuid4().hex[:8]
    nodes, workers, storages = {}, {}, {}
    try:
        for label in ("a", "b"):
            storage = storages[label] = tmp_path / f"images-{label}"
            storage.mkdir()
            node = nodes[label] = WorkerNode.objects.create(
                name=f"route-{label}-{suffix}",
                listen="127.0.0.1:10809",
                storage_root=str(storage),
                tls_policy=TLSPolicy.objects.create(name=f"route-{label}-{suffix}"),
            )
            env = {
                "DATABASE_URL": database_url(connection.settings_dict),
                "DATABASE_CONN_MAX_AGE": "0",
                "NBDWORKER_NODE": node.name,
                "NBDWEB_STORAGE_ROOT": str(storage),
                "NBDWORKER_STORAGE_ROOTS": str(storage),
            }
            workers[label] = start_celery_worker(
                None, env=env, hostname=f"{node.name}@routing", concurrency=1
            )

        # Started without -Q, each consumes exactly its own node's queue.
        assert settings.NBDWORKER_NODE not in (nodes["a"].name, nodes["b"].name)
        for label, worker in workers.items():
            assert QUEUE_LINE.findall(worker.log) == [f"node.{nodes[label].name}"]

        for label, other in (("a", "b"), ("b", "a")):
            job = create_export(api, nodes[label], workers[label], name=f"disk-{label}", size="1M")
            assert job["state"] == "succeeded", job
            assert Job.objects.get(pk=job["id"]).worker == f"{nodes[label].name}@routing"
            assert (storages[label] / f"disk-{label}.img").is_file()
            assert not (storages[other] / f"disk-{label}.img").exists()
            # Celery logs "Task exports_app.run_job[<id>] received" where it takes a job.
            assert f"[{job['celery_task_id']}] received" in workers[label].log
            assert job["celery_task_id"] not in workers[other].log
    finally:
        for worker in workers.values():
            worker.stop()
