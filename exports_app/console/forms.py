"""Form pieces of the console: structured editors for who may connect to an export (instead of
raw JSON), a number box wide enough for block sizes, and help texts shown as written.

The values are checked by the same validators as the model and the API
(`exports_app.validators`); the editors only change how a person enters them.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.utils.html import escape

from exports_app.validators import CLIENT_RULE_KINDS, normalize_client_rules, normalize_networks

__all__ = [
    "ClientRulesField",
    "EscapedHelpTextMixin",
    "NetworksField",
    "WideNumberInput",
]

CLIENT_RULE_LABELS = {
    "common_name": "Common name (CN)",
    "san": "Subject alternative name",
    "fingerprint_sha256": "SHA-256 fingerprint",
}
# Empty rows offered below the existing ones (no script needed to add one).
SPARE_ROWS = 2


class EscapedHelpTextMixin:
    """The admin renders help texts as HTML: escape them, so that "<name>" stays visible."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            if field.help_text:
                field.help_text = escape(field.help_text)


class WideNumberInput(forms.NumberInput):
    """A number box that shows 33554432 whole (the admin's default box is 5 digits wide)."""

    def __init__(self, attrs: dict | None = None) -> None:
        super().__init__({"class": "console-number", **(attrs or {})})


class ClientRulesWidget(forms.Widget):
    """Rows of (identity kind, value); posted as parallel lists `<name>_kind`, `<name>_value`."""

    template_name = "admin/console/widgets/client_rules.html"

    def format_value(self, value: Any) -> list[dict[str, str]]:
        rows = []
        for rule in value if isinstance(value, list) else []:
            if isinstance(rule, dict) and set(rule) == {"kind", "value"}:
                rows.append(rule)  # posted rows, shown again with the form's errors
            elif isinstance(rule, dict) and len(rule) == 1:
                ((kind, text),) = rule.items()
                rows.append({"kind": kind, "value": text})
        return rows

    def get_context(self, name: str, value: Any, attrs: dict | None) -> dict:
        context = super().get_context(name, value, attrs)
        rows = context["widget"]["value"] if isinstance(context["widget"]["value"], list) else []
        context["widget"]["rows"] = [*rows, *({"kind": "", "value": ""} for _ in range(SPARE_ROWS))]
        context["widget"]["kinds"] = [(k, CLIENT_RULE_LABELS.get(k, k)) for k in CLIENT_RULE_KINDS]
        return context

    def value_from_datadict(self, data, files, name: str) -> list[dict[str, str]]:
        kinds = data.getlist(f"{name}_kind") if hasattr(data, "getlist") else []
        values = data.getlist(f"{name}_value") if hasattr(data, "getlist") else []
        rows = []
        for kind, text in zip(kinds, values, strict=False):
            kind, text = kind.strip(), text.strip()
            if kind or text:
                rows.append({"kind": kind, "value": text})
        return rows

    def value_omitted_from_data(self, data, files, name: str) -> bool:
        return f"{name}_kind" not in data


class ClientRulesField(forms.Field):
    """Allowed TLS client identities as rows; empty allows any client."""

    widget = ClientRulesWidget

    def prepare_value(self, value: Any) -> Any:
        return value

    def to_python(self, value: Any) -> list[dict[str, str]]:
        if not value:
            return []
        rules = []
        for number, row in enumerate(value, start=1):
            if isinstance(row, dict) and set(row) == {"kind", "value"}:
                if not row["kind"] or not row["value"]:
                    raise ValidationError(f"Row {number}: choose a kind and give a value.")
                rules.append({row["kind"]: row["value"]})
            else:
                rules.append(row)  # already in the stored shape (initial data)
        try:
            return normalize_client_rules(rules)
        except ValidationError as exc:
            raise ValidationError([m.replace("Item ", "Row ") for m in exc.messages]) from None


class NetworksTextarea(forms.Textarea):
    def format_value(self, value: Any) -> str:
        if isinstance(value, list):
            return "\n".join(str(v) for v in value)
        return super().format_value(value) or ""


class NetworksField(forms.CharField):
    """Allowed client networks, one CIDR per line, each checked; empty allows any address."""

    widget = NetworksTextarea

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("strip", False)
        super().__init__(**kwargs)
        self.widget.attrs.update({"rows": 4, "placeholder": "e.g. 10.0.0.0/8"})

    def prepare_value(self, value: Any) -> Any:
        return value

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, list):
            return normalize_networks(value)
        lines = [line.strip() for line in str(value or "").splitlines()]
        errors, networks = [], []
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                networks.extend(normalize_networks([line]))
            except ValidationError as exc:
                errors.append(
                    f"Line {number} ({line[:50]!r}): {exc.messages[0].split(': ', 1)[-1]}"
                )
        if errors:
            raise ValidationError(errors)
        return networks
