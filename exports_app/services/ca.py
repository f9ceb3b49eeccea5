"""The certificate authority, built on `cryptography`.

Functions here create, import, issue and revoke; they save models and expect to run inside the
caller's transaction. Bad input raises CertificateError (a ValueError) with a message fit for a
400 response.
"""

import ipaddress
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.conf import settings
from django.utils import timezone

from exports_app.choices import CertificateKind, KeyAlgorithm
from exports_app.models import Certificate, CertificateAuthority
from nbdworker.contract.x509 import verify_issued_by

__all__ = [
    "CertificateError",
    "certificate_facts",
    "create_authority",
    "fingerprint_sha256",
    "format_serial",
    "generate_private_key",
    "import_authority",
    "import_certificate",
    "issue_certificate",
    "load_certificate_pem",
    "load_private_key_pem",
    "revoke_certificate",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Leaves get a little backdating so clients with a slightly slow clock accept them at once.
_CLOCK_SKEW = timedelta(minutes=5)


class CertificateError(ValueError):
    """Malformed or unsuitable certificate material; `field` names the input at fault."""

    def __init__(self, message: str, field: str = "certificate_pem") -> None:
        super().__init__(message)
        self.field = field


# -- parsing -----------------------------------------------------------------------------------


def load_certificate_pem(pem: str) -> x509.Certificate:
    """Exactly one PEM certificate, or CertificateError."""
    if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
        raise CertificateError("Not a PEM certificate (expected -----BEGIN CERTIFICATE-----).")
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise CertificateError(f"Malformed PEM certificate: {exc}") from None
    if len(certificates) != 1:
        raise CertificateError("Give exactly one certificate, not a chain.")
    return certificates[0]


def load_private_key_pem(pem: str) -> PrivateKey:
    """An unencrypted PEM private key (EC or RSA), or CertificateError."""
    if not isinstance(pem, str) or "PRIVATE KEY-----" not in pem:
        raise CertificateError(
            "Not a PEM private key (expected -----BEGIN PRIVATE KEY-----).", "private_key_pem"
        )
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except TypeError:
        raise CertificateError(
            "The private key is encrypted; give it without a passphrase."
        ) from None
    except (ValueError, UnicodeEncodeError) as exc:
        raise CertificateError(f"Malformed PEM private key: {exc}", "private_key_pem") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for odd key types
        raise CertificateError(f"Unsupported private key: {exc}", "private_key_pem") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError("Only EC and RSA private keys are supported.", "private_key_pem")
    return key


def _key_matches(certificate: x509.Certificate, key: PrivateKey) -> bool:
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    return certificate.public_key().public_bytes(encoding, public) == key.public_key().public_bytes(
        encoding, public
    )


def _key_to_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _cert_to_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def format_serial(serial: int) -> str:
    """Lower-case hex without leading zeros: the form nbdworker.contract.config uses for
    revocations."""
    return format(serial, "x")


def certificate_facts(certificate: x509.Certificate) -> dict:
    """Model field values read from a certificate."""
    return {
        "subject": certificate.subject.rfc4514_string()[:500],
        "serial": format_serial(certificate.serial_number),
        "fingerprint_sha256": fingerprint_sha256(certificate),
        "not_before": certificate.not_valid_before_utc,
        "not_after": certificate.not_valid_after_utc,
        "certificate_pem": _cert_to_pem(certificate),
    }


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _sans(certificate: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (
        [str(name) for name in san.get_values_for_type(x509.DNSName)],
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
    )


# -- keys --------------------------------------------------------------------------------------


def generate_private_key(algorithm: str) -> PrivateKey:
    if algorithm == KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == KeyAlgorithm.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise CertificateError(f"Unknown key algorithm {algorithm!r}.")


def _algorithm_of(key: PrivateKey) -> str:
    return (
        KeyAlgorithm.EC_P256
        if isinstance(key, ec.EllipticCurvePrivateKey)
        else KeyAlgorithm.RSA_3072
    )


def _validity(days: int) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - _CLOCK_SKEW, now + timedelta(days=days)


def _check_authority_key(certificate: x509.Certificate, key: PrivateKey) -> None:
    """Sign and verify a probe so a mismatched pair is caught at import, not at issue time."""
    if not _key_matches(certificate, key):
        raise CertificateError(
            "The private key does not belong to this certificate.", "private_key_pem"
        )
    probe = b"nbdweb key check"
    if isinstance(key, rsa.RSAPrivateKey):
        key.public_key().verify(
            key.sign(probe, padding.PKCS1v15(), hashes.SHA256()),
            probe,
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    else:
        key.public_key().verify(
            key.sign(probe, ec.ECDSA(hashes.SHA256())), probe, ec.ECDSA(hashes.SHA256())
        )


# -- authorities -------------------------------------------------------------------------------


def create_authority(
    name: str,
    common_name: str,
    key_algorithm: str = KeyAlgorithm.EC_P256,
    validity_days: int | None = None,
    description: str = "",
) -> CertificateAuthority:
    """Create and save an internal root CA with a fresh key."""
    days = validity_days or settings.NBDWEB_CA_DEFAULT_VALIDITY_DAYS
    key = generate_private_key(key_algorithm)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nbdweb"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    authority = CertificateAuthority(
        name=name,
        description=description,
        key_algorithm=key_algorithm,
        is_imported=False,
        **certificate_facts(certificate),
    )
    authority.set_private_key_pem(_key_to_pem(key))
    authority.save()
    return authority


def check_authority_import(
    certificate_pem: str, private_key_pem: str | None
) -> tuple[x509.Certificate, PrivateKey | None]:
    """Parse and check an external CA (and its key, if given) without saving anything."""
    certificate = load_certificate_pem(certificate_pem)
    if not _is_ca(certificate):
        raise CertificateError(
            "This certificate is not a CA (basicConstraints CA:TRUE is missing)."
        )
    key = None
    if private_key_pem:
        key = load_private_key_pem(private_key_pem)
        _check_authority_key(certificate, key)
    return certificate, key


def import_authority(
    name: str, certificate_pem: str, private_key_pem: str | None = None, description: str = ""
) -> CertificateAuthority:
    """Save an external CA; with its key it can issue, without it it is only trusted."""
    certificate, key = check_authority_import(certificate_pem, private_key_pem)
    authority = CertificateAuthority(
        name=name,
        description=description,
        key_algorithm=_algorithm_of(key) if key is not None else "",
        is_imported=True,
        **certificate_facts(certificate),
    )
    if key is not None:
        authority.set_private_key_pem(_key_to_pem(key))
    authority.save()
    return authority


# -- leaf certificates -------------------------------------------------------------------------


def normalize_sans(dns_names: list[str], ip_addresses: list[str]) -> tuple[list[str], list[str]]:
    """Validated, de-duplicated SAN lists (CertificateError on a bad entry)."""
    dns: list[str] = []
    for name in dns_names:
        text = str(name).strip().lower().rstrip(".")
        labels = text.split(".")
        if (
            not text
            or len(text) > 253
            or any(not label or len(label) > 63 for label in labels)
            or any(
                not (ch.isascii() and (ch.isalnum() or ch in "-*")) for ch in text.replace(".", "")
            )
        ):
            raise CertificateError(f"{name!r} is not a valid DNS name.", "dns_names")
        if text not in dns:
            dns.append(text)
    ips: list[str] = []
    for address in ip_addresses:
        try:
            text = str(ipaddress.ip_address(str(address).strip()))
        except ValueError:
            raise CertificateError(f"{address!r} is not an IP address.", "ip_addresses") from None
        if text not in ips:
            ips.append(text)
    return dns, ips


def issue_certificate(
    authority: CertificateAuthority,
    kind: str,
    common_name: str,
    name: str = "",
    dns_names: list[str] | None = None,
    ip_addresses: list[str] | None = None,
    validity_days: int | None = None,
    key_algorithm: str = KeyAlgorithm.EC_P256,
    description: str = "",
) -> Certificate:
    """Issue and save a server (serverAuth, SANs) or client (clientAuth, CN) certificate."""
    if not authority.has_private_key:
        raise CertificateError(
            f"The CA {authority.name!r} has no private key; it cannot issue.", "authority"
        )
    if authority.is_expired:
        raise CertificateError(f"The CA {authority.name!r} has expired.", "authority")
    if not common_name:
        raise CertificateError("A common name is required.", "common_name")
    dns, ips = normalize_sans(dns_names or [], ip_addresses or [])
    if kind == CertificateKind.SERVER and not dns and not ips:
        # Clients match the host they dial against the SANs, never the CN.
        dns, ips = (
            normalize_sans([common_name], [])
            if not _looks_like_ip(common_name)
            else ([], [common_name])
        )
    ca_cert = load_certificate_pem(authority.certificate_pem)
    ca_key = load_private_key_pem(authority.private_key_pem())
    key = generate_private_key(key_algorithm)
    days = validity_days or settings.NBDWEB_CERT_DEFAULT_VALIDITY_DAYS
    not_before, not_after = _validity(days)
    # A leaf must not outlive its CA: clients reject it after the CA expires anyway.
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if kind == CertificateKind.SERVER
        else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    is_ec = isinstance(key, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not is_ec,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
    )
    sans = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    certificate_obj = builder.sign(ca_key, hashes.SHA256())
    certificate = Certificate(
        name=name
        or f"{kind}-{common_name}"[:80] + f"-{format_serial(certificate_obj.serial_number)[:12]}",
        description=description,
        kind=kind,
        authority=authority,
        common_name=common_name[:200],
        dns_names=dns,
        ip_addresses=ips,
        **certificate_facts(certificate_obj),
    )
    certificate.set_private_key_pem(_key_to_pem(key))
    certificate.save()
    return certificate


def _looks_like_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_certificate_import(
    certificate_pem: str, private_key_pem: str | None, kind: str
) -> tuple[x509.Certificate, PrivateKey | None]:
    certificate = load_certificate_pem(certificate_pem)
    if _is_ca(certificate):
        raise CertificateError("This is a CA certificate; import it as an authority instead.")
    key = None
    if private_key_pem:
        key = load_private_key_pem(private_key_pem)
        if not _key_matches(certificate, key):
            raise CertificateError(
                "The private key does not belong to this certificate.", "private_key_pem"
            )
    elif kind == CertificateKind.SERVER:
        raise CertificateError("A server certificate needs its private key.", "private_key_pem")
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    wanted = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if kind == CertificateKind.SERVER
        else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    if usages is not None and wanted not in usages:
        raise CertificateError(f"The certificate's extended key usage does not allow {kind} use.")
    return certificate, key


def import_certificate(
    name: str, certificate_pem: str, private_key_pem: str | None, kind: str, description: str = ""
) -> Certificate:
    """Save an external certificate; its issuer is linked when it is one of our CAs."""
    certificate_obj, key = check_certificate_import(certificate_pem, private_key_pem, kind)
    authority = None
    for candidate in CertificateAuthority.objects.all():
        if verify_issued_by(certificate_obj, load_certificate_pem(candidate.certificate_pem)):
            authority = candidate
            break
    dns, ips = _sans(certificate_obj)
    certificate = Certificate(
        name=name,
        description=description,
        kind=kind,
        authority=authority,
        common_name=_common_name(certificate_obj)[:200],
        dns_names=dns,
        ip_addresses=ips,
        **certificate_facts(certificate_obj),
    )
    if key is not None:
        certificate.set_private_key_pem(_key_to_pem(key))
    certificate.save()
    return certificate


def revoke_certificate(certificate: Certificate, reason: str = "") -> Certificate:
    """Mark revoked; the serial reaches the workers with the next config snapshot."""
    if certificate.revoked_at is None:
        certificate.revoked_at = timezone.now()
        certificate.revocation_reason = reason[:200]
        certificate.save(update_fields=["revoked_at", "revocation_reason", "last_updated"])
    return certificate
