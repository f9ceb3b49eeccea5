"""TLS end to end: the web side's certificate authority issues the server and client
certificates, a FORCEDTLS policy with required client certificates is published to a worker
that follows Redis, and the client bundle downloaded from the API is what qemu-img and nbdinfo
connect with. A client without the bundle, or with a revoked certificate, is refused."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from exports_app.models import Export, TLSPolicy, WorkerNode
from exports_app.services import publisher
from exports_app.services.nodekeys import node_key
from nbdworker.contract.entries import TLS_FIELD, entries_key
from nbdworker.contract.nodekey import NODE_KEY_ENV
from tests.support.bundles import download_bundle, readme_commands, unpack_bundle
from tests.support.kernelvm import (
    HOST_FROM_GUEST,
    boot,
    build_base_initramfs,
    require_busybox,
    require_kernel,
    require_qemu,
    scenario_archive,
)
from tests.support.polling import poll
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.tools import client_env, require_tool
from tests.support.worker import RunningWorker, start_worker

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("eager_jobs"),
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

MiB = 1 << 20


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path / "redis") as server:
        yield server


def post(api: APIClient, url: str, body: dict) -> dict:
    response = api.post(url, body, format="json")
    assert response.status_code in (200, 201), response.content
    return response.json()


@pytest.fixture
def tls_stack(
    api, tmp_path, settings, redis_server
) -> Iterator[tuple[RunningWorker, Export, dict]]:
    settings.REDIS_URL = redis_server.url
    storage = tmp_path / "images"
    storage.mkdir()
    authority = post(api, "/api/v1/authorities/", {"name": "lab-ca", "common_name": "Lab CA"})
    server_cert = post(
        api,
        "/api/v1/certificates/",
        {
            "kind": "server",
            "authority": authority["id"],
            "common_name": "localhost",
            "dns_names": ["localhost"],
            "ip_addresses": ["127.0.0.1"],
        },
    )
    client_cert = post(
        api,
        "/api/v1/certificates/",
        {"kind": "client", "authority": authority["id"], "common_name": "backup-host"},
    )
    policy = TLSPolicy.objects.create(name=f"tls-{uuid.uuid4().hex[:8]}")
    node = WorkerNode.objects.create(
        name=f"tls-{uuid.uuid4().hex[:8]}",
        listen="127.0.0.1:10809",
        storage_root=str(storage),
        tls_policy=policy,
    )
    response = api.patch(
        f"/api/v1/tls-policies/{policy.pk}/",
        {
            "mode": "FORCEDTLS",
            "server_certificate": server_cert["id"],
            "trusted_authorities": [authority["id"]],
            "client_verification": "required",
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    created = post(api, "/api/v1/exports/", {"node": node.pk, "name": "secure", "size": 4 * MiB})
    export = Export.objects.get(pk=created["id"])
    assert export.state == "ready", export.last_error
    assert api.get(f"/api/v1/exports/{export.pk}/").json()["uri"].startswith("nbds://")

    publisher.drain()  # what was committed is in Redis before the worker reads it
    worker = start_worker(
        None,
        workdir=tmp_path / "worker",
        storage_root=storage,
        env={
            "REDIS_URL": redis_server.url,
            NODE_KEY_ENV: node_key(node.name),
            "NBDWORKER_NODE": node.name,
            "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        },
    )
    try:
        yield worker, export, client_cert
    finally:
        worker.stop()


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=client_env(), **kwargs
    )


def test_client_bundle_from_the_api_connects_qemu_img_and_nbdinfo(api, tls_stack, tmp_path):
    worker, export, client_cert = tls_stack
    bundle = tmp_path / "bundle"
    unpack_bundle(download_bundle(api, client_cert["id"], export.pk), bundle)
    uri = f"nbds://127.0.0.1:{worker.port}/secure?tls-certificates={bundle}"

    size = run([require_tool("nbdinfo"), "--size", uri])
    assert size.returncode == 0, size.stderr
    assert int(size.stdout) == 4 * MiB

    qemu_io = run(
        [
            require_tool("qemu-io"),
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={bundle}",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={worker.port},export=secure,tls-creds=tls0",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
        ]
    )
    assert qemu_io.returncode == 0, qemu_io.stdout + qemu_io.stderr
    assert "Pattern verification failed" not in qemu_io.stdout
    with open(export.absolute_image_path, "rb") as image:
        image.seek(MiB)
        assert image.read(64 * 1024) == b"\x5a" * 64 * 1024

    info = run(
        [
            require_tool("qemu-img"),
            "info",
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={bundle}",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={worker.port},export=secure,tls-creds=tls0",
        ]
    )
    assert info.returncode == 0, info.stderr
    assert "4 MiB" in info.stdout


def test_server_key_sealed_in_redis_and_cache_and_the_worker_still_serves_tls(
    api, tls_stack, tmp_path, redis_server
):
    """Neither the Redis value nor the worker's cached copy holds the PEM private key; the
    worker opened it (it holds the config secret) and serves TLS with it."""
    worker, export, client_cert = tls_stack
    bundle = tmp_path / "bundle"
    unpack_bundle(download_bundle(api, client_cert["id"], export.pk), bundle)
    size = run(
        [
            require_tool("nbdinfo"),
            "--size",
            f"nbds://127.0.0.1:{worker.port}/secure?tls-certificates={bundle}",
        ]
    )
    assert size.returncode == 0, size.stderr
    assert int(size.stdout) == 4 * MiB
    node = export.node.name
    raw = redis_server.client().hget(entries_key(node), TLS_FIELD)
    assert "PRIVATE KEY" not in raw
    assert "nbdweb-sealed-v1:" in raw
    cached = tmp_path / "data" / "nbdworker" / f"config-{node}.json"
    # The worker caches what it applied from a thread of its own, once applied.
    poll(cached.exists, "the worker's cached config")
    assert "PRIVATE KEY" not in cached.read_text()


def test_forcedtls_refuses_plaintext_and_revoked_client_certificates(api, tls_stack, tmp_path):
    worker, export, client_cert = tls_stack
    bundle = tmp_path / "bundle"
    unpack_bundle(download_bundle(api, client_cert["id"], export.pk), bundle)
    nbdinfo = require_tool("nbdinfo")

    plain = run([nbdinfo, "--size", f"nbd://127.0.0.1:{worker.port}/secure"])
    assert plain.returncode != 0
    assert "TLS" in plain.stderr or "tls" in plain.stderr

    revoke = api.post(f"/api/v1/certificates/{client_cert['id']}/revoke/", {"reason": "lost"})
    assert revoke.status_code == 200, revoke.content
    uri = f"nbds://127.0.0.1:{worker.port}/secure?tls-certificates={bundle}"

    def refused() -> bool:
        return run([nbdinfo, "--size", uri]).returncode != 0

    # The revocation reaches the worker through Redis; poll until it is in force.
    deadline = time.monotonic() + 10
    while not refused():
        assert time.monotonic() < deadline, "revoked certificate still served"
        time.sleep(0.05)
    assert worker.wait_for_log("revoked", timeout=5)


# The boot, under pytest-timeout's 300 s with the stack around it: TCG takes ~15 s here.
GUEST_DEADLINE = 180.0


def attach_in_a_guest(command: str, bundle: Path, workdir: Path) -> dict[str, str]:
    """Run the README's nbd-client line as root in a VM with the kernel's nbd module
    (tests/support/kernelvm.py), from a directory holding the unpacked bundle as `nbd-tls`; the
    host's loopback is HOST_FROM_GUEST there, so only the address dialled is changed."""
    require_qemu()
    require_busybox()
    kernel = require_kernel()
    workdir.mkdir()
    dialled = command.replace(" 127.0.0.1 ", f" {HOST_FROM_GUEST} ", 1)
    assert dialled != command, command
    script = f"""
mkdir -p /reader && cd /reader
timeout 60 {dialled} >/tmp/attach.out 2>&1; result nbd attach $?
result nbd size $(blockdev --getsize64 /dev/nbd0)
result nbd output $(tr '\\n' ' ' </tmp/attach.out)
timeout 30 /usr/sbin/nbd-client -d /dev/nbd0 >/dev/null 2>&1; result nbd detach $?
"""
    files: dict[str, bytes | str] = {"scenario.sh": script}
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        files[f"reader/nbd-tls/{name}"] = (bundle / name).read_bytes()
    base = build_base_initramfs(kernel, workdir / "base.cpio.gz", require_tool("nbd-client"))
    scenario = scenario_archive(files, workdir / "scenario.cpio.gz")
    run = boot(kernel, [base, scenario], workdir=workdir / "vm", timeout=GUEST_DEADLINE)
    results = {}
    for line in run.results:
        key, _, value = line.partition(" ")[2].partition(" ")
        results[key] = value.strip()
    assert "attach" in results, run.describe()
    return results | {"console": run.describe()}


