"""Server-side TLS: the `ssl.SSLContext` built from a node's TLS policy, and the checks made on a
client once its TLS handshake has completed.

The policy arrives as PEM text in the worker's config. Python's ``ssl`` only loads a certificate
chain and key from files, so they are handed to OpenSSL through an anonymous in-memory file
(``memfd_create``) reached by its ``/proc/self/fd`` path: the key never exists in any directory.
Where memfd is missing, a 0600 file in a 0700 private directory is used and removed straight after
loading.

Contexts are cached by the content of the policy, so a config generation that changes the
certificate, key, CA bundle or verification builds a new context for new connections, while
connections already up keep the context they were accepted with.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509

from nbdworker.auth import ClientIdentity
from nbdworker.contract.config import TLSConfig
from nbdworker.contract.x509 import verify_issued_by

__all__ = [
    "CLIENT_VERIFICATION_MODES",
    "MIN_VERSIONS",
    "PeerCheck",
    "TLSContextCache",
    "TLSSetupError",
    "build_server_context",
    "check_peer",
    "is_revoked",
    "issuer_withdrawn",
]

log = logging.getLogger("nbdworker.tls")

MIN_VERSIONS: dict[str, ssl.TLSVersion] = {
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

CLIENT_VERIFICATION_MODES: dict[str, ssl.VerifyMode] = {
    # "none" does not even ask for a certificate: encryption only, any client is served.
    "none": ssl.CERT_NONE,
    # "optional" asks; a client may decline, but a certificate it does send must verify.
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}

# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 suites are all of that kind already).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


class TLSSetupError(Exception):
    """The TLS policy cannot be turned into a working server context."""


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the controlling terminal for an encrypted key.
    raise TLSSetupError("the private key is encrypted; the worker needs an unencrypted key")


@contextlib.contextmanager
def _private_file(name: str, data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data`, readable by this process only."""
    memfd_create = getattr(os, "memfd_create", None)
    fd = -1
    if memfd_create is not None:
        with contextlib.suppress(OSError):
            fd = memfd_create(name, os.MFD_CLOEXEC)
    if fd >= 0:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # /proc/self/fd/N of a memfd is openable only by this process (or its ptracers).
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="nbdworker-tls-")  # mode 0700
    try:
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def build_server_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server context for `tls`: TLS >= 1.2 (or >= 1.3), the policy's certificate and key, and
    client certificates verified against the policy's CA bundle as configured."""
    if not tls.certificate_pem or not tls.key_pem:
        raise TLSSetupError("a TLS mode needs a certificate and a private key")
    try:
        minimum = MIN_VERSIONS[tls.min_version]
        verify_mode = CLIENT_VERIFICATION_MODES[tls.client_verification]
    except KeyError as exc:
        raise TLSSetupError(f"unsupported TLS setting {exc.args[0]!r}") from None

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Set after construction so that a laxer system-wide OpenSSL default cannot widen it.
    ctx.minimum_version = minimum
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_NO_RENEGOTIATION
    )
    try:
        ctx.set_ciphers(_TLS12_CIPHERS)
    except ssl.SSLError as exc:  # pragma: no cover - depends on the OpenSSL build
        raise TLSSetupError(f"no usable TLS 1.2 cipher suites: {exc}") from None

    try:
        with (
            _private_file("server-cert.pem", tls.certificate_pem.encode()) as cert_path,
            _private_file("server-key.pem", tls.key_pem.encode()) as key_path,
        ):
            ctx.load_cert_chain(cert_path, key_path, password=_refuse_password)
    except ssl.SSLError as exc:
        raise TLSSetupError(f"cannot load the server certificate and key: {exc}") from None

    if verify_mode is not ssl.CERT_NONE:
        if not tls.ca_pem.strip():
            raise TLSSetupError("client verification needs a CA bundle")
        try:
            ctx.load_verify_locations(cadata=tls.ca_pem)
        except ssl.SSLError as exc:
            raise TLSSetupError(f"cannot load the CA bundle: {exc}") from None
    # Only now: with CERT_NONE nothing is requested from the client, which is the point of "none".
    ctx.verify_mode = verify_mode
    # A connection carries one long-lived session; resumption tickets buy nothing and would let a
    # session outlive a change of CA or revocation list.
    ctx.options |= ssl.OP_NO_TICKET
    with contextlib.suppress(AttributeError, ValueError):
        ctx.num_tickets = 0
    return ctx


