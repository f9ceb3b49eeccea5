"""Provisioning jobs end to end: the API records a job, a real `celery -A nbdweb worker`
subprocess runs it from the node's queue (real Redis broker, the test database), and a real
nbdworker serves the result to nbdinfo and qemu-io.

The node's storage root is a temporary directory; the failure tests mount a full tmpfs or a
read-only bind mount below it (root is needed for the mounts), or use a directory the Celery
worker may not write (it runs without CAP_DAC_OVERRIDE, see tests/support/celery.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from exports_app.choices import ExportState, JobState
from exports_app.models import Export, Job, TLSPolicy, WorkerNode
from exports_app.services import images
from exports_app.services.publishing import build_config
from tests.support.celery import RunningCelery
from tests.support.mounts import mounted
from tests.support.tools import client_env, require_tool
from tests.support.worker import RunningWorker, start_worker

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

GiB = 1 << 30
MiB = 1 << 20
JOB_TIMEOUT = 60.0
EXPORTS = "/api/v1/exports/"
JOBS = "/api/v1/jobs/"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def storage_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "images"
    root.mkdir()
    yield root
    # pytest keeps the last runs' temporary directories: not gigabytes of test images.
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def node(celery_worker: RunningCelery, celery_node_name: str, storage_root: Path) -> WorkerNode:
    policy = TLSPolicy.objects.create(name=f"e2e-{uuid.uuid4().hex[:8]}")
    return WorkerNode.objects.create(
        name=celery_node_name,
        listen="127.0.0.1:10809",
        storage_root=str(storage_root),
        tls_policy=policy,
    )


@pytest.fixture
def serve(tmp_path: Path, storage_root: Path) -> Iterator:
    """`serve(node)`: an nbdworker serving the node's ready exports (config from the database,
    built by the same code that publishes it). Stopped at teardown."""
    workers: list[RunningWorker] = []

    def start(node: WorkerNode) -> RunningWorker:
        config = build_config(node).to_dict()
        worker = start_worker(
            config, workdir=tmp_path / f"nbdworker{len(workers)}", storage_root=storage_root
        )
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


# -- helpers -------------------------------------------------------------------------------------


def wait_for_job(api: APIClient, job_id: int, worker: RunningCelery) -> dict:
    """Poll /api/v1/jobs/{id}/ until the job has ended; fail with the worker's log otherwise."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        body = api.get(f"{JOBS}{job_id}/").json()
        if body["state"] in (JobState.SUCCEEDED, JobState.FAILED):
            return body
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not end in {JOB_TIMEOUT:.0f}s:\n{worker.log_tail()}")


