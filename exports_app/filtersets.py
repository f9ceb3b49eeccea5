"""django-filter filtersets for the API, one per model."""

import django_filters
from django.db.models import Q, QuerySet

from exports_app.choices import CertificateKind, ExportState, TLSMode
from exports_app.models import Certificate, CertificateAuthority, Export, TLSPolicy, WorkerNode

__all__ = [
    "CertificateAuthorityFilterSet",
    "CertificateFilterSet",
    "ExportFilterSet",
    "TLSPolicyFilterSet",
    "WorkerNodeFilterSet",
]


def _by_id_or_name(queryset: QuerySet, field: str, value: str) -> QuerySet:
    """`?node=3` or `?node=default`: an ID when it is all digits, else a name."""
    condition = Q(**{f"{field}__name": value})
    if value.isdigit():
        condition |= Q(**{f"{field}_id": int(value)})
    return queryset.filter(condition)


class ExportFilterSet(django_filters.FilterSet):
    name = django_filters.CharFilter()
    name__ic = django_filters.CharFilter(field_name="name", lookup_expr="icontains")
    node = django_filters.CharFilter(method="filter_node", help_text="Node ID or name.")
    state = django_filters.MultipleChoiceFilter(choices=ExportState.choices)

    class Meta:
        model = Export
        fields = ["id", "name", "node", "state", "enabled", "read_only", "tls_required"]

    def filter_node(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return _by_id_or_name(queryset, "node", value)


class WorkerNodeFilterSet(django_filters.FilterSet):
    tls_mode = django_filters.MultipleChoiceFilter(
        field_name="tls_policy__mode", choices=TLSMode.choices
    )

    class Meta:
        model = WorkerNode
        fields = ["id", "name", "tls_policy"]


class TLSPolicyFilterSet(django_filters.FilterSet):
    mode = django_filters.MultipleChoiceFilter(choices=TLSMode.choices)

    class Meta:
        model = TLSPolicy
        fields = ["id", "name", "mode", "client_verification"]


class CertificateAuthorityFilterSet(django_filters.FilterSet):
    class Meta:
        model = CertificateAuthority
        fields = ["id", "name", "is_imported", "fingerprint_sha256", "serial"]


class CertificateFilterSet(django_filters.FilterSet):
    kind = django_filters.ChoiceFilter(choices=CertificateKind.choices)
    revoked = django_filters.BooleanFilter(
        field_name="revoked_at", lookup_expr="isnull", exclude=True
    )
    expires_before = django_filters.IsoDateTimeFilter(field_name="not_after", lookup_expr="lt")

    class Meta:
        model = Certificate
        fields = ["id", "name", "kind", "authority", "common_name", "fingerprint_sha256", "serial"]
