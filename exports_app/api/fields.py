"""Strict input fields for the API's bodies and query parameters: numbers are ASCII only.

DRF's and Django's integer fields read numbers with int() or Decimal(), which also take
Arabic-Indic, full-width and other Unicode digits ("١٢" is 12), and an ID past the database's
integer range goes on to fail in SQL. The serializers (`StrictModelSerializer`) and the filter
sets (`exports_app.filtersets.NBDWebFilterSet`) map every integer and relation field to the
fields here, so each number the API reads goes through exports_app.validators.parse_ascii_int.
"""

from __future__ import annotations

import django_filters
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from rest_framework import serializers

from exports_app.formfields import AsciiIntegerFormField
from exports_app.validators import MAX_OBJECT_ID, parse_ascii_int, parse_object_id

__all__ = [
    "AsciiIntegerField",
    "AsciiIntegerFilter",
    "AsciiModelChoiceFilter",
    "AsciiPrimaryKeyRelatedField",
    "StrictModelSerializer",
]


def _ascii_int_or_none(data: object) -> int | None:
    """An int from a JSON number or from a string of ASCII digits; None for anything else."""
    if isinstance(data, bool):
        return None
    if isinstance(data, int):
        return data
    if isinstance(data, float):
        return int(data) if data.is_integer() else None
    if isinstance(data, str):
        return parse_ascii_int(data.strip())
    return None


class AsciiIntegerField(serializers.IntegerField):
    """An IntegerField that takes a JSON integer or ASCII digits, bounded by default to the
    database's bigint range."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("max_value", MAX_OBJECT_ID)
        kwargs.setdefault("min_value", -MAX_OBJECT_ID - 1)
        super().__init__(**kwargs)

    def to_internal_value(self, data: object) -> int:
        if isinstance(data, str) and len(data) > self.MAX_STRING_LENGTH:
            self.fail("max_string_length")
        value = _ascii_int_or_none(data)
        if value is None:
            self.fail("invalid")
        return value


class AsciiPrimaryKeyRelatedField(serializers.PrimaryKeyRelatedField):
    """A related object by ID: a JSON integer or ASCII digits within the database's range."""

    def to_internal_value(self, data: object):
        value = _ascii_int_or_none(data)
        if value is None or not 0 <= value <= MAX_OBJECT_ID:
            self.fail("incorrect_type", data_type=type(data).__name__)
        return super().to_internal_value(value)


class StrictModelSerializer(serializers.ModelSerializer):
    """The base of the API's model serializers: integer model fields and relations read ASCII
    numbers only (fields declared by hand use AsciiIntegerField / AsciiPrimaryKeyRelatedField)."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.AutoField: AsciiIntegerField,
        models.BigAutoField: AsciiIntegerField,
        models.IntegerField: AsciiIntegerField,
        models.BigIntegerField: AsciiIntegerField,
        models.SmallIntegerField: AsciiIntegerField,
        models.PositiveIntegerField: AsciiIntegerField,
        models.PositiveSmallIntegerField: AsciiIntegerField,
        models.PositiveBigIntegerField: AsciiIntegerField,
    }
    serializer_related_field = AsciiPrimaryKeyRelatedField


# -- filters -------------------------------------------------------------------------------------


class AsciiModelChoiceField(django_filters.fields.ModelChoiceField):
    """A related object by ID in a query parameter: ASCII digits only, within range."""

    def to_python(self, value: object):
        if value in self.empty_values or value == self.null_value:
            return super().to_python(value)
        if parse_object_id(str(value).strip()) is None:
            raise DjangoValidationError(
                self.error_messages["invalid_choice"], code="invalid_choice"
            )
        return super().to_python(value)


class AsciiIntegerFilter(django_filters.NumberFilter):
    field_class = AsciiIntegerFormField


class AsciiModelChoiceFilter(django_filters.ModelChoiceFilter):
    field_class = AsciiModelChoiceField
