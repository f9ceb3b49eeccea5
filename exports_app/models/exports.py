"""NBD exports: a named image on a node and the rules for serving it."""

import hashlib
import itertools
import os
from urllib.parse import quote

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils.text import slugify
from simple_history.models import HistoricalRecords

from exports_app.choices import ExportState, TLSMode
from exports_app.constants import (
    DEFAULT_MAX_BLOCK_SIZE,
    DEFAULT_MIN_BLOCK_SIZE,
    DEFAULT_PREFERRED_BLOCK_SIZE,
    MAX_EXPORT_SIZE,
    MAX_IMAGE_PATH_BYTES,
    MAX_MIN_BLOCK_SIZE,
    MAX_PAYLOAD,
    SECTOR_SIZE,
)
from exports_app.validators import (
    normalize_client_rules,
    normalize_networks,
    resolve_image_path,
    validate_description,
    validate_nbd_name,
)

__all__ = ["Export", "name_digest"]


def name_digest(name: str) -> str:
    """SHA-256 of the name: the unique index uses it because 4 KiB names overflow a btree row."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Export(models.Model):
    node = models.ForeignKey(
        "exports_app.WorkerNode", on_delete=models.PROTECT, related_name="exports"
    )
    name = models.TextField(validators=[validate_nbd_name], help_text="The NBD export name.")
    name_digest = models.CharField(max_length=64, editable=False)
    description = models.TextField(blank=True, validators=[validate_description])
    image_path = models.CharField(
        max_length=MAX_IMAGE_PATH_BYTES,
        blank=True,
        help_text="Image file relative to the node's storage root; default <name>.img.",
    )
    size = models.BigIntegerField(
        validators=[MinValueValidator(SECTOR_SIZE), MaxValueValidator(MAX_EXPORT_SIZE)],
        help_text="Bytes; a multiple of 512.",
    )
    read_only = models.BooleanField(default=False)
    enabled = models.BooleanField(default=True)
    tls_required = models.BooleanField(
        default=False, help_text="Serve only over TLS (SELECTIVETLS; implied by FORCEDTLS)."
    )
    allowed_clients = models.JSONField(
        default=list,
        blank=True,
        help_text='TLS client identities allowed, e.g. [{"common_name": "alice"}, '
        '{"fingerprint_sha256": "..."}, {"san": "host.example"}]; empty allows any.',
    )
    allowed_networks = models.JSONField(
        default=list,
        blank=True,
        help_text='Client networks allowed, e.g. ["10.0.0.0/8"]; empty allows any.',
    )
    flush = models.BooleanField(default=True)
    fua = models.BooleanField(default=True, verbose_name="FUA")
    trim = models.BooleanField(default=True)
    write_zeroes = models.BooleanField(default=True)
    fast_zero = models.BooleanField(default=True)
    cache = models.BooleanField(default=True)
    multi_conn = models.BooleanField(default=True)
    min_block_size = models.PositiveIntegerField(default=DEFAULT_MIN_BLOCK_SIZE)
    preferred_block_size = models.PositiveIntegerField(default=DEFAULT_PREFERRED_BLOCK_SIZE)
    max_block_size = models.PositiveIntegerField(default=DEFAULT_MAX_BLOCK_SIZE)
    max_connections = models.PositiveIntegerField(default=0, help_text="0 means no limit.")
    state = models.CharField(
        max_length=16, choices=ExportState.choices, default=ExportState.PROVISIONING, editable=False
    )
    last_error = models.TextField(blank=True, editable=False)
    # The image file's device:inode, recorded by the job that created it (or by an explicit
    # import): jobs open, change and remove only that file (exports_app.services.images).
    image_identity = models.CharField(max_length=64, blank=True, editable=False)
    image_imported = models.BooleanField(
        default=False,
        editable=False,
        help_text="The image existed before the export; deleting without wipe leaves it.",
    )
    # Filled by the verify job (issue 7).
    content_sha256 = models.CharField(max_length=64, blank=True, editable=False)
    verified_at = models.DateTimeField(null=True, blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    last_updated = models.DateTimeField(auto_now=True)

    history = HistoricalRecords(excluded_fields=["name_digest"])

    class Meta:
        ordering = ["node", "name"]
        permissions = [("import_export", "Can import an existing image as an export")]
        constraints = [
            models.UniqueConstraint(
                fields=["node", "name_digest"], name="export_unique_name_per_node"
            ),
            models.UniqueConstraint(
                fields=["node", "image_path"], name="export_unique_image_per_node"
            ),
        ]

    def __str__(self) -> str:
        return self.name if len(self.name) <= 80 else self.name[:77] + "..."

    def save(self, *args, **kwargs) -> None:
        self.name_digest = name_digest(self.name)
        if not self.image_path and self.node_id:
            self.image_path = self.default_image_path()
        super().save(*args, **kwargs)

    # -- derived values ------------------------------------------------------------------------

    @property
    def absolute_image_path(self) -> str:
        """The image file on the node (what the worker opens and the jobs create)."""
        return os.path.join(self.node.storage_root, self.image_path)

    @property
    def needs_tls(self) -> bool:
        return self.node.tls_policy.export_needs_tls(self.tls_required)

    @property
    def uri(self) -> str:
        """An NBD URI (nbd:// or nbds://) that qemu and libnbd accept."""
        host, port = self.node.client_address
        if ":" in host:
            host = f"[{host}]"
        scheme = "nbds" if self.needs_tls else "nbd"
        return f"{scheme}://{host}:{port}/{quote(self.name, safe='')}"

    @property
    def warnings(self) -> list[str]:
        policy = self.node.tls_policy
        found = list(policy.warnings) if policy.mode == TLSMode.OPTIONALTLS else []
        if self.allowed_clients and not policy.uses_tls:
            found.append("allowed_clients has no effect without TLS (the policy is NOTLS).")
        if self.tls_required and not policy.enforces_tls_required:
            # Only an export saved before clean() refused this combination: say why it is gone.
            found.append(
                f"tls_required under a {policy.mode} policy: the worker refuses to serve this "
                "export. Use SELECTIVETLS or FORCEDTLS for the node, or clear tls_required."
            )
        return found

    def default_image_path(self) -> str:
        """`<slug>.img`, with a numeric suffix when another export on the node already uses it."""
        base = slugify(self.name)[:100] or "export"
        # Candidates are asked for by equality, a batch at a time (the node's unique index
        # answers): a prefix LIKE cannot use that index and read every image path of the node.
        batch = 32
        for first in itertools.count(1, batch):
            candidates = [
                f"{base}.img" if n == 1 else f"{base}-{n}.img" for n in range(first, first + batch)
            ]
            taken = set(
                Export.objects.filter(node_id=self.node_id, image_path__in=candidates)
                .exclude(pk=self.pk)
                .order_by()  # no join for the default ordering
                .values_list("image_path", flat=True)
            )
            for candidate in candidates:
                if candidate not in taken:
                    return candidate
        raise AssertionError("unreachable")

    # -- validation ----------------------------------------------------------------------------

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}

        def fail(field: str, message: str) -> None:
            errors.setdefault(field, []).append(message)

        node = self.node if self.node_id else None
        if node is not None:
            if (
                self.name
                and Export.objects.filter(node=node, name_digest=name_digest(self.name))
                .exclude(pk=self.pk)
                .exists()
            ):
                fail("name", f"An export with this name already exists on node {node.name!r}.")
            if self.image_path:
                try:
                    resolve_image_path(node.storage_root, self.image_path)
                except ValidationError as exc:
                    fail("image_path", exc.messages[0])
                else:
                    if (
                        Export.objects.filter(node=node, image_path=self.image_path)
                        .exclude(pk=self.pk)
                        .exists()
                    ):
                        fail("image_path", "Another export on this node uses this image.")
            policy = node.tls_policy
            if self.tls_required and not policy.enforces_tls_required:
                fail(
                    "tls_required",
                    f"Node {node.name!r} uses the {policy.mode} policy {policy.name!r}, under "
                    "which clients may use plaintext; use SELECTIVETLS (TLS for chosen exports) "
                    "or FORCEDTLS (TLS for all) for the node first.",
                )

        try:
            self.allowed_clients = normalize_client_rules(self.allowed_clients)
        except ValidationError as exc:
            fail("allowed_clients", exc.messages[0])
        try:
            self.allowed_networks = normalize_networks(self.allowed_networks)
        except ValidationError as exc:
            fail("allowed_networks", exc.messages[0])

        min_bs, pref_bs, max_bs = (
            self.min_block_size,
            self.preferred_block_size,
            self.max_block_size,
        )
        if min_bs is not None and (not _is_power_of_2(min_bs) or min_bs > MAX_MIN_BLOCK_SIZE):
            fail("min_block_size", f"Must be a power of 2 between 1 and {MAX_MIN_BLOCK_SIZE}.")
        elif pref_bs is not None and min_bs is not None:
            if not _is_power_of_2(pref_bs):
                fail("preferred_block_size", "Must be a power of 2.")
            elif pref_bs < max(min_bs, 512):
                fail("preferred_block_size", "Must be at least max(min_block_size, 512).")
            elif max_bs is not None:
                if max_bs < pref_bs:
                    fail("max_block_size", "Must be at least preferred_block_size.")
                elif max_bs > MAX_PAYLOAD:
                    fail("max_block_size", f"Must be at most {MAX_PAYLOAD} (32 MiB).")
                elif max_bs % min_bs:
                    fail("max_block_size", "Must be a multiple of min_block_size.")
            if self.size and min_bs and self.size % min_bs:
                fail("size", "Must be a multiple of min_block_size.")
        if self.size is not None and self.size % SECTOR_SIZE:
            fail("size", f"Must be a multiple of {SECTOR_SIZE} bytes.")
        if self.fast_zero and not self.write_zeroes:
            fail("fast_zero", "fast_zero needs write_zeroes (NBD forbids one without the other).")
        if errors:
            raise ValidationError(errors)
