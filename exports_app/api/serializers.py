"""API serializers: one per model, named after it. Validation lives here and in the models."""

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied

from exports_app.choices import CertificateKind, ExportState, KeyAlgorithm
from exports_app.constants import MAX_VALIDITY_DAYS
from exports_app.models import Certificate, CertificateAuthority, Export, TLSPolicy, WorkerNode
from exports_app.models.exports import name_digest
from exports_app.services import export_states, exports, workerstatus
from exports_app.services.certificates import NewAuthority, NewCertificate
from exports_app.validators import parse_object_id, parse_size, validate_no_control_characters

from .base import ValidatedModelSerializer, django_errors_to_drf
from .concurrency import READ_WITH_ANSWER
from .fields import AsciiIntegerField, AsciiPrimaryKeyRelatedField, StrictModelSerializer

__all__ = [
    "CertificateAuthoritySerializer",
    "CertificateRevokeSerializer",
    "CertificateSerializer",
    "ExportImportSerializer",
    "ExportSerializer",
    "NodeStatusSerializer",
    "SizeField",
    "StrictCharField",
    "TLSPolicySerializer",
    "WorkerNodeSerializer",
]


@extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string", "example": "10G"}]})
class SizeField(serializers.Field):
    """Bytes, as an integer or a string with a binary unit ("10G", "512M", "1T")."""

    def to_internal_value(self, data: object) -> int:
        try:
            return parse_size(data)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None

    def to_representation(self, value: int) -> int:
        return value


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of converting them."""

    def to_internal_value(self, data: object) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


def default_node() -> WorkerNode | None:
    # With its policy: an export's validation reads it.
    nodes = WorkerNode.objects.select_related("tls_policy")
    node = nodes.filter(name=settings.NBDWORKER_NODE).first()
    return node or nodes.order_by("pk").first()


# -- nodes and policies ------------------------------------------------------------------------


class NodeStatusSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["online", "offline", "unknown"],
        help_text="online while the worker's heartbeat is fresh; unknown if Redis is unreachable.",
    )
    generation_applied = serializers.IntegerField(
        allow_null=True, help_text="The config generation the worker runs."
    )
    generation_published = serializers.IntegerField(
        allow_null=True, help_text="The latest config generation published for the node."
    )
    current = serializers.BooleanField(
        allow_null=True,
        help_text="Whether the worker runs the latest published generation and no change "
        "is waiting to be published.",
    )
    heartbeat = serializers.DictField(
        allow_null=True, help_text="The worker's last heartbeat (version, uptime, sessions...)."
    )


class WorkerNodeSerializer(ValidatedModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="workernode-detail")
    tls_mode = serializers.CharField(
        source="tls_policy.mode", read_only=True, help_text="The TLS mode of the node's policy."
    )
    export_count = serializers.SerializerMethodField(help_text="How many exports the node has.")
    warnings = serializers.SerializerMethodField(
        help_text="Problems of the node's TLS policy; empty when none."
    )
    status = serializers.SerializerMethodField(help_text="What the node's worker reports.")

    class Meta:
        model = WorkerNode
        fields = [
            "id",
            "url",
            "name",
            "description",
            "listen",
            "public_address",
            "storage_root",
            "tls_policy",
            "tls_mode",
            "export_count",
            "warnings",
            "status",
            "created",
            "last_updated",
        ]
        extra_kwargs = {
            "tls_policy": {"required": False, "help_text": "Defaults to the default node's policy."}
        }

    @extend_schema_field(NodeStatusSerializer)
    def get_status(self, node: WorkerNode) -> dict:
        # One Redis round trip for a whole page of nodes, not one per node.
        cache = self.context.setdefault("node_statuses", {})
        if node.name not in cache:
            page = getattr(self.parent, "instance", None) if self.parent is not None else None
            names = {n.name for n in page} if isinstance(page, list | tuple) else set()
            cache.update(workerstatus.node_statuses(sorted(names | {node.name})))
        return cache[node.name]

    def get_export_count(self, node: WorkerNode) -> int:
        # The list view annotates the count; a freshly saved node is counted directly.
        count = getattr(node, "export_count", None)
        return node.exports.count() if count is None else count

    def get_warnings(self, node: WorkerNode) -> list[str]:
        return node.tls_policy.warnings

    def validate(self, attrs: dict) -> dict:
        # The default policy for a new node: the default node's, as most labs have one policy.
        if self.instance is None and "tls_policy" not in attrs:
            node = default_node()
            if node is None:
                raise serializers.ValidationError({"tls_policy": ["This field is required."]})
            attrs["tls_policy"] = node.tls_policy
        return super().validate(attrs)


class TLSPolicySerializer(ValidatedModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="tlspolicy-detail")
    revoked_serials = serializers.SerializerMethodField(
        help_text="Serials of revoked client certificates the policy's nodes refuse."
    )
    warnings = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="Insecure or inconsistent settings; empty when none.",
    )

    class Meta:
        model = TLSPolicy
        fields = [
            "id",
            "url",
            "name",
            "description",
            "mode",
            "server_certificate",
            "trusted_authorities",
            "client_verification",
            "min_tls_version",
            "revoked_serials",
            "nodes",
            "warnings",
            "created",
            "last_updated",
        ]
        read_only_fields = ["nodes"]
        extra_kwargs = {
            "nodes": {"help_text": "IDs of the nodes that use the policy."},
            "mode": {
                "help_text": "NOTLS: plaintext only; OPTIONALTLS: TLS if the client asks "
                "(downgradable); FORCEDTLS: TLS for every client; SELECTIVETLS: TLS for the "
                "exports with tls_required."
            },
            "client_verification": {
                "help_text": "Whether clients must present a certificate from a trusted CA."
            },
            "min_tls_version": {"help_text": "The oldest TLS version the nodes accept."},
        }

    def get_revoked_serials(self, policy: TLSPolicy) -> list[str]:
        return policy.revoked_serials()

    def after_clean(self, instance: TLSPolicy, attrs: dict) -> None:
        if "trusted_authorities" in attrs:
            authorities = list(attrs["trusted_authorities"])
        elif self.instance is not None:
            authorities = list(self.instance.trusted_authorities.all())
        else:
            authorities = []
        try:
            instance.validate_trusted_authorities(authorities)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict) from None


# -- exports -----------------------------------------------------------------------------------


class ExportSerializer(ValidatedModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="export-detail")
    node = AsciiPrimaryKeyRelatedField(
        queryset=WorkerNode.objects.all(),
        required=False,
        help_text="Defaults to the node named by NBDWORKER_NODE.",
    )
    node_name = serializers.CharField(
        source="node.name", read_only=True, help_text="The name of the export's node."
    )
    state = serializers.ChoiceField(
        choices=ExportState.choices,
        read_only=True,
        help_text="provisioning: the image is being made; ready: served; resizing, cloning, "
        "verifying: a job works on the image (it is still served, at its old size while "
        "resizing); failed: the last create or delete failed (see last_error); deleting: the "
        "delete job runs.",
    )
    name = StrictCharField(trim_whitespace=False, help_text="The NBD export name.")
    size = SizeField(
        required=False,
        help_text='Bytes, or a string with a binary unit: "10G", "512M", "1T". Required unless '
        "cloning (a clone defaults to its source's size).",
    )
    force = serializers.BooleanField(
        write_only=True,
        required=False,
        default=False,
        help_text="Allow a shrink (destroys data past the new end).",
    )
    clone_from = serializers.CharField(
        write_only=True,
        required=False,
        help_text="On create: ID or name of a ready export on the same node to copy the image of.",
    )
    job = serializers.SerializerMethodField(help_text="ID of the export's latest job.")
    job_url = serializers.SerializerMethodField(
        help_text="API address of the export's latest job: follow it to see that job end."
    )
    uri = serializers.CharField(
        read_only=True,
        help_text="The NBD URI clients connect to (nbd:// or nbds:// when TLS is needed).",
    )
    absolute_image_path = serializers.CharField(
        read_only=True, help_text="The image file on the node."
    )
    warnings = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="Settings that do not work as one might expect; empty when none.",
    )

    class Meta:
        model = Export
        fields = [
            "id",
            "url",
            "node",
            "node_name",
            "name",
            "description",
            "image_path",
            "absolute_image_path",
            "size",
            "force",
            "clone_from",
            "read_only",
            "enabled",
            "tls_required",
            "allowed_clients",
            "allowed_networks",
            "flush",
            "fua",
            "trim",
            "write_zeroes",
            "fast_zero",
            "cache",
            "multi_conn",
            "min_block_size",
            "preferred_block_size",
            "max_block_size",
            "max_connections",
            "state",
            "last_error",
            "image_imported",
            "job",
            "job_url",
            "uri",
            "warnings",
            "content_sha256",
            "verified_at",
            "created",
            "last_updated",
        ]
        read_only_fields = ["state", "last_error", "content_sha256", "verified_at"]
        # Uniqueness is checked in Export.clean() (per node, by name digest and by image path);
        # DRF's generated UniqueTogetherValidator would make image_path required.
        validators: list = []
        extra_kwargs = {
            "description": {"trim_whitespace": False},
            "read_only": {"help_text": "Clients may only read; writes are refused."},
            "enabled": {"help_text": "Served by the node; a disabled export is not offered."},
            "flush": {"help_text": "Offer NBD_CMD_FLUSH (clients can ask for a flush to disk)."},
            "fua": {"help_text": "Offer forced unit access (a write reaches the disk first)."},
            "trim": {"help_text": "Offer NBD_CMD_TRIM (clients may punch holes)."},
            "write_zeroes": {"help_text": "Offer NBD_CMD_WRITE_ZEROES."},
            "fast_zero": {"help_text": "Offer NBD_CMD_FLAG_FAST_ZERO; needs write_zeroes."},
            "cache": {"help_text": "Offer NBD_CMD_CACHE (read-ahead hints)."},
            "multi_conn": {"help_text": "Tell clients they may open several connections at once."},
            "min_block_size": {"help_text": "Smallest request size clients must use (bytes)."},
            "preferred_block_size": {"help_text": "Request size that performs best (bytes)."},
            "max_block_size": {"help_text": "Largest request payload accepted (bytes)."},
            "last_error": {"help_text": "Why the last job failed; empty after a success."},
            "content_sha256": {"help_text": "SHA-256 of the image's data at the last verify."},
            "verified_at": {"help_text": "When the last verify job hashed the image."},
        }

    def build_instance(self, attrs: dict) -> Export:
        attrs = {k: v for k, v in attrs.items() if k not in ("force", "clone_from")}
        return super().build_instance(attrs)

    def to_representation(self, instance: Export) -> dict:
        # get_job and get_job_url share one lookup of the latest job per answer.
        self._latest_job: dict = {}
        return super().to_representation(instance)

    def get_job(self, export: Export) -> int | None:
        # The queryset's annotation is current when the export was read for this answer (a
        # list, or the viewset's READ_WITH_ANSWER). An export a service has handled since it
        # was read is looked up: its annotation predates the job that service may have asked.
        if hasattr(export, "latest_job_id") and (
            self.parent is not None or self.context.get(READ_WITH_ANSWER)
        ):
            return export.latest_job_id
        memo = getattr(self, "_latest_job", {})
        if export.pk not in memo:
            memo[export.pk] = export.jobs.order_by("-pk").values_list("pk", flat=True).first()
        return memo[export.pk]

    @extend_schema_field(OpenApiTypes.URI)
    def get_job_url(self, export: Export) -> str | None:
        job_id = self.get_job(export)
        if job_id is None:
            return None
        request = self.context.get("request")
        path = f"/api/v1/jobs/{job_id}/"
        return request.build_absolute_uri(path) if request else path

    def _clone_source(self, attrs: dict) -> None:
        """Resolve `clone_from` (ID or name on the target node) and default the size to it."""
        request = self.context.get("request")
        # A clone is a copy of the source's data: it takes the right to see exports.
        if request is not None and not request.user.has_perm("exports_app.view_export"):
            raise PermissionDenied("Cloning an export needs the permission to view exports.")
        value, node = attrs["clone_from"], attrs["node"]
        exports = Export.objects.select_related("node")
        object_id = parse_object_id(value)
        source = exports.filter(pk=object_id).first() if object_id is not None else None
        if source is None:
            source = exports.filter(node=node, name_digest=name_digest(value)).first()
        if source is None:
            raise serializers.ValidationError({"clone_from": [f"No export {value!r} to clone."]})
        if source.node_id != node.pk:
            message = f"The source is on node {source.node.name!r}; clone on that node."
            raise serializers.ValidationError({"clone_from": [message]})
        if source.state not in export_states.SERVED_STATES:
            raise serializers.ValidationError(
                {"clone_from": [f"The source export is {source.state}; it must be ready."]}
            )
        attrs.setdefault("size", source.size)
        if attrs["size"] < source.size:
            raise serializers.ValidationError(
                {"size": [f"A clone cannot be smaller than its source ({source.size} bytes)."]}
            )
        attrs["clone_from"] = source

    def validate(self, attrs: dict) -> dict:
        instance = self.instance
        if instance is None:
            if attrs.get("node") is None:
                node = default_node()
                if node is None:
                    raise serializers.ValidationError({"node": ["No worker node exists."]})
                attrs["node"] = node
            if "clone_from" in attrs:
                self._clone_source(attrs)
        else:
            try:
                export_states.check_changeable(instance)
            except DjangoValidationError as exc:
                raise django_errors_to_drf(exc) from None
            errors = {}
            if "clone_from" in attrs:
                errors["clone_from"] = ["Only when creating an export."]
            if "node" in attrs and attrs["node"] != instance.node:
                errors["node"] = ["An export cannot move to another node."]
            if "image_path" in attrs and attrs["image_path"] != instance.image_path:
                errors["image_path"] = ["The image path cannot change after creation."]
            if errors:
                raise serializers.ValidationError(errors)
            try:
                exports.check_resize(
                    instance, attrs.get("size", instance.size), attrs.get("force", False)
                )
            except DjangoValidationError as exc:
                raise django_errors_to_drf(exc) from None
        return super().validate(attrs)

    def after_clean(self, instance: Export, attrs: dict) -> None:
        # clean() canonicalises these (CIDR, lower-case fingerprints).
        for field in ("allowed_clients", "allowed_networks"):
            if field in attrs:
                attrs[field] = getattr(instance, field)

    def create(self, validated_data: dict) -> Export:
        validated_data.pop("force", None)
        clone_from = validated_data.pop("clone_from", None)
        export = Export(**validated_data)
        exports.create_export(export, clone_from=clone_from)
        return export

    def update(self, instance: Export, validated_data: dict) -> Export:
        force = validated_data.pop("force", False)
        old_size = instance.size
        for field, value in validated_data.items():
            setattr(instance, field, value)
        exports.save_export(instance, old_size, force=force)
        return instance


class ExportImportSerializer(ExportSerializer):
    """POST /api/v1/exports/import/: an export whose image is an existing file under the node's
    storage root. The node's job checks the file (a regular file of `size` bytes, no other
    export's) before it records it as the export's image."""

    image_path = serializers.CharField(
        help_text="The existing file, relative to the node's storage root."
    )
    size = SizeField(help_text="The file's size in bytes (or with a unit); the job checks it.")

    class Meta(ExportSerializer.Meta):
        fields = [f for f in ExportSerializer.Meta.fields if f not in ("force", "clone_from")]

    def create(self, validated_data: dict) -> Export:
        export = Export(**validated_data)
        try:
            exports.import_export(export)
        except DjangoValidationError as exc:  # a file the job would refuse: 400, no job
            raise django_errors_to_drf(exc) from None
        return export


# -- certificates ------------------------------------------------------------------------------


class RenameOnlyUpdateMixin:
    """Key material is immutable once made: an update changes only the name and description."""

    def update(self, instance, validated_data: dict):
        for field in ("name", "description"):
            if field in validated_data:
                setattr(instance, field, validated_data[field])
        instance.save()
        return instance


class CertificateAuthoritySerializer(RenameOnlyUpdateMixin, StrictModelSerializer):
    """POST with `common_name` creates an internal CA; with `certificate_pem` (and optionally
    `private_key_pem`) imports an external one. Only name and description change afterwards."""

    url = serializers.HyperlinkedIdentityField(view_name="certificateauthority-detail")
    common_name = serializers.CharField(
        write_only=True,
        required=False,
        max_length=64,
        validators=[validate_no_control_characters],
        help_text="Creates an internal CA.",
    )
    key_algorithm = serializers.ChoiceField(
        choices=KeyAlgorithm.choices,
        required=False,
        default=KeyAlgorithm.EC_P256,
        help_text="The new CA's key type.",
    )
    validity_days = AsciiIntegerField(
        write_only=True,
        required=False,
        min_value=1,
        max_value=MAX_VALIDITY_DAYS,
        help_text="How long the new CA is valid, in days.",
    )
    certificate_pem = serializers.CharField(
        required=False, trim_whitespace=False, help_text="Imports an external CA certificate."
    )
    private_key_pem = serializers.CharField(
        write_only=True,
        required=False,
        trim_whitespace=False,
        style={"input_type": "password"},
        help_text="The imported CA's key (unencrypted PEM); stored encrypted.",
    )
    has_private_key = serializers.BooleanField(
        read_only=True, help_text="Whether nbdweb holds the CA's key (and can issue)."
    )
    expires_soon = serializers.BooleanField(
        read_only=True, help_text="Expires within NBDWEB_CERT_EXPIRY_WARNING_DAYS."
    )
    certificate_count = serializers.SerializerMethodField(
        help_text="How many certificates the CA issued."
    )

    class Meta:
        model = CertificateAuthority
        fields = [
            "id",
            "url",
            "name",
            "description",
            "common_name",
            "key_algorithm",
            "validity_days",
            "certificate_pem",
            "private_key_pem",
            "subject",
            "serial",
            "fingerprint_sha256",
            "not_before",
            "not_after",
            "is_imported",
            "has_private_key",
            "expires_soon",
            "certificate_count",
            "created",
            "last_updated",
        ]

    _CREATE_ONLY = (
        "common_name",
        "validity_days",
        "certificate_pem",
        "private_key_pem",
        "key_algorithm",
    )

    def get_certificate_count(self, authority: CertificateAuthority) -> int:
        count = getattr(authority, "certificate_count", None)
        return authority.certificates.count() if count is None else count

    def validate(self, attrs: dict) -> dict:
        if self.instance is not None:
            fixed = [k for k in self._CREATE_ONLY if k in self.initial_data]
            if fixed:
                raise serializers.ValidationError(
                    {k: ["Cannot change after creation."] for k in fixed}
                )
            return attrs
        # The admin's add form checks with the same function.
        try:
            NewAuthority.from_input(attrs).check()
        except DjangoValidationError as exc:
            raise django_errors_to_drf(exc) from None
        return attrs

    def create(self, validated_data: dict) -> CertificateAuthority:
        try:
            return NewAuthority.from_input(validated_data).create()
        except DjangoValidationError as exc:
            raise django_errors_to_drf(exc) from None


class CertificateSerializer(RenameOnlyUpdateMixin, StrictModelSerializer):
    """POST with `authority` issues a certificate from that CA; with `certificate_pem` imports
    one (a server certificate needs `private_key_pem`). Only name and description change
    afterwards; revoke with POST …/revoke/."""

    url = serializers.HyperlinkedIdentityField(view_name="certificate-detail")
    name = serializers.CharField(
        required=False,
        max_length=100,
        validators=Certificate._meta.get_field("name").validators,
        help_text="Defaults to <kind>-<common name>-<serial>.",
    )
    kind = serializers.ChoiceField(
        choices=CertificateKind.choices,
        default=CertificateKind.CLIENT,
        help_text="server: a node's certificate; client: an NBD client's.",
    )
    authority = AsciiPrimaryKeyRelatedField(
        queryset=CertificateAuthority.objects.all(),
        required=False,
        allow_null=True,
        help_text="The issuing CA's ID; null for an imported certificate of an unknown CA.",
    )
    common_name = serializers.CharField(
        required=False,
        max_length=64,
        validators=[validate_no_control_characters],
        help_text="The subject's common name (CN).",
    )
    dns_names = serializers.ListField(
        child=serializers.CharField(max_length=253),
        required=False,
        max_length=100,
        help_text="DNS names in the subject alternative name.",
    )
    ip_addresses = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        max_length=100,
        help_text="IP addresses in the subject alternative name.",
    )
    validity_days = AsciiIntegerField(
        write_only=True,
        required=False,
        min_value=1,
        max_value=MAX_VALIDITY_DAYS,
        help_text="How long an issued certificate is valid, in days.",
    )
    key_algorithm = serializers.ChoiceField(
        choices=KeyAlgorithm.choices,
        write_only=True,
        required=False,
        default=KeyAlgorithm.EC_P256,
        help_text="The issued certificate's key type.",
    )
    certificate_pem = serializers.CharField(
        required=False, trim_whitespace=False, help_text="The certificate (PEM); set to import."
    )
    private_key_pem = serializers.CharField(
        write_only=True,
        required=False,
        trim_whitespace=False,
        style={"input_type": "password"},
        help_text="An imported certificate's key (unencrypted PEM); stored encrypted.",
    )
    is_revoked = serializers.BooleanField(read_only=True, help_text="Whether it was revoked.")
    has_private_key = serializers.BooleanField(
        read_only=True, help_text="Whether nbdweb holds the certificate's key."
    )
    expires_soon = serializers.BooleanField(
        read_only=True, help_text="Expires within NBDWEB_CERT_EXPIRY_WARNING_DAYS."
    )
    warnings = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="Problems such as expiry or a revoked issuer; empty when none.",
    )
    bundle_url = serializers.SerializerMethodField(
        help_text="Where to download a client bundle (client certificates with a key only)."
    )

    class Meta:
        model = Certificate
        fields = [
            "id",
            "url",
            "name",
            "description",
            "kind",
            "authority",
            "common_name",
            "dns_names",
            "ip_addresses",
            "validity_days",
            "key_algorithm",
            "certificate_pem",
            "private_key_pem",
            "subject",
            "serial",
            "fingerprint_sha256",
            "not_before",
            "not_after",
            "is_revoked",
            "revoked_at",
            "revocation_reason",
            "has_private_key",
            "expires_soon",
            "warnings",
            "bundle_url",
            "created",
            "last_updated",
        ]
        read_only_fields = ["revoked_at", "revocation_reason"]
        extra_kwargs = {
            "revoked_at": {"help_text": "When it was revoked; null if it is not."},
            "revocation_reason": {"help_text": "Why it was revoked."},
        }

    _CREATE_ONLY = (
        "kind",
        "authority",
        "common_name",
        "dns_names",
        "ip_addresses",
        "validity_days",
        "key_algorithm",
        "certificate_pem",
        "private_key_pem",
    )

    @extend_schema_field(OpenApiTypes.URI)
    def get_bundle_url(self, certificate: Certificate) -> str | None:
        if certificate.kind != CertificateKind.CLIENT or not certificate.has_private_key:
            return None
        request = self.context.get("request")
        path = f"/api/v1/certificates/{certificate.pk}/bundle/"
        return request.build_absolute_uri(path) if request else path

    def validate_name(self, value: str) -> str:
        clash = Certificate.objects.filter(name=value)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError("A certificate with this name already exists.")
        return value

    def validate(self, attrs: dict) -> dict:
        if self.instance is not None:
            fixed = [k for k in self._CREATE_ONLY if k in self.initial_data]
            if fixed:
                raise serializers.ValidationError(
                    {k: ["Cannot change after creation; issue a new certificate."] for k in fixed}
                )
            return attrs
        # The admin's add form checks with the same function.
        try:
            NewCertificate.from_input(attrs).check()
        except DjangoValidationError as exc:
            raise django_errors_to_drf(exc) from None
        return attrs

    def create(self, validated_data: dict) -> Certificate:
        try:
            return NewCertificate.from_input(validated_data).create()
        except DjangoValidationError as exc:
            raise django_errors_to_drf(exc) from None


class CertificateRevokeSerializer(serializers.Serializer):
    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=200,
        default="",
        help_text="Why the certificate is revoked (kept in its record).",
    )
