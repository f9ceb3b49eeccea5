"""Who a TLS client is, and whether it may use an export.

The identity is read from the parsed client certificate: the SHA-256 fingerprint of its DER
encoding, the subject's common names and the subjectAltName entries. Rules match those fields one
by one; a distinguished name is never compared as a string, because tools print the same name
with different ordering, spacing and escaping.

An export's rules: ``allowed_networks`` (the peer address must lie in one of them) and
``allowed_clients`` (any one rule must match the certificate). An empty list does not restrict.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from nbdworker.contract.config import ClientMatch, ExportConfig
from nbdworker.protocol import ExportView

__all__ = [
    "ClientIdentity",
    "ExportAuthorizer",
    "authorize_export",
    "client_matches",
    "peer_ip",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    fingerprint_sha256: str  # 64 lower-case hex digits, no separators
    serial: str  # lower-case hex, no leading zeros (the form TLSConfig.revoked_serials uses)
    common_names: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[IPAddress, ...] = ()
    emails: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    # The certificate itself, for checks against a later policy (nbdworker/tls.py).
    der: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def from_der(cls, der: bytes) -> ClientIdentity:
        """Parse a DER certificate; ValueError if it is not one (or cannot be read)."""
        try:
            return cls._from_der(der)
        except ValueError:
            raise
        except Exception as exc:
            # cryptography raises its own types for some malformed extensions (duplicates,
            # unsupported name forms); the caller only needs to know the certificate is unusable.
            raise ValueError(f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_der(cls, der: bytes) -> ClientIdentity:
        cert = x509.load_der_x509_certificate(der)
        common_names = tuple(
            str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        return cls(
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            serial=format(cert.serial_number, "x"),
            common_names=common_names,
            dns_names=tuple(san.get_values_for_type(x509.DNSName)),
            ip_addresses=tuple(
                ip
                for ip in san.get_values_for_type(x509.IPAddress)
                if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
            ),
            emails=tuple(san.get_values_for_type(x509.RFC822Name)),
            uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
            der=der,
        )

    def describe(self) -> str:
        """A short form for log lines."""
        parts = [f"CN={cn}" for cn in self.common_names]
        parts.append(f"serial={self.serial}")
        parts.append(f"sha256={self.fingerprint_sha256[:16]}…")
        return " ".join(parts)


# subjectAltName prefixes as OpenSSL, GnuTLS and the web UI write them.
_SAN_PREFIXES = {
    "dns": "dns",
    "ip": "ip",
    "ip address": "ip",
    "email": "email",
    "rfc822": "email",
    "uri": "uri",
}


def _dns_key(name: str) -> str:
    # Certificates carry A-labels; an operator may type the U-label form.
    name = name.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def _email_key(address: str) -> str:
    # The domain part is case-insensitive; the local part is left as written (RFC 5321).
    local, at, domain = address.strip().rpartition("@")
    return f"{local}@{domain.lower()}" if at else address.strip()


def _parse_ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _san_matches(rule: str, identity: ClientIdentity) -> bool:
    kind = None
    value = rule.strip()
    prefix, colon, rest = value.partition(":")
    if colon and prefix.strip().lower() in _SAN_PREFIXES:
        # "ip:" prefixes an address that may itself contain colons (IPv6): split once only.
        kind, value = _SAN_PREFIXES[prefix.strip().lower()], rest.strip()
    if kind in (None, "dns") and _dns_key(value) in {_dns_key(n) for n in identity.dns_names}:
        return True
    if kind in (None, "ip"):
        ip = _parse_ip(value)
        if ip is not None and ip in {_parse_ip(str(a)) for a in identity.ip_addresses}:
            return True
    if kind in (None, "email") and _email_key(value) in {_email_key(e) for e in identity.emails}:
        return True
    return kind in (None, "uri") and value in identity.uris


def client_matches(rule: ClientMatch, identity: ClientIdentity) -> bool:
    """Whether one allowed_clients rule admits the certificate."""
    if rule.fingerprint_sha256 is not None:
        wanted = rule.fingerprint_sha256.replace(":", "").lower()
        return wanted == identity.fingerprint_sha256
    if rule.common_name is not None:
        return rule.common_name in identity.common_names
    if rule.san is not None:
        return _san_matches(rule.san, identity)
    return False


def authorize_export(
    export: ExportConfig, address: str | None, identity: ClientIdentity | None
) -> str | None:
    """None if the client may use `export`, else why not (for the server's log)."""
    if export.allowed_networks and not export.allows_address(address):
        return f"address {address or '(none)'} is outside the export's allowed networks"
    if export.allowed_clients:
        if identity is None:
            return "no client certificate, and the export admits listed clients only"
        if not any(client_matches(rule, identity) for rule in export.allowed_clients):
            return "client certificate matches none of the export's allowed clients"
    return None


def peer_ip(peername: Any) -> str | None:
    """The IP address from a transport's ``peername`` (None for Unix sockets)."""
    if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
        ip = _parse_ip(peername[0].split("%", 1)[0])
        return str(ip) if ip is not None else None
    return None


class ExportAuthorizer:
    """The ``authorize`` callback of one connection's `Handshake`.

    It reads the connection's identity when asked, so setting `identity` after the TLS handshake
    applies to every option negotiated after it. It does not log: the handshake also asks it to
    filter LIST, which is not a refusal; the connection logs the refusals the client receives,
    naming the client with `describe()`.
    """

    __slots__ = ("_address", "_lookup", "_peername", "identity")

    def __init__(
        self,
        lookup: Callable[[str], ExportConfig | None],
        peername: Any = None,
    ) -> None:
        # Built on every connect: the peer address is parsed only when an export has network
        # rules (or reload.py asks), not here.
        self._lookup = lookup
        self._peername = peername
        self._address: str | None | bool = False  # False: not parsed yet
        self.identity: ClientIdentity | None = None

    @property
    def address(self) -> str | None:
        """The peer's IP address, normalised (None for Unix sockets); parsed once, when needed."""
        address = self._address
        if address is False:
            address = self._address = peer_ip(self._peername)
        return address  # type: ignore[return-value]

    @property
    def peer(self) -> str:
        return _format_peer(self._peername)

    def __call__(self, view: ExportView) -> str | None:
        export = self._lookup(view.name)
        if export is None:
            return "export is not configured"
        if not export.allowed_networks and not export.allowed_clients:
            return None  # the common case: no rules, nothing to parse
        return authorize_export(export, self.address, self.identity)

    def describe(self) -> str:
        """The client for log lines: address and certificate identity."""
        who = self.identity.describe() if self.identity is not None else "no certificate"
        return f"{self.peer} [{who}]"


def _format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername else "unix-socket client"
