"""API viewsets: thin, one per model. Validation is in the serializers, side effects in
exports_app.services."""

from django.db import transaction
from django.db.models import Count, OuterRef, Subquery
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
)
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from exports_app import filtersets
from exports_app.models import (
    Certificate,
    CertificateAuthority,
    Export,
    Job,
    TLSPolicy,
    WorkerNode,
)
from exports_app.services import bundles, ca, provisioning
from exports_app.validators import parse_object_id

from . import serializers
from .base import BaseModelViewSet
from .jobs import ExportJobActions, parse_bool_param

__all__ = [
    "CertificateAuthorityViewSet",
    "CertificateViewSet",
    "ExportViewSet",
    "TLSPolicyViewSet",
    "WorkerNodeViewSet",
]


class WorkerNodeViewSet(BaseModelViewSet):
    queryset = WorkerNode.objects.select_related(
        "tls_policy__server_certificate"
    ).with_export_count()
    serializer_class = serializers.WorkerNodeSerializer
    filterset_class = filtersets.WorkerNodeFilterSet
    # What the worker reports changes every heartbeat; the node's version is its settings.
    etag_ignored_fields = ("status",)


class TLSPolicyViewSet(BaseModelViewSet):
    queryset = TLSPolicy.objects.select_related("server_certificate").prefetch_related(
        "trusted_authorities", "nodes"
    )
    serializer_class = serializers.TLSPolicySerializer
    filterset_class = filtersets.TLSPolicyFilterSet


class ExportViewSet(ExportJobActions, BaseModelViewSet):
    queryset = Export.objects.select_related("node__tls_policy__server_certificate").annotate(
        latest_job_id=Subquery(
            Job.objects.filter(export=OuterRef("pk")).order_by("-pk").values("pk")[:1]
        )
    )
    serializer_class = serializers.ExportSerializer
    filterset_class = filtersets.ExportFilterSet

    @extend_schema(
        description="Create an export. Answers at once with the export in state `provisioning` "
        "(or `cloning` with `clone_from`) and its `job`, which makes the image; the export is "
        "`ready` when the job has succeeded.",
        examples=[
            OpenApiExample(
                "An empty 10 GiB disk", value={"name": "vm1-disk", "size": "10G"}, request_only=True
            ),
            OpenApiExample(
                "A copy of another export",
                value={"name": "vm2-disk", "clone_from": "golden-image"},
                request_only=True,
            ),
        ],
    )
    def create(self, request, *args, **kwargs) -> Response:
        return super().create(request, *args, **kwargs)

    @extend_schema(
        description="Delete the export: its image is removed (zeroed first with `wipe`) by a "
        "job, then the export. Answers 202 with the export in state `deleting` while the job "
        "runs. Send If-Match with the ETag you read to delete only that version.",
        parameters=[
            OpenApiParameter(
                "wipe", OpenApiTypes.BOOL, description="Zero the image's data before removing it."
            )
        ],
        responses={
            204: OpenApiResponse(description="Deleted."),
            202: OpenApiResponse(serializers.ExportSerializer, "Deletion continues in a job."),
        },
    )
    def destroy(self, request, *args, **kwargs) -> Response:
        with transaction.atomic():
            # get_object checks If-Match on the locked row.
            export = self.get_object()
            pk = export.pk
            self.perform_destroy(export)
        # The hook either deleted the row or left it in DELETING for a job to finish.
        export = Export.objects.filter(pk=pk).first()
        if export is not None:
            return Response(self.get_serializer(export).data, status=status.HTTP_202_ACCEPTED)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def destroy_object(self, instance: Export) -> None:
        # ?wipe=true zeroes the image's data before it is removed; the plain call otherwise
        # keeps the hook's one-argument contract.
        if parse_bool_param(self.request, "wipe"):
            provisioning.request_delete(instance, wipe=True)
        else:
            provisioning.request_delete(instance)


class CertificateAuthorityViewSet(BaseModelViewSet):
    queryset = CertificateAuthority.objects.annotate(certificate_count=Count("certificates"))
    serializer_class = serializers.CertificateAuthoritySerializer
    filterset_class = filtersets.CertificateAuthorityFilterSet


class CertificateViewSet(BaseModelViewSet):
    queryset = Certificate.objects.select_related("authority")
    serializer_class = serializers.CertificateSerializer
    filterset_class = filtersets.CertificateFilterSet
    action_permissions = {
        "bundle": ["exports_app.view_certificate", "exports_app.download_certificate_bundle"],
        "revoke": ["exports_app.view_certificate", "exports_app.revoke_certificate"],
    }

    @extend_schema(
        request=serializers.CertificateRevokeSerializer,
        responses=serializers.CertificateSerializer,
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None) -> Response:
        """Revoke the certificate: the nodes refuse it from their next configuration on."""
        certificate = self.get_object()
        body = serializers.CertificateRevokeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        ca.revoke_certificate(certificate, body.validated_data["reason"])
        return Response(self.get_serializer(certificate).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("export", OpenApiTypes.INT, description="Export for the README."),
            OpenApiParameter("node", OpenApiTypes.INT, description="Node for the README."),
        ],
        responses={(200, "application/gzip"): OpenApiTypes.BINARY},
    )
    @action(detail=True, methods=["get"])
    def bundle(self, request, pk=None) -> HttpResponse:
        """A .tar.gz with ca-cert.pem, client-cert.pem, client-key.pem and a README."""
        certificate = self.get_object()
        export = self._lookup_param(request, "export", Export)
        node = self._lookup_param(request, "node", WorkerNode)
        try:
            data = bundles.build_client_bundle(certificate, node=node, export=export)
        except bundles.BundleError as exc:
            raise ValidationError({"non_field_errors": [str(exc)]}) from None
        return bundles.bundle_download(certificate, data)

    @staticmethod
    def _lookup_param(request, name: str, model):
        value = request.query_params.get(name)
        if value in (None, ""):
            return None
        object_id = parse_object_id(value)
        if object_id is None:
            raise ValidationError({name: ["Must be an ID (ASCII digits)."]})
        found = model.objects.filter(pk=object_id).first()
        if found is None:
            raise ValidationError({name: [f"No {model._meta.verbose_name} with ID {value}."]})
        return found