def _context_key(tls: TLSConfig) -> tuple[str, ...]:
    # Revocations are checked after the handshake, not by the context: changing them alone
    # reuses the context.
    return (tls.certificate_pem, tls.key_pem, tls.ca_pem, tls.client_verification, tls.min_version)


class TLSContextCache:
    """The server context for the current policy, rebuilt only when the policy changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, ...] | None = None
        self._context: ssl.SSLContext | None = None

    def get(self, tls: TLSConfig) -> ssl.SSLContext:
        """The context for `tls`; raises TLSSetupError when the policy is unusable."""
        key = _context_key(tls)
        with self._lock:
            if self._context is not None and self._key == key:
                return self._context
            context = build_server_context(tls)
            # Only the newest is kept: live connections hold a reference to their own context,
            # and an older policy is never asked for again.
            self._key, self._context = key, context
            log.info(
                "TLS context built: TLS >= %s, client verification %s",
                tls.min_version,
                tls.client_verification,
            )
            return context


@functools.lru_cache(maxsize=8)
def _trusted_cas(ca_pem: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(ca_pem.encode()))
    except ValueError:
        return ()


def issuer_withdrawn(identity: ClientIdentity | None, old: TLSConfig, new: TLSConfig) -> bool:
    """True if the client's certificate was issued by a CA that `old` trusted and `new` no
    longer does.

    Only a certificate issued directly by a CA of the bundle can be judged: Python's `ssl` does
    not keep the chain a client presented, so a certificate issued by an intermediate stays
    until the client reconnects (and is verified in full against the new bundle then).
    """
    if identity is None or not identity.der or old.ca_pem == new.ca_pem:
        return False
    try:
        cert = x509.load_der_x509_certificate(identity.der)
    except ValueError:
        return False
    if any(verify_issued_by(cert, ca) for ca in _trusted_cas(new.ca_pem)):
        return False
    return any(verify_issued_by(cert, ca) for ca in _trusted_cas(old.ca_pem))


def is_revoked(identity: ClientIdentity | None, tls: TLSConfig) -> bool:
    """True if the client's certificate serial is on the policy's revocation list."""
    return identity is not None and identity.serial in tls.revoked_serials


@dataclass(frozen=True, slots=True)
class PeerCheck:
    """What is known about a client once its TLS handshake completed."""

    identity: ClientIdentity | None  # None: the client presented no certificate
    refusal: str | None  # None: the connection may go on negotiating
    version: str | None = None
    cipher: str | None = None


def check_peer(sslobj: ssl.SSLObject | ssl.SSLSocket, tls: TLSConfig) -> PeerCheck:
    """Identify a client after its handshake and decide whether it may continue.

    OpenSSL has already verified any certificate against the CA bundle (and its validity
    period); what is left is the policy's own revocation list.
    """
    version = sslobj.version()
    cipher_info = sslobj.cipher()
    cipher = cipher_info[0] if cipher_info else None
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        if tls.client_verification == "required":
            # OpenSSL enforces this already; kept as a second lock on the same door.
            return PeerCheck(None, "no client certificate", version, cipher)
        return PeerCheck(None, None, version, cipher)
    try:
        identity = ClientIdentity.from_der(der)
    except ValueError as exc:
        return PeerCheck(None, f"unreadable client certificate: {exc}", version, cipher)
    if is_revoked(identity, tls):
        return PeerCheck(
            identity, f"certificate serial {identity.serial} is revoked", version, cipher
        )
    return PeerCheck(identity, None, version, cipher)
