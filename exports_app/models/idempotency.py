"""Idempotency keys: what a POST with an `Idempotency-Key` header answered, so a retry of the
same request gets the same answer instead of creating a second export or job."""

from django.conf import settings
from django.db import models

__all__ = ["IdempotencyKey"]


class IdempotencyKey(models.Model):
    # Scoped per user: two users' keys never collide, and one cannot replay another's answer.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+", editable=False
    )
    key = models.CharField(max_length=255, editable=False)
    # SHA-256 of the method, path and body: the same key with another request is refused.
    request_digest = models.CharField(max_length=64, editable=False)
    # Null while the first request runs.
    status_code = models.PositiveSmallIntegerField(null=True, editable=False)
    response_body = models.JSONField(null=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField(db_index=True, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.user_id})"
