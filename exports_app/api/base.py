"""Shared API behaviour: model validation in serializers, transactions in viewsets."""

import copy
from itertools import pairwise

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.exceptions import APIException
from rest_framework.exceptions import ValidationError as DRFValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.routers import APIRootView, DefaultRouter
from rest_framework.viewsets import ModelViewSet

from exports_app.services.export_states import StateConflict

from .concurrency import ETagMixin, IdempotentPostsMixin
from .fields import StrictModelSerializer

__all__ = [
    "BaseModelViewSet",
    "Conflict",
    "HistoryRecordSerializer",
    "NBDWebRouter",
    "ValidatedModelSerializer",
    "django_errors_to_drf",
]


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is in use."
    default_code = "conflict"


def django_errors_to_drf(exc: DjangoValidationError) -> APIException:
    """The API's answer to a service's refusal: 409 when the object's state forbids it, else
    400 naming the fields."""
    if isinstance(exc, StateConflict):
        return Conflict(" ".join(exc.messages))
    if hasattr(exc, "error_dict"):
        detail = {
            ("non_field_errors" if field == "__all__" else field): messages
            for field, messages in exc.message_dict.items()
        }
        return DRFValidationError(detail)
    return DRFValidationError({"non_field_errors": exc.messages})


class ValidatedModelSerializer(StrictModelSerializer):
    # Runs the model's full_clean() on the would-be instance, so the API and the admin share
    # one set of rules.

    def build_instance(self, attrs: dict):
        model = self.Meta.model
        plain = {k: v for k, v in attrs.items() if not model._meta.get_field(k).many_to_many}
        if self.instance is None:
            return model(**plain)
        # Work on a copy so a failed validation never leaves the instance half-changed. An
        # in-memory copy: the viewset has just read (and locked) the row, with its relations.
        instance = copy.copy(self.instance)
        for key, value in plain.items():
            setattr(instance, key, value)
        return instance

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)
        model = self.Meta.model
        instance = self.build_instance(attrs)
        exclude = [f.name for f in model._meta.concrete_fields if not f.editable]
        try:
            instance.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
        except DjangoValidationError as exc:
            raise django_errors_to_drf(exc) from None
        self.after_clean(instance, attrs)
        return attrs

    def after_clean(self, instance, attrs: dict) -> None:
        """Hook: copy values normalised by clean() back into attrs, check m2m rules."""


class HistoryRecordSerializer(serializers.Serializer):
    """One entry of an object's audit trail (django-simple-history)."""

    history_id = serializers.IntegerField(help_text="The record's ID.")
    date = serializers.DateTimeField(help_text="When the change was made.")
    type = serializers.ChoiceField(
        choices=["created", "changed", "deleted"], help_text="What happened to the object."
    )
    user = serializers.CharField(allow_null=True, help_text="Who made the change, if known.")
    changes = serializers.ListField(
        child=serializers.DictField(),
        help_text='The fields changed: [{"field": ..., "old": ..., "new": ...}].',
    )


_HISTORY_TYPES = {"+": "created", "~": "changed", "-": "deleted"}
HISTORY_LIMIT = 100


def history_entries(obj) -> list[dict]:
    """The newest HISTORY_LIMIT records of `obj`, each with the fields it changed."""
    records = list(
        obj.history.select_related("history_user").order_by("-history_date", "-history_id")[
            : HISTORY_LIMIT + 1
        ]
    )
    # Each record is diffed against the one before it; one extra record is fetched so the
    # oldest listed entry still shows its changes.
    entries: list = list(pairwise(records))
    if records and len(records) <= HISTORY_LIMIT:
        entries.append((records[-1], None))
    result = []
    for newer, older in entries[:HISTORY_LIMIT]:
        changes = []
        if older is not None:
            changes = [
                {"field": c.field, "old": c.old, "new": c.new}
                for c in newer.diff_against(older).changes
            ]
        result.append(
            {
                "history_id": newer.history_id,
                "date": newer.history_date,
                "type": _HISTORY_TYPES.get(newer.history_type, newer.history_type),
                "user": newer.history_user.get_username() if newer.history_user else None,
                "changes": changes,
            }
        )
    return result


class BaseModelViewSet(IdempotentPostsMixin, ETagMixin, ModelViewSet):
    """Writes run in one transaction; database conflicts answer 400/409, never 500.
    Every object has its audit trail at `{id}/history/`, and an ETag that If-Match checks."""

    # No PUT: a change is a PATCH of the fields to change (a PUT that kept omitted fields
    # would be a PATCH under another name).
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def retrieve(self, request, *args, **kwargs) -> Response:
        return Response(self.representation_of_read(self.get_object()))

    def create(self, request, *args, **kwargs) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        self.perform_create(serializer)
        return self.current_answer(serializer, status.HTTP_201_CREATED)

    def update(self, request, *args, **kwargs) -> Response:
        # One transaction from the If-Match check (get_object) to the write.
        with transaction.atomic():
            instance = self.get_object()
            serializer = self.get_serializer(
                instance, data=request.data, partial=kwargs.get("partial", False)
            )
            serializer.is_valid(raise_exception=True)
            self.perform_update(serializer)
            return self.current_answer(serializer)

    def destroy(self, request, *args, **kwargs) -> Response:
        with transaction.atomic():
            return super().destroy(request, *args, **kwargs)

    @extend_schema(responses=HistoryRecordSerializer(many=True))
    # The whole trail in one answer (history_entries bounds it), not a page.
    @action(detail=True, methods=["get"], pagination_class=None)
    def history(self, request, pk=None) -> Response:
        """Who changed what and when, newest first."""
        return Response(HistoryRecordSerializer(history_entries(self.get_object()), many=True).data)

    def perform_create(self, serializer) -> None:
        with transaction.atomic():
            try:
                self.create_object(serializer)
            except IntegrityError as exc:
                raise DRFValidationError(
                    {"non_field_errors": [f"Conflicts with existing data: {exc}"]}
                ) from None

    def perform_update(self, serializer) -> None:
        with transaction.atomic():
            try:
                self.update_object(serializer)
            except IntegrityError as exc:
                raise DRFValidationError(
                    {"non_field_errors": [f"Conflicts with existing data: {exc}"]}
                ) from None

    def perform_destroy(self, instance) -> None:
        with transaction.atomic():
            try:
                self.destroy_object(instance)
            except ProtectedError as exc:
                users = ", ".join(sorted({str(obj) for obj in exc.protected_objects})[:5])
                raise Conflict(f"{instance} is still used by: {users}.") from None

    # Override these three rather than perform_*: they already run inside the transaction.
    def create_object(self, serializer) -> None:
        serializer.save()

    def update_object(self, serializer) -> None:
        serializer.save()

    def destroy_object(self, instance) -> None:
        instance.delete()


class AuthenticatedAPIRootView(APIRootView):
    # DRF's root view ignores model permissions; the API's shape is not for anonymous eyes.
    permission_classes = [IsAuthenticated]


class NBDWebRouter(DefaultRouter):
    APIRootView = AuthenticatedAPIRootView
