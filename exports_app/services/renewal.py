"""Renewing a certificate: a successor from the same CA, with the same kind, common name and
SANs; a server certificate's successor takes its place in the TLS policies that serve it (the
signals publish the nodes' new config)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from exports_app.models import Certificate, TLSPolicy
from exports_app.services import ca
from exports_app.services.audit import record_event

__all__ = ["renew_certificate"]


def renew_certificate(
    certificate: Certificate, user: Any = None, validity_days: int | None = None
) -> Certificate:
    """Issue the successor for `user` (recorded in the audit trail); raises
    ca.CertificateError when the CA cannot issue it."""
    authority = certificate.authority
    if authority is None:
        raise ca.CertificateError(
            f"{certificate.name!r} was imported: import its successor instead.", "authority"
        )
    with transaction.atomic():
        successor = ca.issue_certificate(
            authority,
            certificate.kind,
            certificate.common_name,
            dns_names=list(certificate.dns_names),
            ip_addresses=list(certificate.ip_addresses),
            validity_days=validity_days,
            description=f"Renews {certificate.name}"[:200],
        )
        for policy in TLSPolicy.objects.select_for_update().filter(server_certificate=certificate):
            policy.server_certificate = successor
            policy.save(update_fields=["server_certificate", "last_updated"])
        record_event(user, certificate, f"Renewed as {successor.name} (serial {successor.serial}).")
    return successor
