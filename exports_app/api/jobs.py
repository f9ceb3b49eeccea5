"""The jobs API: /api/v1/jobs/ (list, filter, detail, retry) and the export actions that
request jobs (POST /api/v1/exports/{id}/resize/ and /verify/)."""

import django_filters
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.viewsets import ReadOnlyModelViewSet

from exports_app.choices import JobKind, JobState
from exports_app.filtersets import NBDWebFilterSet, _by_id_or_name
from exports_app.models import Job
from exports_app.services import exports, provisioning

from .base import Conflict, django_errors_to_drf
from .concurrency import ETagMixin, IdempotentPostsMixin
from .fields import AsciiIntegerFilter, StrictModelSerializer
from .serializers import ExportImportSerializer, ExportSerializer, SizeField

__all__ = [
    "ExportJobActions",
    "ExportResizeSerializer",
    "JobFilterSet",
    "JobSerializer",
    "JobViewSet",
    "parse_bool_param",
]


def parse_bool_param(request, name: str) -> bool:
    """A boolean query parameter (`?wipe=true`); anything but true/false is a 400 naming it."""
    value = request.query_params.get(name)
    if value is None or value == "":
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValidationError({name: ["Must be true or false."]})


class JobFilterSet(NBDWebFilterSet):
    export = AsciiIntegerFilter(field_name="export_id", help_text="Export ID.")
    export_name = django_filters.CharFilter()
    node = django_filters.CharFilter(method="filter_node", help_text="Node ID or name.")
    state = django_filters.MultipleChoiceFilter(choices=JobState.choices)
    kind = django_filters.MultipleChoiceFilter(choices=JobKind.choices)

    class Meta:
        model = Job
        fields = ["id", "export", "export_name", "node", "state", "kind"]

    def filter_node(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return _by_id_or_name(queryset, "node", value)


class JobSerializer(StrictModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="job-detail")
    export_url = serializers.HyperlinkedRelatedField(
        source="export",
        view_name="export-detail",
        read_only=True,
        help_text="API address of the export; null once the export is deleted.",
    )
    node_name = serializers.CharField(
        source="node.name", read_only=True, help_text="The name of the node that runs the job."
    )
    kind = serializers.ChoiceField(
        choices=JobKind.choices, read_only=True, help_text="What the job does to the image."
    )
    state = serializers.ChoiceField(
        choices=JobState.choices,
        read_only=True,
        help_text="queued, then running, then succeeded or failed.",
    )
    requested_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, help_text="Who asked for the job."
    )

    class Meta:
        model = Job
        fields = [
            "id",
            "url",
            "kind",
            "export",
            "export_url",
            "export_name",
            "node",
            "node_name",
            "state",
            "progress",
            "error",
            "params",
            "celery_task_id",
            "requested_by",
            "created",
            "started",
            "finished",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "export": {"help_text": "The export's ID; null once the export is deleted."},
            "export_name": {"help_text": "The export's name when the job was requested."},
            "node": {"help_text": "The ID of the node that runs the job."},
            "progress": {"help_text": "Percent done; 100 once succeeded."},
            "error": {"help_text": "Why the job failed; empty otherwise."},
            "params": {"help_text": "What the job was asked to do (e.g. the new size)."},
            "celery_task_id": {"help_text": "The ID of the job's task in the queue."},
            "started": {"help_text": "When a worker started the job; null while queued."},
            "finished": {"help_text": "When the job ended; null until then."},
        }


class JobViewSet(IdempotentPostsMixin, ETagMixin, ReadOnlyModelViewSet):
    queryset = Job.objects.select_related("node", "requested_by")
    serializer_class = JobSerializer
    filterset_class = JobFilterSet
    action_permissions = {"retry": ["exports_app.view_job", "exports_app.retry_job"]}

    @extend_schema(request=None, responses={202: JobSerializer})
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None) -> Response:
        """Request a failed job's work again (as a new job); every job is safe to repeat."""
        job = self.get_object()
        with transaction.atomic():
            try:
                new_job = provisioning.retry_job(job)
            except provisioning.JobRefused as exc:
                # The job's state forbids it (not failed, or not the export's latest).
                raise Conflict(str(exc)) from None
        return Response(self.get_serializer(new_job).data, status=status.HTTP_202_ACCEPTED)


class ExportResizeSerializer(serializers.Serializer):
    size = SizeField(help_text='The new size: bytes, or "20G", "512M", "1T".')
    force = serializers.BooleanField(
        required=False, default=False, help_text="Allow a shrink (destroys data past the end)."
    )


class ExportJobActions:
    # Mixed into ExportViewSet: the actions that only request a job.

    action_permissions = {
        "resize": ["exports_app.view_export", "exports_app.change_export"],
        "verify": ["exports_app.view_export", "exports_app.change_export"],
        # Taking over a file nbdweb did not make is its own right, beyond adding exports.
        "import_image": [
            "exports_app.view_export",
            "exports_app.add_export",
            "exports_app.import_export",
        ],
    }

    @extend_schema(
        request=ExportImportSerializer,
        responses={
            202: OpenApiResponse(
                ExportSerializer, "The export; its `job` checks and takes over the file."
            )
        },
    )
    @action(detail=False, methods=["post"], url_path="import", url_name="import")
    def import_image(self, request) -> Response:
        """Make an existing image file under the node's storage root an export."""
        body = ExportImportSerializer(data=request.data, context=self.get_serializer_context())
        body.is_valid(raise_exception=True)
        self.perform_create(body)
        return self._accepted(body.instance.pk)

    @extend_schema(
        request=ExportResizeSerializer,
        examples=[
            OpenApiExample("Grow to 20 GiB", value={"size": "20G"}, request_only=True),
            OpenApiExample(
                "Shrink (destroys the data past the end)",
                value={"size": "5G", "force": True},
                request_only=True,
            ),
        ],
        responses={202: OpenApiResponse(ExportSerializer, "The export; its `job` resizes it.")},
    )
    @action(detail=True, methods=["post"])
    def resize(self, request, pk=None) -> Response:
        """Resize the export's image. Answers at once with the export in state `resizing` and
        its `job`; `size` becomes the new size when the job has succeeded. A shrink needs
        `force` and no live session."""
        export = self.get_object()
        body = ExportResizeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        # The admin's resize action calls the same function: one set of rules for a resize.
        try:
            exports.resize_export(export, body.validated_data["size"], body.validated_data["force"])
        except DjangoValidationError as exc:
            raise django_errors_to_drf(exc) from None
        return self._accepted(export.pk)

    @extend_schema(
        request=None,
        responses={202: OpenApiResponse(ExportSerializer, "The export; its `job` hashes it.")},
    )
    @action(detail=True, methods=["post"])
    def verify(self, request, pk=None) -> Response:
        """Hash the image's data (SHA-256) into `content_sha256`. Answers at once with the
        export in state `verifying` and its `job`."""
        export = self.get_object()
        with transaction.atomic():
            try:
                provisioning.request_verify(export)
            except DjangoValidationError as exc:
                raise django_errors_to_drf(exc) from None
        return self._accepted(export.pk)

    def _accepted(self, pk: int) -> Response:
        # Read after the job was requested and serialized once: the body is what a GET reads
        # next, and its ETag (finalize_response) that body's.
        export = self.get_queryset().get(pk=pk)
        response = Response(self.representation_of_read(export), status=status.HTTP_202_ACCEPTED)
        response.etag_of_body = True
        return response
