"""A client bundle used by real clients: qemu-nbd serves over TLS with a server certificate
from our CA and requires client certificates; nbdinfo and qemu-img connect with the bundle's
files and the README's command lines, as printed. (tests/e2e/test_tls_bundle.py runs them
against nbdworker.)"""

import socket
import subprocess

import pytest

from exports_app.choices import TLSMode
from exports_app.models import Export
from exports_app.services import ca
from tests.support.bundles import download_bundle, readme_commands, unpack_bundle
from tests.support.polling import poll
from tests.support.redisserver import free_port
from tests.support.tools import client_env, require_tool

pytestmark = [pytest.mark.django_db, pytest.mark.interop]


# qemu-nbd listens within a second on a quiet machine; a loaded one may take far longer.
LISTEN_DEADLINE = 120.0


def _wait_for_port(process: subprocess.Popen, port: int) -> None:
    def listening() -> bool:
        if process.poll() is not None:
            pytest.fail(f"qemu-nbd exited {process.returncode}: {process.stderr.read()!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    poll(listening, f"qemu-nbd listening on {port}", timeout=LISTEN_DEADLINE)


@pytest.fixture
def served(tmp_path, tls_node, server_certificate, authority):
    """qemu-nbd on a free port, TLS with client verification, exporting a 1 MiB image."""
    for tool in ("qemu-nbd", "nbdinfo", "qemu-img"):
        require_tool(tool)
    port = free_port()
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
        _wait_for_port(process, port)
        yield export
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_readmes_qemu_img_and_nbdinfo_commands_connect(
    api, served, client_certificate, tmp_path
):
    """As pasted into a shell in a directory holding the unpacked bundle as `nbd-tls` (the
    README's layout). nbd-client, which needs the kernel's nbd module, runs in a VM against
    nbdworker in tests/e2e/test_tls_bundle.py."""
    reader = tmp_path / "reader"
    readme = unpack_bundle(
        download_bundle(api, client_certificate.pk, served.pk), reader / "nbd-tls"
    )
    commands = [c for c in readme_commands(readme) if c.split()[0] in ("qemu-img", "nbdinfo")]
    assert [c.split()[0] for c in commands] == ["qemu-img", "qemu-img", "nbdinfo"], readme
    for command in commands:
        result = subprocess.run(
            ["bash", "-ec", command], cwd=reader, capture_output=True, text=True, timeout=60,
            env=client_env(), check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        assert "1 MiB" in result.stdout or "1048576" in result.stdout, result.stdout


def test_a_foreign_client_certificate_is_refused(api, served, tmp_path, db):
    stranger_ca = ca.create_authority("stranger", "Stranger CA")
    stranger = ca.issue_certificate(stranger_ca, "client", "mallory", name="mallory")
    bundle_dir = tmp_path / "bundle"
    unpack_bundle(download_bundle(api, stranger.pk, served.pk), bundle_dir)
    port = served.node.client_address[1]
    uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={bundle_dir}"
    result = subprocess.run(
        ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0