def create_export(api: APIClient, node: WorkerNode, worker: RunningCelery, **data) -> dict:
    """POST an export, check the immediate 201 answer, wait for its job; the job's JSON."""
    response = api.post(EXPORTS, {"node": node.pk, **data}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    making = ExportState.CLONING if "clone_from" in data else ExportState.PROVISIONING
    assert body["state"] == making
    assert body["job"] is not None and body["job_url"].endswith(f"{JOBS}{body['job']}/")
    return wait_for_job(api, body["job"], worker)


def nbd_size(uri: str) -> int:
    size = nbd_size_or_none(uri)
    assert size is not None, f"nbdinfo could not open {uri}"
    return size


def qemu_io(uri: str, *commands: str) -> str:
    argv = [require_tool("qemu-io"), "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run(
        [*argv, uri], capture_output=True, text=True, env=client_env(), timeout=60
    )
    assert result.returncode == 0 and "fail" not in result.stdout.lower(), (
        result.stdout + result.stderr
    )
    return result.stdout


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- the happy path ------------------------------------------------------------------------------


def test_create_answers_at_once_then_the_job_makes_a_sparse_image_that_nbd_clients_use(
    api, node, celery_worker, serve, storage_root
):
    job = create_export(api, node, celery_worker, name="disk1", size="1G")
    assert job["state"] == JobState.SUCCEEDED, job
    assert (job["kind"], job["progress"], job["error"]) == ("create", 100, "")
    export = Export.objects.get(name="disk1", node=node)
    assert export.state == ExportState.READY
    image = storage_root / "disk1.img"
    assert image.stat().st_size == GiB
    assert allocated_bytes(image) == 0, "the new image is not sparse"
    assert [p.name for p in storage_root.iterdir()] == ["disk1.img"]

    worker = serve(node)
    assert nbd_size(worker.uri("disk1")) == GiB
    out = qemu_io(worker.uri("disk1"), "write -P 0xa5 1M 64k", "read -P 0xa5 1M 64k")
    assert "wrote 65536/65536 bytes" in out and "read 65536/65536 bytes" in out


def test_clone_has_the_same_contents_and_keeps_holes(api, node, celery_worker, serve, storage_root):
    assert create_export(api, node, celery_worker, name="gold", size="1G")["state"] == "succeeded"
    worker = serve(node)
    qemu_io(worker.uri("gold"), "write -P 0x5a 0 64k", "write -P 0xc3 900M 1M")
    worker.stop()

    job = create_export(api, node, celery_worker, name="copy", clone_from="gold")
    assert job["state"] == JobState.SUCCEEDED, job
    assert (job["kind"], job["progress"]) == ("clone", 100)
    copy = Export.objects.get(name="copy", node=node)
    assert (copy.state, copy.size) == (ExportState.READY, GiB)
    # Holes stay holes: only the written ranges are allocated in the copy.
    assert allocated_bytes(storage_root / "copy.img") <= 4 << 20

    worker = serve(node)
    assert nbd_size(worker.uri("copy")) == GiB
    qemu_io(
        worker.uri("copy"),
        "read -P 0x5a 0 64k",
        "read -P 0 64k 1M",
        "read -P 0xc3 900M 1M",
        "read -P 0 1000M 1M",
    )
    # And the verify job agrees, byte for byte.
    for name in ("gold", "copy"):
        export = Export.objects.get(name=name, node=node)
        response = api.post(f"{EXPORTS}{export.pk}/verify/")
        assert response.status_code == 202, response.content
        assert wait_for_job(api, response.json()["job"], celery_worker)["state"] == "succeeded"
    gold, copy = (Export.objects.get(name=n, node=node) for n in ("gold", "copy"))
    assert gold.content_sha256 and gold.content_sha256 == copy.content_sha256
    assert gold.verified_at is not None


def test_resize_grows_and_force_shrinks_the_image_seen_by_new_workers(
    api, node, celery_worker, serve, storage_root
):
    assert create_export(api, node, celery_worker, name="grow", size="1G")["state"] == "succeeded"
    export = Export.objects.get(name="grow", node=node)
    worker = serve(node)
    qemu_io(worker.uri("grow"), "write -P 0x77 1020M 1M")

    response = api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "2G"}, format="json")
    assert response.status_code == 202, response.content
    job = wait_for_job(api, response.json()["job"], celery_worker)
    assert (job["kind"], job["state"]) == ("resize", "succeeded"), job
    assert (storage_root / "grow.img").stat().st_size == 2 * GiB
    worker.stop()
    worker = serve(node)
    assert nbd_size(worker.uri("grow")) == 2 * GiB
    qemu_io(worker.uri("grow"), "read -P 0x77 1020M 1M", "read -P 0 1G 1M")

    # A shrink needs force, then goes through.
    response = api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "1G"}, format="json")
    assert response.status_code == 400 and "size" in response.json()
    response = api.post(
        f"{EXPORTS}{export.pk}/resize/", {"size": "1G", "force": True}, format="json"
    )
    assert response.status_code == 202, response.content
    assert wait_for_job(api, response.json()["job"], celery_worker)["state"] == "succeeded"
    worker.stop()
    worker = serve(node)
    assert nbd_size(worker.uri("grow")) == GiB
    qemu_io(worker.uri("grow"), "read -P 0x77 1020M 1M")


