"""Create-or-import of CAs and certificates: the one set of rules behind the API's POST and the
admin's add forms.

`NewAuthority` and `NewCertificate` hold what was asked for. `check()` raises Django's
`ValidationError` keyed by the input at fault (the API answers 400 with those field errors, the
admin shows them on its form); `create()` makes or imports the object through
`exports_app.services.ca`, in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import transaction

from exports_app.choices import CertificateKind, KeyAlgorithm
from exports_app.models import Certificate, CertificateAuthority
from exports_app.services import ca

__all__ = ["NewAuthority", "NewCertificate"]


def _field_error(exc: ca.CertificateError) -> ValidationError:
    return ValidationError({exc.field: [str(exc)]})


class _FromInput:
    @classmethod
    def from_input(cls, data: Mapping[str, Any]) -> Self:
        """From an API serializer's or an admin form's cleaned data: the known keys, where
        given (a missing or None value takes the default)."""
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        return cls(**{n: data[n] for n in names if data.get(n) is not None})


@dataclass(frozen=True)
class NewAuthority(_FromInput):
    """An internal CA made from `common_name`, or an external one imported from
    `certificate_pem` (with `private_key_pem` it can issue, without it it is only trusted)."""

    name: str
    description: str = ""
    common_name: str = ""
    key_algorithm: str = KeyAlgorithm.EC_P256
    validity_days: int | None = None
    certificate_pem: str = ""
    private_key_pem: str = ""

    @property
    def is_import(self) -> bool:
        return bool(self.certificate_pem)

    def check(self) -> None:
        """Raise ValidationError unless create() can make this CA."""
        if bool(self.common_name) == self.is_import:
            raise ValidationError(
                {
                    NON_FIELD_ERRORS: [
                        "Give common_name to create a CA, or certificate_pem to import one."
                    ]
                }
            )
        if not self.is_import:
            if self.private_key_pem:
                raise ValidationError(
                    {"private_key_pem": ["Only an imported CA takes a private key."]}
                )
            return
        try:
            certificate, _ = ca.check_authority_import(
                self.certificate_pem, self.private_key_pem or None
            )
        except ca.CertificateError as exc:
            raise _field_error(exc) from None
        fingerprint = ca.fingerprint_sha256(certificate)
        if CertificateAuthority.objects.filter(fingerprint_sha256=fingerprint).exists():
            raise ValidationError({"certificate_pem": ["This CA is already imported."]})

    def create(self) -> CertificateAuthority:
        """Make or import the CA (check() first). Raises ValidationError on unusable material."""
        try:
            with transaction.atomic():
                if self.is_import:
                    return ca.import_authority(
                        self.name,
                        self.certificate_pem,
                        self.private_key_pem or None,
                        description=self.description,
                    )
                return ca.create_authority(
                    self.name,
                    self.common_name,
                    self.key_algorithm,
                    self.validity_days,
                    description=self.description,
                )
        except ca.CertificateError as exc:
            raise _field_error(exc) from None


# Inputs that only issuing uses; an import takes everything from the certificate itself.
_ISSUE_ONLY = ("authority", "common_name", "dns_names", "ip_addresses", "validity_days")


@dataclass(frozen=True)
class NewCertificate(_FromInput):
    """A certificate issued by `authority` for `common_name` (and SANs), or an external one
    imported from `certificate_pem` (a server certificate needs `private_key_pem`)."""

    kind: str = CertificateKind.CLIENT
    name: str = ""  # issued: defaults to <kind>-<common name>-<serial>; imported: required
    description: str = ""
    authority: CertificateAuthority | None = None
    common_name: str = ""
    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[str] = field(default_factory=list)
    validity_days: int | None = None
    key_algorithm: str = KeyAlgorithm.EC_P256
    certificate_pem: str = ""
    private_key_pem: str = ""

    @property
    def is_import(self) -> bool:
        return bool(self.certificate_pem)

    def check(self) -> None:
        """Raise ValidationError unless create() can make this certificate."""
        if self.is_import:
            self._check_import()
        else:
            self._check_issue()

    def _check_import(self) -> None:
        errors = {
            name: ["Not used when importing a certificate."]
            for name in _ISSUE_ONLY
            if getattr(self, name)
        }
        if not self.name:
            errors["name"] = ["Name the imported certificate."]
        if errors:
            raise ValidationError(errors)
        try:
            certificate, _ = ca.check_certificate_import(
                self.certificate_pem, self.private_key_pem or None, self.kind
            )
        except ca.CertificateError as exc:
            raise _field_error(exc) from None
        fingerprint = ca.fingerprint_sha256(certificate)
        if Certificate.objects.filter(fingerprint_sha256=fingerprint).exists():
            raise ValidationError({"certificate_pem": ["This certificate is already imported."]})

    def _check_issue(self) -> None:
        if self.private_key_pem:
            raise ValidationError(
                {"private_key_pem": ["Only an imported certificate takes a private key."]}
            )
        errors = {}
        authority = self.authority
        if authority is None:
            errors["authority"] = ["Give the issuing CA, or certificate_pem to import."]
        elif not authority.has_private_key:
            errors["authority"] = [
                f"The CA {authority.name!r} has no private key; it cannot issue."
            ]
        elif authority.is_expired:
            errors["authority"] = [f"The CA {authority.name!r} has expired."]
        if not self.common_name:
            errors["common_name"] = ["This field is required to issue a certificate."]
        try:
            ca.normalize_sans(self.dns_names, self.ip_addresses)
        except ca.CertificateError as exc:
            errors[exc.field] = [str(exc)]
        if errors:
            raise ValidationError(errors)

    def create(self) -> Certificate:
        """Issue or import the certificate (check() first). Raises ValidationError on unusable
        material."""
        try:
            with transaction.atomic():
                if self.is_import:
                    return ca.import_certificate(
                        self.name,
                        self.certificate_pem,
                        self.private_key_pem or None,
                        self.kind,
                        description=self.description,
                    )
                if self.authority is None:  # check() refuses this with the same message
                    raise ca.CertificateError(
                        "Give the issuing CA, or certificate_pem to import.", "authority"
                    )
                return ca.issue_certificate(
                    self.authority,
                    self.kind,
                    self.common_name,
                    name=self.name,
                    dns_names=self.dns_names,
                    ip_addresses=self.ip_addresses,
                    validity_days=self.validity_days,
                    key_algorithm=self.key_algorithm,
                    description=self.description,
                )
        except ca.CertificateError as exc:
            raise _field_error(exc) from None
