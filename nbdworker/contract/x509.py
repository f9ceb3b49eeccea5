"""X.509 checks both sides make the same way: the worker when a CA bundle changes under a live
session (nbdworker/tls.py), the web side when it finds which CA issued a certificate
(exports_app/services/ca.py). Standard library and ``cryptography`` only."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature

__all__ = ["verify_issued_by"]


def verify_issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `certificate` (names and signature; not validity dates)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
