"""django-filter filtersets for the API, one per model."""

import django_filters
from django.db import models
from django.db.models import Q, QuerySet
from django_filters.filterset import FILTER_FOR_DBFIELD_DEFAULTS

from exports_app.api.fields import AsciiIntegerFilter, AsciiModelChoiceFilter
from exports_app.choices import CertificateKind, ExportState, TLSMode
from exports_app.models import Certificate, CertificateAuthority, Export, TLSPolicy, WorkerNode
from exports_app.validators import parse_object_id

__all__ = [
    "CertificateAuthorityFilterSet",
    "CertificateFilterSet",
    "ExportFilterSet",
    "NBDWebFilterSet",
    "TLSPolicyFilterSet",
    "WorkerNodeFilterSet",
]


def _by_id_or_name(queryset: QuerySet, field: str, value: str) -> QuerySet:
    """`?node=3` or `?node=default`: an ID when it is ASCII digits in range, else a name."""
    condition = Q(**{f"{field}__name": value})
    object_id = parse_object_id(value)
    if object_id is not None:
        condition |= Q(**{f"{field}_id": object_id})
    return queryset.filter(condition)


_RELATED_FILTER = {
    "filter_class": AsciiModelChoiceFilter,
    "extra": FILTER_FOR_DBFIELD_DEFAULTS[models.ForeignKey]["extra"],
}


class NBDWebFilterSet(django_filters.FilterSet):
    """The base of the API's filter sets: integer and relation filters read ASCII digits only
    (exports_app.api.fields), so `?id=١٢` or a 30-digit ID is a 400 naming the parameter."""

    FILTER_DEFAULTS = {
        **FILTER_FOR_DBFIELD_DEFAULTS,
        models.AutoField: {"filter_class": AsciiIntegerFilter},
        models.IntegerField: {"filter_class": AsciiIntegerFilter},
        models.SmallIntegerField: {"filter_class": AsciiIntegerFilter},
        models.PositiveIntegerField: {"filter_class": AsciiIntegerFilter},
        models.PositiveSmallIntegerField: {"filter_class": AsciiIntegerFilter},
        models.ForeignKey: _RELATED_FILTER,
        models.OneToOneField: _RELATED_FILTER,
    }


class ExportFilterSet(NBDWebFilterSet):
    name = django_filters.CharFilter()
    name__ic = django_filters.CharFilter(field_name="name", lookup_expr="icontains")
    node = django_filters.CharFilter(method="filter_node", help_text="Node ID or name.")
    state = django_filters.MultipleChoiceFilter(choices=ExportState.choices)

    class Meta:
        model = Export
        fields = ["id", "name", "node", "state", "enabled", "read_only", "tls_required"]

    def filter_node(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return _by_id_or_name(queryset, "node", value)


class WorkerNodeFilterSet(NBDWebFilterSet):
    tls_mode = django_filters.MultipleChoiceFilter(
        field_name="tls_policy__mode", choices=TLSMode.choices
    )

    class Meta:
        model = WorkerNode
        fields = ["id", "name", "tls_policy"]


class TLSPolicyFilterSet(NBDWebFilterSet):
    mode = django_filters.MultipleChoiceFilter(choices=TLSMode.choices)

    class Meta:
        model = TLSPolicy
        fields = ["id", "name", "mode", "client_verification"]


class CertificateAuthorityFilterSet(NBDWebFilterSet):
    class Meta:
        model = CertificateAuthority
        fields = ["id", "name", "is_imported", "fingerprint_sha256", "serial"]


class CertificateFilterSet(NBDWebFilterSet):
    kind = django_filters.ChoiceFilter(choices=CertificateKind.choices)
    revoked = django_filters.BooleanFilter(
        field_name="revoked_at", lookup_expr="isnull", exclude=True
    )
    expires_before = django_filters.IsoDateTimeFilter(field_name="not_after", lookup_expr="lt")

    class Meta:
        model = Certificate
        fields = ["id", "name", "kind", "authority", "common_name", "fingerprint_sha256", "serial"]
