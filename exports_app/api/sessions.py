"""`/api/v1/sessions/`: the live NBD sessions the workers report, and ending one.

Sessions are not database rows: they are read from Redis (exports_app.services.workerstatus).
Listing needs `exports_app.view_export`, ending one `exports_app.change_export` (it takes an
export away from a client, as disabling the export would).
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, NotFound
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.response import Response
from rest_framework.viewsets import ViewSet

from exports_app.models import WorkerNode
from exports_app.services import workerstatus
from exports_app.validators import parse_object_id

__all__ = ["SessionPermissions", "SessionSerializer", "SessionViewSet"]


def _by_id_or_name(nodes, value: str):
    object_id = parse_object_id(value)
    return nodes.filter(pk=object_id) if object_id is not None else nodes.filter(name=value)


class StatusUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Redis is unreachable: the workers' sessions are unknown."
    default_code = "unavailable"


class SessionPermissions(BasePermission):
    perms_map = {
        "GET": ["exports_app.view_export"],
        "HEAD": ["exports_app.view_export"],
        "OPTIONS": ["exports_app.view_export"],
        "DELETE": ["exports_app.view_export", "exports_app.change_export"],
    }

    def has_permission(self, request, view) -> bool:
        # False for an anonymous user makes DRF answer 401 (TokenAuthentication), else 403.
        if not IsAuthenticated().has_permission(request, view):
            return False
        perms = self.perms_map.get(request.method)
        return perms is not None and request.user.has_perms(perms)


class ClientIdentitySerializer(serializers.Serializer):
    """The certificate a TLS client presented."""

    common_names = serializers.ListField(
        child=serializers.CharField(), help_text="The subject's common names."
    )
    serial = serializers.CharField(help_text="Serial number, lower-case hex.")
    fingerprint_sha256 = serializers.CharField(help_text="SHA-256 of the DER, lower-case hex.")


class SessionSerializer(serializers.Serializer):
    """A client connected to an export."""

    id = serializers.CharField(help_text="The session's ID (hex), unique on its node.")
    node = serializers.CharField(help_text="The name of the node serving the session.")
    client = serializers.CharField(help_text="The client's address and port.")
    export = serializers.CharField(help_text="The export's name.")
    tls = serializers.BooleanField(help_text="Whether the session uses TLS.")
    client_identity = ClientIdentitySerializer(
        allow_null=True, help_text="The client certificate, when one was presented."
    )
    reads = serializers.IntegerField(help_text="Read requests served.")
    bytes_read = serializers.IntegerField(help_text="Bytes sent to the client.")
    writes = serializers.IntegerField(help_text="Write requests served.")
    bytes_written = serializers.IntegerField(help_text="Bytes written by the client.")
    requests = serializers.IntegerField(help_text="All requests served.")
    connected_since = serializers.DateTimeField(help_text="When the client connected.")


# The page is itself the list answer: not wrapped in an array of pages.
@extend_schema_serializer(many=False)
class SessionPageSerializer(serializers.Serializer):
    """A page of sessions, and the nodes whose sessions are unknown."""

    count = serializers.IntegerField(help_text="How many sessions match, in all pages.")
    next = serializers.URLField(
        allow_null=True, help_text="The next page's address; null on the last page."
    )
    previous = serializers.URLField(
        allow_null=True, help_text="The previous page's address; null on the first page."
    )
    results = SessionSerializer(many=True, help_text="This page's sessions.")
    unknown_nodes = serializers.ListField(
        child=serializers.CharField(),
        help_text="Nodes whose worker is offline (no heartbeat): their sessions are unknown "
        "and not listed. Empty when every node answered.",
    )


class SessionViewSet(ViewSet):
    permission_classes = [SessionPermissions]
    serializer_class = SessionSerializer
    lookup_value_regex = "[0-9a-f]{1,64}"

    def _node_names(self, node: str | None = None) -> list[str]:
        nodes = WorkerNode.objects.order_by("name")
        if node:
            nodes = _by_id_or_name(nodes, node)
        return list(nodes.values_list("name", flat=True))

    @extend_schema(
        parameters=[
            OpenApiParameter("node", OpenApiTypes.STR, description="Node name or ID."),
            OpenApiParameter("export", OpenApiTypes.STR, description="Export name."),
            OpenApiParameter("limit", OpenApiTypes.INT, description="Sessions per page."),
            OpenApiParameter("offset", OpenApiTypes.INT, description="Sessions to skip."),
        ],
        responses=SessionPageSerializer,
    )
    def list(self, request) -> Response:
        """The live NBD sessions, oldest first, paginated like every list. A node whose worker
        is offline is named in `unknown_nodes`: its sessions are unknown, not none."""
        names = self._node_names(request.query_params.get("node"))
        try:
            unknown = workerstatus.offline_nodes(names)
            sessions = workerstatus.list_sessions([n for n in names if n not in unknown])
        except workerstatus.StatusUnavailable:
            raise StatusUnavailable() from None
        export = request.query_params.get("export")
        if export is not None:
            sessions = [s for s in sessions if s.get("export") == export]
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(sessions, request, view=self)
        response = paginator.get_paginated_response(SessionSerializer(page, many=True).data)
        response.data["unknown_nodes"] = unknown
        return response

    @extend_schema(responses={202: None})
    def destroy(self, request, pk: str | None = None) -> Response:
        """End the session: the worker answers the requests in flight, then closes it."""
        try:
            session = workerstatus.find_session(str(pk), self._node_names())
            if session is None:
                raise NotFound("No live session with this ID.")
            workerstatus.end_session(session, request.user)
        except workerstatus.StatusUnavailable:
            raise StatusUnavailable() from None
        return Response(status=status.HTTP_202_ACCEPTED)
