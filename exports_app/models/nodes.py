"""Worker nodes: one nbdworker process (and one Celery queue) per storage host."""

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce
from simple_history.models import HistoricalRecords

from exports_app.models.exports import Export
from exports_app.validators import (
    parse_listen_address,
    validate_listen_address,
    validate_node_name,
    validate_storage_root,
)

__all__ = ["WorkerNode"]


class WorkerNodeQuerySet(models.QuerySet):
    def with_export_count(self) -> "WorkerNodeQuerySet":
        """`export_count` on each node, as a correlated subquery: counted only for the rows
        fetched (an index count on the export's node), and left out of a paginator's COUNT(*).
        A JOIN with COUNT and GROUP BY aggregated every export of every node on each list
        request, and once more in the paginator's count (issue 19)."""
        per_node = (
            Export.objects.filter(node=OuterRef("pk"))
            .order_by()
            .values("node")
            .annotate(total=Count("pk"))
            .values("total")
        )
        return self.annotate(export_count=Coalesce(Subquery(per_node), 0))


class WorkerNode(models.Model):
    name = models.CharField(
        max_length=63,
        unique=True,
        validators=[validate_node_name],
        help_text="Names the worker's Redis keys and its Celery queue node.<name>.",
    )
    description = models.CharField(max_length=200, blank=True)
    listen = models.CharField(
        max_length=300,
        validators=[validate_listen_address],
        help_text="host:port the worker serves NBD on.",
    )
    public_address = models.CharField(
        max_length=300,
        blank=True,
        validators=[validate_listen_address],
        help_text="host:port clients connect to, when it differs from the listen address "
        "(NAT, 0.0.0.0). Used in export URIs.",
    )
    storage_root = models.CharField(
        max_length=1024,
        validators=[validate_storage_root],
        help_text="Absolute directory on the node under which its images live.",
    )
    tls_policy = models.ForeignKey(
        "exports_app.TLSPolicy", on_delete=models.PROTECT, related_name="nodes"
    )
    created = models.DateTimeField(auto_now_add=True)
    last_updated = models.DateTimeField(auto_now=True)

    history = HistoricalRecords()

    objects = WorkerNodeQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        verbose_name = "worker node"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.pk is None:
            return
        errors = {}
        stored = (
            WorkerNode.objects.filter(pk=self.pk).values_list("storage_root", flat=True).first()
        )
        if stored is not None and stored != self.storage_root and self.exports.exists():
            errors["storage_root"] = (
                "The node has exports; their images live under the current root."
            )
        if (
            self.tls_policy_id
            and not self.tls_policy.enforces_tls_required
            and self.exports.filter(tls_required=True).exists()
        ):
            errors["tls_policy"] = (
                f"The node has exports that require TLS, which a {self.tls_policy.mode} policy "
                "would let clients reach in plaintext; pick a SELECTIVETLS or FORCEDTLS policy."
            )
        if errors:
            raise ValidationError(errors)

    @property
    def client_address(self) -> tuple[str, int]:
        """(host, port) that clients use to reach this node."""
        host, port = parse_listen_address(self.public_address or self.listen)
        if host in ("0.0.0.0", "::"):
            # A wildcard bind is not an address a client can dial; loopback is the honest guess.
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return host, port

    @property
    def celery_queue(self) -> str:
        return f"node.{self.name}"