def test_resize_is_seen_by_the_next_connection_to_a_running_worker(
    api, node, celery_worker, tmp_path, storage_root
):
    """The resize job publishes the node's config; the worker that follows it reopens the
    resized image, so the next connection sees the new size without a restart."""
    assert create_export(api, node, celery_worker, name="live", size="1G")["state"] == ("succeeded")
    worker = start_worker(
        None, workdir=tmp_path / "follower", storage_root=storage_root,
        env={"NBDWORKER_NODE": node.name},
    )  # fmt: skip
    try:
        uri = worker.uri("live")
        poll_size(uri, GiB, worker)
        qemu_io(uri, "write -P 0x61 1023M 1M")
        export = Export.objects.get(name="live", node=node)
        response = api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "2G"}, format="json")
        assert wait_for_job(api, response.json()["job"], celery_worker)["state"] == "succeeded"
        poll_size(uri, 2 * GiB, worker)
        qemu_io(uri, "read -P 0x61 1023M 1M", "write -P 0x62 2047M 1M", "read -P 0x62 2047M 1M")
    finally:
        worker.stop()


def poll_size(uri: str, size: int, worker: RunningWorker, timeout: float = 10.0) -> None:
    """Wait until a new connection to `uri` sees `size` (the worker applies configs async)."""
    deadline = time.monotonic() + timeout
    while (seen := nbd_size_or_none(uri)) != size:
        assert time.monotonic() < deadline, f"size {seen}, not {size}:\n{worker.log_tail()}"
        time.sleep(0.1)


def test_delete_with_wipe_removes_the_image_then_the_export(api, node, celery_worker, storage_root):
    assert create_export(api, node, celery_worker, name="bye", size="1G")["state"] == "succeeded"
    image = storage_root / "bye.img"
    with open(image, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"secret" * 1000)
    export = Export.objects.get(name="bye", node=node)

    response = api.delete(f"{EXPORTS}{export.pk}/?wipe=true")
    assert response.status_code == 202, response.content
    assert response.json()["state"] == ExportState.DELETING
    job = wait_for_job(api, response.json()["job"], celery_worker)
    assert (job["kind"], job["state"], job["params"]) == ("delete", "succeeded", {"wipe": True})
    assert job["export"] is None and job["export_name"] == "bye"
    assert api.get(f"{EXPORTS}{export.pk}/").status_code == 404
    assert not image.exists()
    assert list(storage_root.iterdir()) == []


def test_job_results_are_published_to_a_worker_that_follows_redis(
    api, node, celery_worker, tmp_path, storage_root
):
    """No --config: the worker follows the node's snapshot in Redis, which the Celery worker
    publishes when a job ends. The export appears when ready and goes when deleted."""
    worker = start_worker(
        None,
        workdir=tmp_path / "follower",
        storage_root=storage_root,
        env={"NBDWORKER_NODE": node.name},
    )
    try:
        assert create_export(api, node, celery_worker, name="pub", size="1G")["state"] == (
            "succeeded"
        )
        uri = worker.uri("pub")
        poll_size(uri, GiB, worker)
        qemu_io(uri, "write -P 0x3c 0 4k", "read -P 0x3c 0 4k")

        export = Export.objects.get(name="pub", node=node)
        response = api.delete(f"{EXPORTS}{export.pk}/")
        assert wait_for_job(api, response.json()["job"], celery_worker)["state"] == "succeeded"
        deadline = time.monotonic() + 10
        while nbd_size_or_none(uri) is not None:
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.1)
    finally:
        worker.stop()


def nbd_size_or_none(uri: str) -> int | None:
    result = subprocess.run(
        [require_tool("nbdinfo"), "--size", uri],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=30,
    )
    return int(result.stdout) if result.returncode == 0 else None


