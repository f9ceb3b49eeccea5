"""Certificate authorities and the certificates they issue (or that were imported).

Private keys are kept only as ciphertext (see exports_app.services.keystore); the key that
encrypts them comes from the environment, never from the database.
"""

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone
from simple_history.models import HistoricalRecords

from exports_app.choices import CertificateKind, KeyAlgorithm

__all__ = ["Certificate", "CertificateAuthority", "X509Material"]


class X509Material(models.Model):
    """What a CA and a leaf certificate share: the PEM, its key, and facts read from it."""

    name = models.CharField(max_length=100, unique=True)
    description = models.CharField(max_length=200, blank=True)
    subject = models.CharField(max_length=500, editable=False)
    serial = models.CharField(
        max_length=64, editable=False, db_index=True, help_text="Lower-case hex, no leading zeros."
    )
    fingerprint_sha256 = models.CharField(
        max_length=64, editable=False, unique=True, help_text="Lower-case hex, no colons."
    )
    not_before = models.DateTimeField(editable=False)
    not_after = models.DateTimeField(editable=False)
    certificate_pem = models.TextField(editable=False)
    encrypted_private_key = models.TextField(
        blank=True, editable=False, help_text="Fernet ciphertext; empty when the key is unknown."
    )
    created = models.DateTimeField(auto_now_add=True)
    last_updated = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def has_private_key(self) -> bool:
        return bool(self.encrypted_private_key)

    def private_key_pem(self) -> str:
        """The decrypted PKCS#8 PEM; raises KeyDecryptionError or ValueError without a key."""
        from exports_app.services.keystore import decrypt_private_key

        if not self.encrypted_private_key:
            raise ValueError(f"{self.name!r} has no private key")
        return decrypt_private_key(self.encrypted_private_key)

    def set_private_key_pem(self, pem: str) -> None:
        from exports_app.services.keystore import encrypt_private_key

        self.encrypted_private_key = encrypt_private_key(pem)

    @property
    def is_expired(self) -> bool:
        return self.not_after <= timezone.now()

    @property
    def expires_soon(self) -> bool:
        """Expired, or expiring within NBDWEB_CERT_EXPIRY_WARNING_DAYS."""
        days = settings.NBDWEB_CERT_EXPIRY_WARNING_DAYS
        return self.not_after <= timezone.now() + timedelta(days=days)


class CertificateAuthority(X509Material):
    key_algorithm = models.CharField(
        max_length=16, choices=KeyAlgorithm.choices, blank=True, editable=False
    )
    is_imported = models.BooleanField(
        default=False, editable=False, help_text="Imported from outside rather than created here."
    )

    history = HistoricalRecords(excluded_fields=["encrypted_private_key"])

    class Meta(X509Material.Meta):
        verbose_name = "certificate authority"
        verbose_name_plural = "certificate authorities"

    @property
    def can_issue(self) -> bool:
        return self.has_private_key and not self.is_expired


class Certificate(X509Material):
    kind = models.CharField(max_length=8, choices=CertificateKind.choices, editable=False)
    authority = models.ForeignKey(
        CertificateAuthority,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="certificates",
        editable=False,
        help_text="The issuing CA when it is known here.",
    )
    common_name = models.CharField(max_length=200, blank=True, editable=False)
    dns_names = models.JSONField(default=list, blank=True, editable=False)
    ip_addresses = models.JSONField(default=list, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    revocation_reason = models.CharField(max_length=200, blank=True, editable=False)

    history = HistoricalRecords(excluded_fields=["encrypted_private_key"])

    class Meta(X509Material.Meta):
        permissions = [
            ("download_certificate_bundle", "Can download a certificate bundle (private key)"),
            ("revoke_certificate", "Can revoke a certificate"),
        ]

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def warnings(self) -> list[str]:
        found = []
        if self.is_revoked:
            found.append("This certificate is revoked.")
        elif self.is_expired:
            found.append(f"This certificate expired on {self.not_after:%Y-%m-%d}.")
        elif self.expires_soon:
            found.append(f"This certificate expires on {self.not_after:%Y-%m-%d}.")
        return found
