"""Client credential bundles: a .tar.gz laid out as qemu's tls-creds-x509 dir and libnbd's
tls-certificates dir, with a README holding ready-to-paste client command lines."""

import io
import json
import shlex
import tarfile
import time
from urllib.parse import quote

from django.http import HttpResponse

from exports_app.choices import CertificateKind
from exports_app.models import Certificate, Export, WorkerNode

__all__ = [
    "BundleError",
    "build_client_bundle",
    "bundle_download",
    "bundle_filename",
    "client_commands",
]


class BundleError(ValueError):
    """The certificate cannot be bundled (not a client certificate, no key, revoked)."""


def bundle_filename(certificate: Certificate) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in certificate.name)[:80]
    return f"{safe or 'certificate'}-tls.tar.gz"


def bundle_download(certificate: Certificate, data: bytes) -> HttpResponse:
    """The bundle as a file download. It holds a private key: no cache (a browser's, a proxy's)
    may keep a copy."""
    response = HttpResponse(data, content_type="application/gzip")
    response["Content-Disposition"] = f'attachment; filename="{bundle_filename(certificate)}"'
    response["Cache-Control"] = "no-store"
    return response


def _ca_pems(certificate: Certificate, node: WorkerNode) -> list[str]:
    """CA certificates the client needs: the one that signed the node's server certificate
    (what the client verifies) and the client's own issuer."""
    pems: list[str] = []
    server_cert = node.tls_policy.server_certificate
    if server_cert is not None and server_cert.authority is not None:
        pems.append(server_cert.authority.certificate_pem)
    if certificate.authority is not None and certificate.authority.certificate_pem not in pems:
        pems.append(certificate.authority.certificate_pem)
    return pems


def _nbdinfo_tls(host: str, port: int, export_name: str, tls_dir: str) -> str:
    # Double quotes, so that a shell expands $PWD in `tls_dir`; the rest of the URI is
    # percent-encoded and has nothing a shell would expand.
    uri_host = f"[{host}]" if ":" in host else host
    name = quote(export_name, safe="")
    return f'nbdinfo "nbds://{uri_host}:{port}/{name}?tls-certificates={tls_dir}"'


def _nbd_client_tls_options(host: str, tls_dir: str) -> str:
    # The long names: Debian's nbd-client 3.24 does not take the short -F (certfile).
    return (
        f"--enable-tls --certfile {tls_dir}/client-cert.pem --keyfile {tls_dir}/client-key.pem "
        f"--cacertfile {tls_dir}/ca-cert.pem --tlshostname {host}"
    )


def _readme(
    certificate: Certificate, node: WorkerNode, export_name: str, has_server_ca: bool
) -> str:
    host, port = node.client_address
    dir_placeholder = "$PWD/nbd-tls"
    qemu_json = json.dumps(
        {
            "driver": "nbd",
            "server": {"type": "inet", "host": host, "port": str(port)},
            "export": export_name,
            "tls-creds": "tls0",
        },
        separators=(",", ":"),
    )
    lines = [
        f"TLS client credentials for {certificate.common_name or certificate.name}",
        "",
        f"Certificate: {certificate.name} (serial {certificate.serial}, "
        f"SHA-256 {certificate.fingerprint_sha256})",
        f"Valid until: {certificate.not_after:%Y-%m-%d %H:%M} UTC",
        f"Server:      node {node.name} at {host}:{port}",
        "",
        "Files (the layout of qemu's tls-creds-x509 dir and libnbd's tls-certificates dir):",
        "  ca-cert.pem      CA certificate(s) that verify the server",
        "  client-cert.pem  this client's certificate",
        "  client-key.pem   this client's private key (keep it secret: chmod 600)",
        "",
        "Unpack into a directory:",
        f"  mkdir -p {dir_placeholder} && tar -xzf BUNDLE.tar.gz -C {dir_placeholder}",
        "",
        "qemu-img (qemu's dir must be absolute):",
        f"  qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir={dir_placeholder} \\",
        f"    --image-opts driver=nbd,host={host},port={port},"
        f"export={export_name.replace(',', ',,')},tls-creds=tls0",
        "or with the json: form:",
        f"  qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir={dir_placeholder} \\",
        f"    {shlex.quote('json:' + qemu_json)}",
        "",
        "nbdinfo (libnbd):",
        f"  {_nbdinfo_tls(host, port, export_name, dir_placeholder)}",
        "",
        "nbd-client (Linux kernel client, as root, with the nbd module loaded):",
        f"  nbd-client -N {shlex.quote(export_name)} {host} {port} /dev/nbd0 \\",
        f"    {_nbd_client_tls_options(host, dir_placeholder)}",
        "",
        "The server's certificate must name the host you dial in its subjectAltName.",
    ]
    if not has_server_ca:
        lines += [
            "",
            "Note: the node's server certificate was not issued by a CA known to nbdweb;",
            "append that CA's certificate to ca-cert.pem.",
        ]
    return "\n".join(lines) + "\n"