def test_every_command_the_bundle_readme_prints_runs_against_the_worker(api, tls_stack, tmp_path):
    worker, export, client_cert = tls_stack
    # What the README prints is where clients dial: this worker's port.
    WorkerNode.objects.filter(pk=export.node_id).update(public_address=f"127.0.0.1:{worker.port}")
    data = download_bundle(api, client_cert["id"], export.pk)
    readme = unpack_bundle(data, tmp_path / "unpacked")
    reader = tmp_path / "reader"
    reader.mkdir()
    # The README's own first command unpacks it here.
    (reader / "BUNDLE.tar.gz").write_bytes(data)
    commands = readme_commands(readme)
    tools = [command.split()[0] for command in commands]
    assert tools == ["mkdir", "qemu-img", "qemu-img", "nbdinfo", "nbd-client"], readme

    for command in commands[:-1]:
        # As pasted into a shell in the reader's directory (`$PWD/nbd-tls`).
        ran = subprocess.run(
            ["bash", "-ec", command], cwd=reader, capture_output=True, text=True, timeout=60,
            env=client_env(),
        )  # fmt: skip
        assert ran.returncode == 0, f"{command}\n{ran.stdout}\n{ran.stderr}"
        if command.startswith("qemu-img"):
            assert "4 MiB" in ran.stdout, ran.stdout
        if command.startswith("nbdinfo"):
            assert "secure" in ran.stdout, ran.stdout

    attached = attach_in_a_guest(commands[-1], reader / "nbd-tls", tmp_path / "guest")
    assert attached["attach"] == "0", attached
    assert attached["size"] == str(4 * MiB), attached
    assert attached["detach"] == "0", attached
