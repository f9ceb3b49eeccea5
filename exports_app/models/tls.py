"""TLS policies: how a node negotiates TLS and which clients it trusts."""

from django.core.exceptions import ValidationError
from django.db import models
from simple_history.models import HistoricalRecords

from exports_app.choices import CertificateKind, ClientVerification, TLSMode, TLSVersion
from exports_app.models.certificates import Certificate
from exports_app.models.exports import Export
from nbdworker.contract.config import TLS_REQUIRED_MODES

__all__ = ["OPTIONALTLS_WARNING", "TLSPolicy"]

OPTIONALTLS_WARNING = (
    "OPTIONALTLS lets clients choose plaintext: a man in the middle can strip STARTTLS and "
    "downgrade every connection. Use FORCEDTLS, or SELECTIVETLS with tls_required exports."
)


class TLSPolicy(models.Model):
    name = models.CharField(max_length=100, unique=True)
    description = models.CharField(max_length=200, blank=True)
    mode = models.CharField(max_length=16, choices=TLSMode.choices, default=TLSMode.NOTLS)
    server_certificate = models.ForeignKey(
        "exports_app.Certificate",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="server_policies",
        help_text="Required for every mode but NOTLS; it must have its private key.",
    )
    trusted_authorities = models.ManyToManyField(
        "exports_app.CertificateAuthority",
        blank=True,
        related_name="trusting_policies",
        help_text="CAs whose client certificates are accepted.",
    )
    client_verification = models.CharField(
        max_length=8, choices=ClientVerification.choices, default=ClientVerification.NONE
    )
    min_tls_version = models.CharField(
        max_length=4, choices=TLSVersion.choices, default=TLSVersion.TLS_1_2
    )
    created = models.DateTimeField(auto_now_add=True)
    last_updated = models.DateTimeField(auto_now=True)

    history = HistoricalRecords(m2m_fields=[trusted_authorities])

    class Meta:
        ordering = ["name"]
        verbose_name = "TLS policy"
        verbose_name_plural = "TLS policies"

    def __str__(self) -> str:
        return f"{self.name} ({self.mode})"

    @property
    def uses_tls(self) -> bool:
        return self.mode != TLSMode.NOTLS

    @property
    def warnings(self) -> list[str]:
        found = []
        if self.mode == TLSMode.OPTIONALTLS:
            found.append(OPTIONALTLS_WARNING)
        cert = self.server_certificate if self.server_certificate_id else None
        if cert is not None and self.uses_tls and cert.expires_soon:
            found.append(
                f"The server certificate {cert.name!r} expires on {cert.not_after:%Y-%m-%d}."
            )
        return found

    @property
    def enforces_tls_required(self) -> bool:
        """Whether this mode can hold an export with `tls_required` to TLS.

        Only SELECTIVETLS and FORCEDTLS can. NOTLS has no TLS, and OPTIONALTLS never refuses a
        plaintext client (NBD_REP_ERR_TLS_REQD is not part of it), so the worker refuses to
        serve such an export under either and the web side refuses to create one. The list of
        modes is the worker's own (`nbdworker.contract.config.TLS_REQUIRED_MODES`).
        """
        return self.mode in TLS_REQUIRED_MODES

    def export_needs_tls(self, tls_required: bool) -> bool:
        """Whether a client must use TLS to reach an export with this `tls_required`: exactly
        what the worker enforces (`nbdworker.protocol.tlsmode.export_needs_tls`)."""
        if self.mode == TLSMode.FORCEDTLS:
            return True
        return tls_required and self.mode == TLSMode.SELECTIVETLS

    def clean(self) -> None:
        errors: dict[str, str] = {}
        cert = self.server_certificate if self.server_certificate_id else None
        if self.uses_tls:
            if cert is None:
                errors["server_certificate"] = (
                    f"{self.mode} needs a server certificate with its private key."
                )
            elif not cert.has_private_key:
                errors["server_certificate"] = (
                    f"The certificate {cert.name!r} has no private key; a server cannot use it."
                )
        if cert is not None:
            if cert.kind != CertificateKind.SERVER:
                errors["server_certificate"] = "Choose a server certificate, not a client one."
            elif cert.is_revoked:
                errors["server_certificate"] = f"The certificate {cert.name!r} is revoked."
            elif cert.is_expired:
                errors["server_certificate"] = f"The certificate {cert.name!r} has expired."
        if not self.enforces_tls_required and self.pk is not None:
            tls_only = Export.objects.filter(node__tls_policy=self, tls_required=True)
            if tls_only.exists():
                names = ", ".join(repr(e.name[:40]) for e in tls_only[:5])
                errors["mode"] = (
                    f"{self.mode} cannot serve exports that require TLS ({names}): clients could "
                    "reach them in plaintext. Use SELECTIVETLS or FORCEDTLS, or clear "
                    "tls_required on those exports first."
                )
        if errors:
            raise ValidationError(errors)

    def validate_trusted_authorities(self, authorities: list) -> None:
        """Client verification needs a CA to verify against (m2m, so not part of clean())."""
        if (
            self.uses_tls
            and self.client_verification != ClientVerification.NONE
            and not authorities
        ):
            raise ValidationError(
                {"trusted_authorities": "Client verification needs at least one trusted CA."}
            )

    def revoked_serials(self) -> list[str]:
        """Serials (lower-case hex) of revoked certificates issued by the trusted CAs."""
        return sorted(
            Certificate.objects.filter(
                authority__in=self.trusted_authorities.all(), revoked_at__isnull=False
            ).values_list("serial", flat=True)
        )
