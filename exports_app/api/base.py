"""Shared API behaviour: model validation in serializers, transactions in viewsets."""

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from rest_framework import serializers, status
from rest_framework.exceptions import APIException
from rest_framework.exceptions import ValidationError as DRFValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.routers import APIRootView, DefaultRouter
from rest_framework.viewsets import ModelViewSet

__all__ = [
    "BaseModelViewSet",
    "Conflict",
    "NBDWebRouter",
    "ValidatedModelSerializer",
    "django_errors_to_drf",
]


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is in use."
    default_code = "conflict"


def django_errors_to_drf(exc: DjangoValidationError) -> DRFValidationError:
    if hasattr(exc, "error_dict"):
        detail = {
            ("non_field_errors" if field == "__all__" else field): messages
            for field, messages in exc.message_dict.items()
        }
        return DRFValidationError(detail)
    return DRFValidationError({"non_field_errors": exc.messages})


class ValidatedModelSerializer(serializers.ModelSerializer):
    """Runs the model's full_clean() on the would-be instance, so the API and the admin share
    one set of rules (NetBox does the same)."""

    def build_instance(self, attrs: dict):
        model = self.Meta.model
        plain = {k: v for k, v in attrs.items() if not model._meta.get_field(k).many_to_many}
        if self.instance is None:
            return model(**plain)
        # Work on a copy so a failed validation never leaves the instance half-changed.
        instance = model.objects.get(pk=self.instance.pk)
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


class BaseModelViewSet(ModelViewSet):
    """Writes run in one transaction; database conflicts answer 400/409, never 500."""

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
