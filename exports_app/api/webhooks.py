"""`/api/v1/webhooks/`: subscriptions to nbdweb's events, and their delivery log.

Managing subscriptions needs the model permissions of `WebhookSubscription`, and a user sees and
changes only their own subscriptions (a superuser: all); a subscription only gets the events its
owner (who created it) may view, and none once its owner is deleted. The secret is write-only:
it signs every delivery (exports_app.services.webhooks) and is stored encrypted.
"""

from __future__ import annotations

from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.response import Response

from exports_app.models import WebhookDelivery, WebhookSubscription
from exports_app.services import events, webhooks

from .base import BaseModelViewSet, ValidatedModelSerializer
from .fields import StrictModelSerializer

__all__ = ["WebhookDeliverySerializer", "WebhookSerializer", "WebhookViewSet"]

DELIVERY_LOG_LIMIT = 100


class WebhookSerializer(ValidatedModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="webhooksubscription-detail")
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=list(events.EVENT_KINDS)),
        required=False,
        max_length=len(events.EVENT_KINDS),
        help_text="Event kinds to deliver; empty or left out: all.",
    )
    secret = serializers.CharField(
        write_only=True,
        min_length=16,
        max_length=200,
        validators=[RegexValidator(r"^[\x21-\x7e]+$", "Printable ASCII without spaces.")],
        help_text="Signs each delivery (X-Nbdweb-Signature); needed when creating. Never shown.",
    )
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = WebhookSubscription
        fields = [
            "id",
            "url",
            "name",
            "target_url",
            "event_types",
            "enabled",
            "secret",
            "owner",
            "created",
            "last_updated",
        ]
        read_only_fields = ["owner", "created", "last_updated"]
        extra_kwargs = {
            "enabled": {"help_text": "Deliver events to it; off keeps it without deliveries."},
        }

    def validate(self, attrs: dict) -> dict:
        secret = attrs.pop("secret", None)
        if secret is None and self.instance is None:
            raise serializers.ValidationError({"secret": ["This field is required."]})
        attrs = super().validate(attrs)
        if secret is not None:
            attrs["secret"] = secret
        return attrs

    def after_clean(self, instance: WebhookSubscription, attrs: dict) -> None:
        # clean() normalised these: save what was checked.
        attrs["target_url"] = instance.target_url
        attrs["event_types"] = instance.event_types

    def create(self, validated_data: dict) -> WebhookSubscription:
        secret = validated_data.pop("secret")
        subscription = WebhookSubscription(**validated_data)
        subscription.owner = self.context["request"].user
        subscription.set_secret(secret)
        subscription.save()
        return subscription

    def update(self, instance: WebhookSubscription, validated_data: dict) -> WebhookSubscription:
        secret = validated_data.pop("secret", None)
        if secret is not None:
            instance.set_secret(secret)
        return super().update(instance, validated_data)


class WebhookDeliverySerializer(StrictModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "event_id",
            "event_kind",
            "state",
            "attempts",
            "response_code",
            "error",
            "attempt_log",
            "payload",
            "created",
            "finished",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "event_id": {"help_text": "The event's ID in /api/v1/events/."},
            "event_kind": {"help_text": "The event's kind."},
            "state": {"help_text": "pending until an attempt succeeds or the last one failed."},
            "attempts": {"help_text": "Attempts made so far."},
            "error": {"help_text": "Why the last attempt failed; empty after a success."},
            "attempt_log": {"help_text": "Every attempt: time, HTTP status, error."},
            "payload": {"help_text": "The event as it is sent (the POST body)."},
            "finished": {"help_text": "When it succeeded or was given up."},
        }


class WebhookViewSet(BaseModelViewSet):
    queryset = WebhookSubscription.objects.select_related("owner")
    serializer_class = WebhookSerializer
    filterset_fields = ["name", "enabled"]
    action_permissions = {"deliveries": ["exports_app.view_webhooksubscription"]}

    def get_queryset(self):
        return webhooks.subscriptions_of(self.request.user, super().get_queryset())

    @extend_schema(responses=WebhookDeliverySerializer(many=True))
    @action(detail=True, methods=["get"])
    def deliveries(self, request, pk=None) -> Response:
        """The newest deliveries (at most 100), each with its attempts and response codes."""
        subscription = self.get_object()
        recent = subscription.deliveries.order_by("-pk")[:DELIVERY_LOG_LIMIT]
        return Response(WebhookDeliverySerializer(recent, many=True).data)