def fill(path: Path, length: int, byte: int) -> None:
    """Write `length` bytes of `byte` from offset 0: data a clone has to copy, quickly."""
    chunk = bytes([byte]) * MiB
    with open(path, "r+b") as f:
        for _ in range(length // MiB):
            f.write(chunk)


def partials(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".partial")]


def pool_process_holding(worker: RunningCelery, path: Path) -> int | None:
    """The Celery pool process that has `path` open."""
    for child in Path(f"/proc/{worker.proc.pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) == str(path):
                            return int(pid)
    return None


def test_a_long_clone_reports_progress_while_it_runs(api, node, celery_worker, storage_root):
    assert create_export(api, node, celery_worker, name="src", size="2G")["state"] == "succeeded"
    fill(storage_root / "src.img", 1536 * MiB, 0x5A)
    response = api.post(EXPORTS, {"node": node.pk, "name": "dst", "clone_from": "src"})
    assert response.status_code == 201, response.content
    job_id = response.json()["job"]
    seen = set()
    deadline = time.monotonic() + JOB_TIMEOUT
    while (body := api.get(f"{JOBS}{job_id}/").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, celery_worker.log_tail()
        seen.add(body["progress"])
        time.sleep(0.05)
    assert body["state"] == "succeeded" and body["progress"] == 100, body
    assert any(0 < p < 100 for p in seen), f"no progress seen while running: {sorted(seen)}"


def test_a_clone_whose_worker_process_is_killed_runs_again_and_leaves_no_partial_image(
    api, node, celery_worker, storage_root
):
    assert create_export(api, node, celery_worker, name="src", size="2G")["state"] == "succeeded"
    fill(storage_root / "src.img", 1536 * MiB, 0xA5)
    response = api.post(EXPORTS, {"node": node.pk, "name": "dst", "clone_from": "src"})
    assert response.status_code == 201, response.content
    job_id = response.json()["job"]

    deadline = time.monotonic() + JOB_TIMEOUT
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "the clone never started copying"
        for partial in partials(storage_root):
            victim = pool_process_holding(celery_worker, partial)
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    celery_worker.wait_for_log(f"pid:{victim} exited with 'signal 9", 10)

    job = wait_for_job(api, job_id, celery_worker)
    assert job["state"] == JobState.SUCCEEDED, job
    assert Export.objects.get(name="dst", node=node).state == ExportState.READY
    assert partials(storage_root) == [], "the killed attempt's partial image is still there"
    assert sorted(p.name for p in storage_root.iterdir()) == ["dst.img", "src.img"]
    src, dst = (storage_root / "src.img", storage_root / "dst.img")
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert images.sha256(b.fileno()) == images.sha256(a.fileno())


# -- failures ------------------------------------------------------------------------------------


def assert_failed(api, job: dict, node: WorkerNode, name: str, message: str) -> Export:
    assert job["state"] == JobState.FAILED, job
    assert message in job["error"], job
    export = Export.objects.get(name=name, node=node)
    assert export.state == ExportState.FAILED
    assert export.last_error == job["error"]
    return export


def test_no_space_fails_the_clone_and_leaves_no_partial_image(
    api, node, celery_worker, storage_root
):
    assert create_export(api, node, celery_worker, name="big", size="64M")["state"] == "succeeded"
    with open(storage_root / "big.img", "r+b") as f:
        f.write(os.urandom(8 << 20))  # 8 MiB of data cannot fit in a 4 MiB filesystem
    with mounted(storage_root / "small", "-t", "tmpfs", "-o", "size=4M", "tmpfs") as small:
        job = create_export(
            api, node, celery_worker, name="clone", clone_from="big", image_path="small/c.img"
        )
        assert_failed(api, job, node, "clone", "No space left on device")
        assert list(small.iterdir()) == [], "a partial image was left behind"


def test_no_inodes_fails_the_create_and_a_retry_succeeds_once_there_is_room(
    api, node, celery_worker, storage_root
):
    with mounted(
        storage_root / "full", "-t", "tmpfs", "-o", "size=1M,nr_inodes=3", "tmpfs"
    ) as full:
        # The root directory and these files use all inodes. (A new image needs a little more
        # than one: its owner token is an extended attribute, counted in tmpfs's inode space.)
        for name in ("filler", "filler2"):
            (full / name).touch()
        job = create_export(api, node, celery_worker, name="nospace", size="1G",
                            image_path="full/n.img")  # fmt: skip
        assert_failed(api, job, node, "nospace", "No space left on device")
        assert sorted(p.name for p in full.iterdir()) == ["filler", "filler2"]

        for name in ("filler", "filler2"):
            (full / name).unlink()
        response = api.post(f"{JOBS}{job['id']}/retry/")
        assert response.status_code == 202, response.content
        retried = wait_for_job(api, response.json()["id"], celery_worker)
        assert retried["state"] == JobState.SUCCEEDED, retried
        assert Export.objects.get(name="nospace", node=node).state == ExportState.READY
        assert (full / "n.img").stat().st_size == GiB


def test_permission_denied_fails_the_create_with_the_message(
    api, node, celery_worker, storage_root
):
    locked = storage_root / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    job = create_export(api, node, celery_worker, name="denied", size="1G",
                        image_path="locked/d.img")  # fmt: skip
    assert_failed(api, job, node, "denied", "Permission denied")
    assert list(locked.iterdir()) == []


def test_read_only_filesystem_fails_the_create(api, node, celery_worker, storage_root, tmp_path):
    source = tmp_path / "ro-source"
    source.mkdir()
    with mounted(storage_root / "ro", "--bind", "-o", "ro", str(source)) as ro:
        job = create_export(api, node, celery_worker, name="ro", size="1G",
                            image_path="ro/r.img")  # fmt: skip
        assert_failed(api, job, node, "ro", "Read-only file system")
        assert list(ro.iterdir()) == []


def test_missing_source_image_fails_the_clone(api, node, celery_worker, storage_root):
    assert create_export(api, node, celery_worker, name="src", size="1M")["state"] == "succeeded"
    (storage_root / "src.img").unlink()
    job = create_export(api, node, celery_worker, name="orphan", clone_from="src")
    assert_failed(api, job, node, "orphan", "source image is missing")
    assert sorted(p.name for p in storage_root.iterdir()) == []


def test_jobs_of_one_export_run_in_order(api, node, celery_worker, storage_root):
    """Create, resize and verify requested back to back: each waits for the one before."""
    response = api.post(EXPORTS, {"node": node.pk, "name": "seq", "size": "1M"}, format="json")
    assert response.status_code == 201
    export_id = response.json()["id"]
    resize = api.post(f"{EXPORTS}{export_id}/resize/", {"size": "2M"}, format="json")
    assert resize.status_code == 202, resize.content
    verify = api.post(f"{EXPORTS}{export_id}/verify/")
    assert verify.status_code == 202, verify.content
    last = wait_for_job(api, verify.json()["job"], celery_worker)
    assert last["state"] == JobState.SUCCEEDED, last
    jobs = list(Job.objects.filter(export_id=export_id).order_by("pk"))
    assert [(j.kind, j.state) for j in jobs] == [
        ("create", "succeeded"),
        ("resize", "succeeded"),
        ("verify", "succeeded"),
    ]
    assert jobs[0].finished <= jobs[1].started and jobs[1].finished <= jobs[2].started
    export = Export.objects.get(pk=export_id)
    # sha256 of 2 MiB of zeroes
    assert export.content_sha256 == (
        "5647f05ec18958947d32874eeb788fa396a05d0bab7c1b71f112ceb7e9b31eee"
    )