def build_client_bundle(
    certificate: Certificate, node: WorkerNode | None = None, export: Export | None = None
) -> bytes:
    """The .tar.gz bytes for a client certificate; the README targets `export` or `node`
    (default: the export's node, else the first node)."""
    if certificate.kind != CertificateKind.CLIENT:
        raise BundleError("Only client certificates have a bundle.")
    if certificate.is_revoked:
        raise BundleError("This certificate is revoked.")
    if not certificate.has_private_key:
        raise BundleError("This certificate's private key is not stored here.")
    if export is not None:
        node = export.node
    if node is None:
        node = WorkerNode.objects.select_related(
            "tls_policy__server_certificate__authority"
        ).first()
    if node is None:
        raise BundleError("There is no worker node to connect to.")
    ca_pems = _ca_pems(certificate, node)
    server_cert = node.tls_policy.server_certificate
    has_server_ca = server_cert is None or server_cert.authority is not None
    export_name = export.name if export is not None else "EXPORT"
    members = [
        ("ca-cert.pem", "".join(ca_pems).encode("ascii"), 0o644),
        ("client-cert.pem", certificate.certificate_pem.encode("ascii"), 0o644),
        ("client-key.pem", certificate.private_key_pem().encode("ascii"), 0o600),
        (
            "README.txt",
            _readme(certificate, node, export_name, has_server_ca).encode("utf-8"),
            0o644,
        ),
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for filename, data, mode in members:
            info = tarfile.TarInfo(filename)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def client_commands(export: Export, tls_dir: str = "$PWD/nbd-tls") -> list[tuple[str, str]]:
    """(tool, command line) pairs that reach `export`; with TLS, the credentials are a client
    bundle unpacked into `tls_dir` (the README's layout)."""
    host, port = export.node.client_address
    uri_host = f"[{host}]" if ":" in host else host
    quoted_name = quote(export.name, safe="")
    if not export.needs_tls:
        uri = f"nbd://{uri_host}:{port}/{quoted_name}"
        return [
            ("qemu-img", f"qemu-img info {shlex.quote(uri)}"),
            ("nbdinfo", f"nbdinfo {shlex.quote(uri)}"),
            (
                "nbd-client",
                f"nbd-client -N {shlex.quote(export.name)} {host} {port} /dev/nbd0",
            ),
        ]
    image_opts = f"driver=nbd,host={host},port={port},export={export.name.replace(',', ',,')}"
    return [
        (
            "qemu-img",
            f"qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir={tls_dir} "
            f"--image-opts {shlex.quote(image_opts + ',tls-creds=tls0')}",
        ),
        ("nbdinfo", _nbdinfo_tls(host, port, export.name, tls_dir)),
        (
            "nbd-client",
            f"nbd-client -N {shlex.quote(export.name)} {host} {port} /dev/nbd0 "
            + _nbd_client_tls_options(host, tls_dir),
        ),
    ]
