"""A client bundle used by real clients: qemu-nbd serves over TLS with a server certificate
from our CA and requires client certificates; nbdinfo and qemu-img connect with the bundle's
files and the README's URI. (Against nbdworker itself once its TLS support lands.)"""

import io
import shlex
import shutil
import socket
import subprocess
import tarfile
import time

import pytest

from exports_app.choices import TLSMode
from exports_app.models import Export
from exports_app.services import ca

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.interop,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-nbd", "nbdinfo", "qemu-img")),
        reason="needs qemu-nbd, nbdinfo and qemu-img",
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.fixture
def served(tmp_path, tls_node, server_certificate, authority):
    """qemu-nbd on a free port, TLS with client verification, exporting a 1 MiB image."""
    port = _free_port()
    node = tls_node(TLSMode.FORCEDTLS)
    node.listen = f"127.0.0.1:{port}"
    node.save()
    export = Export.objects.create(node=node, name="disk", size=1 << 20)
    server_dir = tmp_path / "server-pki"
    server_dir.mkdir()
    (server_dir / "ca-cert.pem").write_text(authority.certificate_pem)
    (server_dir / "server-cert.pem").write_text(server_certificate.certificate_pem)
    (server_dir / "server-key.pem").write_text(server_certificate.private_key_pem())
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    process = subprocess.Popen(
        [
            "qemu-nbd",
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir},verify-peer=on",
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            "-e",
            "0",
            str(image),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_port(port)
        yield export
    finally:
        process.terminate()
        process.wait(timeout=10)


def _unpack(api, certificate, export, directory) -> str:
    response = api.get(f"/api/v1/certificates/{certificate.pk}/bundle/", {"export": export.pk})
    assert response.status_code == 200
    directory.mkdir()
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        for member in archive.getmembers():
            (directory / member.name).write_bytes(archive.extractfile(member).read())
    return (directory / "README.txt").read_text()


def test_nbdinfo_and_qemu_img_connect_with_the_bundle(api, served, client_certificate, tmp_path):
    bundle_dir = tmp_path / "bundle"
    readme = _unpack(api, client_certificate, served, bundle_dir)
    uri_line = next(
        line for line in readme.splitlines() if "nbdinfo " in line and "nbds://" in line
    )
    uri = uri_line.split("nbdinfo ", 1)[1].strip("'").replace("$PWD/nbd-tls", str(bundle_dir))
    result = subprocess.run(
        ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(1 << 20)

    result = subprocess.run(
        [
            "qemu-img",
            "info",
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={bundle_dir}",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={served.node.client_address[1]},export=disk,tls-creds=tls0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1 MiB" in result.stdout

    # The README's json: form, pasted as is (with the directory filled in).
    json_arg = next(line for line in readme.splitlines() if "json:" in line and "{" in line)
    result = subprocess.run(
        [
            "qemu-img",
            "info",
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={bundle_dir}",
            *shlex.split(json_arg),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_a_foreign_client_certificate_is_refused(api, served, tmp_path, db):
    stranger_ca = ca.create_authority("stranger", "Stranger CA")
    stranger = ca.issue_certificate(stranger_ca, "client", "mallory", name="mallory")
    bundle_dir = tmp_path / "bundle"
    _unpack(api, stranger, served, bundle_dir)
    port = served.node.client_address[1]
    uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={bundle_dir}"
    result = subprocess.run(
        ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0
