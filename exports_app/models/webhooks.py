"""Webhooks: subscriptions to nbdweb's events and the log of their deliveries."""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from simple_history.models import HistoricalRecords

from exports_app.services import keystore

__all__ = ["WebhookDelivery", "WebhookSubscription"]

MAX_URL_LENGTH = 2000


class WebhookSubscription(models.Model):
    name = models.CharField(max_length=100, unique=True)
    target_url = models.CharField(
        max_length=MAX_URL_LENGTH,
        help_text="http:// or https:// URL that receives a POST per event.",
    )
    event_types = models.JSONField(
        default=list,
        blank=True,
        help_text='Event kinds to deliver, e.g. ["job.failed", "node.offline"]; empty: all.',
    )
    # Encrypted like private keys (exports_app.services.keystore): it signs every delivery.
    secret_encrypted = models.TextField(editable=False)
    enabled = models.BooleanField(default=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        editable=False,
        help_text="Events the owner may not view are not delivered.",
    )
    created = models.DateTimeField(auto_now_add=True)
    last_updated = models.DateTimeField(auto_now=True)

    history = HistoricalRecords(excluded_fields=["secret_encrypted"])

    class Meta:
        ordering = ["name"]
        verbose_name = "webhook"

    def __str__(self) -> str:
        return self.name

    def set_secret(self, secret: str) -> None:
        self.secret_encrypted = keystore.encrypt_private_key(secret)

    def secret(self) -> str:
        return keystore.decrypt_private_key(self.secret_encrypted)

    def clean(self) -> None:
        # Imported here: the service imports the models.
        from exports_app.services import events, webhooks

        errors = {}
        try:
            self.target_url = webhooks.validate_url(self.target_url)
        except ValidationError as exc:
            errors["target_url"] = exc.messages
        try:
            self.event_types = events.validate_kinds(self.event_types)
        except ValidationError as exc:
            errors["event_types"] = exc.messages
        if errors:
            raise ValidationError(errors)

    def wants(self, kind: str) -> bool:
        return not self.event_types or kind in self.event_types


class DeliveryState(models.TextChoices):
    PENDING = "pending", "Pending"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class WebhookDelivery(models.Model):
    """One event sent to one subscription, with every attempt's outcome."""

    subscription = models.ForeignKey(
        WebhookSubscription, on_delete=models.CASCADE, related_name="deliveries", editable=False
    )
    event_id = models.CharField(max_length=64, editable=False)
    event_kind = models.CharField(max_length=64, editable=False)
    payload = models.JSONField(editable=False)
    state = models.CharField(
        max_length=10, choices=DeliveryState.choices, default=DeliveryState.PENDING, editable=False
    )
    attempts = models.PositiveSmallIntegerField(default=0, editable=False)
    response_code = models.PositiveSmallIntegerField(
        null=True, blank=True, editable=False, help_text="The last attempt's HTTP status."
    )
    error = models.TextField(blank=True, editable=False)
    # [{"at": ISO time, "response_code": int | None, "error": str}, ...], oldest first.
    attempt_log = models.JSONField(default=list, blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    finished = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-pk"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["subscription", "state"], name="delivery_sub_state")]

    def __str__(self) -> str:
        return f"{self.event_kind} to {self.subscription_id} #{self.pk}"
