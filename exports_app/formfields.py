"""Form fields shared by the API's filters, the admin and the console: numbers are ASCII only.

Django's IntegerField reads a number with int(), which also takes Arabic-Indic, full-width and
other Unicode digits ("١٢" is 12). Every integer the web side reads from a form goes through
`AsciiIntegerFormField` (exports_app.validators.parse_ascii_int, as the API's serializers do):
the API's filter sets use it, the admin maps every integer model field to it
(`ASCII_NUMBER_OVERRIDES`, `formfield_overrides`), and ModelForms used outside the admin get it
from `ascii_formfield`.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db import models

from exports_app.validators import MAX_OBJECT_ID, parse_ascii_int

__all__ = ["ASCII_NUMBER_OVERRIDES", "AsciiIntegerFormField", "ascii_formfield"]


class AsciiIntegerFormField(forms.IntegerField):
    default_error_messages = {"invalid": "Enter a whole number in ASCII digits."}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_value", MAX_OBJECT_ID)
        kwargs.setdefault("min_value", -MAX_OBJECT_ID - 1)
        super().__init__(**kwargs)

    def to_python(self, value: object) -> int | None:
        if value in self.empty_values:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = parse_ascii_int(str(value).strip())
        if number is None:
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return number


_INTEGER_MODEL_FIELDS = (
    models.IntegerField,
    models.BigIntegerField,
    models.SmallIntegerField,
    models.PositiveIntegerField,
    models.PositiveSmallIntegerField,
    models.PositiveBigIntegerField,
)

# For ModelAdmin.formfield_overrides.
ASCII_NUMBER_OVERRIDES: dict[type[models.Field], dict[str, Any]] = {
    field: {"form_class": AsciiIntegerFormField} for field in _INTEGER_MODEL_FIELDS
}


def ascii_formfield(db_field: models.Field, **kwargs: Any) -> forms.Field | None:
    """A ModelForm's `formfield_callback`: integer model fields read ASCII digits only."""
    if isinstance(db_field, _INTEGER_MODEL_FIELDS) and not db_field.choices:
        kwargs.setdefault("form_class", AsciiIntegerFormField)
    return db_field.formfield(**kwargs)
