"""The schema as tools use it: a Python client generated from the live `/api/schema/` with
openapi-python-client imports without error and drives the whole stack (live web server, real
Celery worker, real nbdworker, Debian's NBD clients): create an export, wait for its job, read
its URI and do NBD I/O on it, resize it, take a client certificate bundle, delete it with wipe.

A schema change that breaks generated clients fails here."""

from __future__ import annotations

import importlib
import io
import pkgutil
import subprocess
import sys
import tarfile
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from knox.models import AuthToken

from exports_app.models import WorkerNode
from tests.e2e.test_jobs import nbd_size, node, qemu_io, serve, storage_root  # noqa: F401
from tests.support.celery import RunningCelery
from tests.support.polling import poll

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

MiB = 1 << 20
PACKAGE = "nbdweb_client"
# application/gzip is binary to the generator only by this mapping (it knows octet-stream);
# the formatter hook is not needed to import the code.
GENERATOR_CONFIG = """\
content_type_overrides:
  application/gzip: application/octet-stream
post_hooks: []
"""


def generate_client(base_url: str, workdir: Path):
    """Generate the client from the live schema into `workdir`, import every module of it,
    and return the package."""
    with urllib.request.urlopen(f"{base_url}/api/schema/") as reply:
        (workdir / "schema.yaml").write_bytes(reply.read())
    (workdir / "config.yaml").write_text(GENERATOR_CONFIG)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(workdir / "schema.yaml"),
            "--config",
            str(workdir / "config.yaml"),
            "--output-path",
            str(workdir / "src" / PACKAGE),
            "--meta",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Warning" not in output and "WARNING" not in output, output
    sys.path.insert(0, str(workdir / "src"))
    try:
        package = importlib.import_module(PACKAGE)
        for module in pkgutil.walk_packages(package.__path__, f"{PACKAGE}."):
            importlib.import_module(module.name)
    finally:
        sys.path.remove(str(workdir / "src"))
    return package


def forget_client() -> None:
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_a_generated_client_drives_the_stack(
    live_server,
    node: WorkerNode,  # noqa: F811 (the fixtures imported from test_jobs)
    celery_worker: RunningCelery,
    serve,  # noqa: F811
    storage_root,  # noqa: F811
    tmp_path,
):
    forget_client()
    generate_client(live_server.url, tmp_path)
    from nbdweb_client import AuthenticatedClient
    from nbdweb_client.api.authorities import authorities_create
    from nbdweb_client.api.certificates import certificates_bundle_retrieve, certificates_create
    from nbdweb_client.api.exports import (
        exports_create,
        exports_destroy,
        exports_resize_create,
        exports_retrieve,
    )
    from nbdweb_client.api.jobs import jobs_retrieve
    from nbdweb_client.api.nodes import nodes_partial_update
    from nbdweb_client.models import (
        CertificateAuthorityRequest,
        CertificateRequest,
        ExportRequest,
        ExportResizeRequest,
        ExportStateEnum,
        JobStateEnum,
        PatchedWorkerNodeRequest,
    )

    user = User.objects.create_superuser(f"gen-{uuid.uuid4().hex[:8]}", password="pw-gen")
    _, token = AuthToken.objects.create(user=user)
    client = AuthenticatedClient(base_url=live_server.url, token=token, prefix="Token")

    def finished_job(job_id: int):
        def ended():
            job = jobs_retrieve.sync(job_id, client=client)
            return job if job.state in (JobStateEnum.SUCCEEDED, JobStateEnum.FAILED) else None

        job = poll(ended, f"job {job_id}", timeout=60)
        assert job.state == JobStateEnum.SUCCEEDED, (job.error, celery_worker.log_tail())
        return job

    # Create: 201 with the export still provisioning and its job linked.
    reply = exports_create.sync_detailed(
        client=client, body=ExportRequest(name="gen1", node=node.pk, size="64M")
    )
    assert reply.status_code == 201, reply.content
    export = reply.parsed
    assert export.state == ExportStateEnum.PROVISIONING and export.job
    finished_job(export.job)
    export = exports_retrieve.sync(export.id, client=client)
    assert (export.state, export.size) == (ExportStateEnum.READY, 64 * MiB)

    # The URI the API gives is the one clients use: point the node at a running worker.
    worker = serve(WorkerNode.objects.get(pk=node.pk))
    host, port = worker.tcp
    updated = nodes_partial_update.sync(
        node.pk, client=client, body=PatchedWorkerNodeRequest(public_address=f"{host}:{port}")
    )
    assert updated.public_address == f"{host}:{port}"
    uri = exports_retrieve.sync(export.id, client=client).uri
    assert uri == f"nbd://{host}:{port}/gen1"
    out = qemu_io(uri, "write -P 0x3c 1M 64k", "read -P 0x3c 1M 64k")
    assert "read 65536/65536 bytes" in out

    # Resize: 202 with the job linked; the size is the new one when the job has run.
    reply = exports_resize_create.sync_detailed(
        export.id, client=client, body=ExportResizeRequest(size="128M")
    )
    assert reply.status_code == 202, reply.content
    assert (reply.parsed.state, reply.parsed.size) == (ExportStateEnum.RESIZING, 64 * MiB)
    finished_job(reply.parsed.job)
    export = exports_retrieve.sync(export.id, client=client)
    assert (export.state, export.size) == (ExportStateEnum.READY, 128 * MiB)
    assert (storage_root / "gen1.img").stat().st_size == 128 * MiB
    worker.stop()
    worker = serve(WorkerNode.objects.get(pk=node.pk))
    assert nbd_size(worker.uri("gen1")) == 128 * MiB
    qemu_io(worker.uri("gen1"), "read -P 0x3c 1M 64k")

    # A client certificate and its bundle (application/gzip: bytes in the client).
    authority = authorities_create.sync(
        client=client, body=CertificateAuthorityRequest(name="gen-ca", common_name="gen CA")
    )
    certificate = certificates_create.sync(
        client=client, body=CertificateRequest(authority=authority.id, common_name="alice")
    )
    reply = certificates_bundle_retrieve.sync_detailed(
        certificate.id, client=client, export=export.id
    )
    assert reply.status_code == 200, reply.content
    with tarfile.open(fileobj=io.BytesIO(reply.content), mode="r:gz") as bundle:
        names = {Path(n).name for n in bundle.getnames()}
    assert {"ca-cert.pem", "client-cert.pem", "client-key.pem"} <= names

    # Delete with wipe: 202 while the job runs, then the export and its image are gone.
    reply = exports_destroy.sync_detailed(export.id, client=client, wipe=True)
    assert reply.status_code == 202, reply.content
    assert reply.parsed.state == ExportStateEnum.DELETING
    finished_job(reply.parsed.job)
    assert exports_retrieve.sync_detailed(export.id, client=client).status_code == 404
    assert not (storage_root / "gen1.img").exists()
    forget_client()
