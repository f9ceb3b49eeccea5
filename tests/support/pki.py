"""Test PKIs, generated at test time (no key material lives in the repository).

`make_pki(root)` creates a CA, a server certificate valid for 127.0.0.1, ::1 and localhost, a
handful of client certificates (good ones, one from an unrelated CA, an expired one, one whose
serial the tests put on the revocation list), and writes them in the directory layouts the real
clients read:

* ``<root>/server/``: ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem`` (nbdkit's
  ``--tls-certificates=DIR``; qemu ``tls-creds-x509,endpoint=server,dir=``)
* ``<root>/clients/<name>/``: ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem`` (qemu
  ``tls-creds-x509,endpoint=client,dir=``; libnbd ``tls-certificates=DIR``)
* ``<root>/clients/anonymous/``: ``ca-cert.pem`` only (a client without a certificate)

The client directories always trust the real CA, so that a refusal is the server's doing and
never the client failing to verify the server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CLIENTS", "PKI", "Credential", "make_pki", "tls_config_dict"]

# Client name -> (issuing CA, expired?). "mallory" is signed by the unrelated CA.
CLIENTS: dict[str, tuple[str, bool]] = {
    "alice": ("ca", False),
    "bob": ("ca", False),
    "carol": ("ca", False),
    "mallory": ("other_ca", False),
    "expired": ("ca", True),
    "revoked": ("ca", False),
}

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Credential:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def serial_hex(self) -> str:
        return format(self.cert.serial_number, "x")


@dataclass
class PKI:
    root: Path
    ca: Credential
    other_ca: Credential
    server: Credential
    clients: dict[str, Credential] = field(default_factory=dict)

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    def client_dir(self, name: str) -> Path:
        """The credentials directory of client `name` ("anonymous": CA only)."""
        return self.root / "clients" / name

    def issue_server(self, name: str = "server2") -> Credential:
        """Another server certificate from the same CA (for certificate-rotation tests)."""
        return _issue(self.ca, _server_subject(name), server=True)


def _name(common_name: str, org: str = "nbdweb tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _server_subject(common_name: str) -> x509.Name:
    return _name(common_name)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate, and every client here (GnuTLS in qemu and libnbd, OpenSSL) takes it.
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(common_name: str) -> Credential:
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Credential(cert, key)


def _issue(
    ca: Credential,
    subject: x509.Name,
    *,
    server: bool,
    sans: list[x509.GeneralName] | None = None,
    expired: bool = False,
) -> Credential:
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    if expired:
        not_before, not_after = now - 30 * _DAY, now - _DAY
    else:
        not_before, not_after = now - _DAY, now + 30 * _DAY
    if sans is None:
        sans = []
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # qemu's tls-creds-x509 checks key usage on both ends; GnuTLS wants digitalSignature for
        # ECDHE-ECDSA. keyEncipherment is listed for qemu's check only.
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        sans = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            *sans,
        ]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Credential(builder.sign(ca.key, hashes.SHA256()), key)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def make_pki(root: Path | str) -> PKI:
    """Generate the whole test PKI under `root` (created if needed)."""
    root = Path(root)
    ca = _make_ca("nbdweb test CA")
    other_ca = _make_ca("unrelated CA")
    server = _issue(ca, _server_subject("localhost"), server=True)
    pki = PKI(root=root, ca=ca, other_ca=other_ca, server=server)
    issuers = {"ca": ca, "other_ca": other_ca}
    for name, (issuer, expired) in CLIENTS.items():
        sans: list[x509.GeneralName] = [
            x509.DNSName(f"{name}.clients.example"),
            x509.RFC822Name(f"{name}@example.com"),
            x509.UniformResourceIdentifier(f"spiffe://nbdweb.test/{name}"),
        ]
        pki.clients[name] = _issue(
            issuers[issuer], _name(name), server=False, sans=sans, expired=expired
        )

    pki.server_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(pki.server_dir / "ca-cert.pem", ca.cert_pem)
    _write(pki.server_dir / "server-cert.pem", server.cert_pem)
    _write(pki.server_dir / "server-key.pem", server.key_pem, 0o600)
    for name, cred in [*pki.clients.items(), ("anonymous", None)]:
        directory = pki.client_dir(name)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(directory / "ca-cert.pem", ca.cert_pem)
        if cred is not None:
            _write(directory / "client-cert.pem", cred.cert_pem)
            _write(directory / "client-key.pem", cred.key_pem, 0o600)
    return pki


def tls_config_dict(
    pki: PKI,
    mode: str,
    client_verification: str = "required",
    min_version: str = "1.2",
    revoked: tuple[str, ...] = ("revoked",),
    server: Credential | None = None,
) -> dict:
    """The ``tls`` section of a worker config serving with this PKI."""
    server = server or pki.server
    return {
        "mode": mode,
        "certificate_pem": server.cert_pem,
        "key_pem": server.key_pem,
        "ca_pem": pki.ca.cert_pem,
        "client_verification": client_verification,
        "min_version": min_version,
        "revoked_serials": [pki.clients[name].serial_hex for name in revoked],
    }
