"""Changes to an export, each rule written once for the API and the admin.

The checks raise Django's `ValidationError` keyed by field: the API turns it into a 400 with
field errors (`exports_app.api.base.django_errors_to_drf`), or a 409 when the export's state
forbids the change (`export_states.StateConflict`), the admin into form errors or an action's
message. The save functions save the export and request its job in one transaction,
so the job's message is sent only once both are committed (`exports_app.services.provisioning`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.core.exceptions import ValidationError
from django.db import transaction

from exports_app.choices import ExportState
from exports_app.models import Export, Job
from exports_app.services import export_states, export_usage, images, provisioning, storage

__all__ = [
    "ImportRefused",
    "check_import",
    "check_resize",
    "create_export",
    "import_check",
    "import_export",
    "resize_export",
    "save_export",
]

log = logging.getLogger(__name__)


def check_resize(
    export: Export, new_size: int, force: bool, *, old_size: int | None = None
) -> None:
    """Whether `export` may go from `old_size` (default: its stored size) to `new_size`.

    A shrink destroys the data past the new end, so it needs `force`, and it is refused while
    clients use the export (they would read past the end). Checked when the resize is asked for
    and again when its job runs, since a client may connect in between. When the node's worker
    sends no heartbeat its sessions are unknown, and a forced shrink goes ahead with a warning.
    """
    if new_size >= (export.size if old_size is None else old_size):
        return
    if not force:
        raise ValidationError(
            {"size": ["Shrinking destroys the data past the new end; it needs force."]}
        )
    sessions = export_usage.live_session_count(export)
    if sessions:
        raise ValidationError(
            {"size": [f"{sessions} live session(s) use the export; a shrink needs none."]}
        )
    if sessions is None:
        log.warning("shrinking %r without knowing its live sessions", export.name)


def create_export(export: Export, clone_from: Export | None = None) -> Job:
    """Save a new (validated) export and request the job that makes its image: an empty one
    (the export is `provisioning`), or a copy of `clone_from`'s (`cloning`)."""
    if clone_from is not None:
        export.state = ExportState.CLONING
    with transaction.atomic():
        export.save()
        if clone_from is None:
            return provisioning.request_create(export)
        return provisioning.request_clone(export, clone_from)


class ImportRefused(Exception):
    """The file cannot be the export's image; `field` is the request's field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def import_check(export: Export, path: str, size: int) -> Callable[[str, int], None]:
    """What an import checks of the file beyond `images.take_over`'s own rules (asked by
    `check_import`, and again by the import job, which alone decides): its size is the one
    named, and no other export on any node has it as its image (a second name, or the same
    directory reached through another node's root)."""

    def check(device_inode: str, found: int) -> None:
        if found != size:
            raise ImportRefused(
                "size", f"{path} has {found} bytes, not the {size} the import named."
            )
        other = (
            Export.objects.filter(image_identity__startswith=f"{device_inode}:")
            .exclude(pk=export.pk)
            .first()
        )
        if other is not None:
            raise ImportRefused(
                "image_path", f"{path} is the image of export {other.name!r} already."
            )

    return check


def check_import(export: Export) -> None:
    """Refuse, when it is asked, an import the job would refuse: ValidationError naming the
    field. Only where this host sees the node's storage root (a node on another host: its job
    checks)."""
    try:
        with storage.image_place(export.node.storage_root, export.image_path) as place:
            images.check_importable(place, import_check(export, place.path, export.size))
    except storage.NotThisHost:
        return
    except storage.StorageRefused as exc:
        raise ValidationError({"image_path": [str(exc)]}) from None
    except ImportRefused as exc:
        raise ValidationError({exc.field: [str(exc)]}) from None
    except FileNotFoundError:
        raise ValidationError(
            {"image_path": [f"No file to import at {export.image_path!r}."]}
        ) from None
    except OSError as exc:  # ImageNotOwned (a symlink, a FIFO, hard links, another's) and errors
        raise ValidationError({"image_path": [images.describe_error(exc)]}) from None


def import_export(export: Export) -> Job:
    """Save a new (validated) export whose image is the existing file at its `image_path`, and
    request the job that checks the file and takes it over. Jobs change or remove that file only
    once the job has recorded it; deleting the export without wipe then leaves it. A file this
    host can see and the job would refuse is refused now (`check_import`): no export, no job."""
    check_import(export)
    with transaction.atomic():
        export.save()
        return provisioning.request_import(export)


def save_export(export: Export, old_size: int, force: bool = False) -> Job | None:
    """Save a changed (validated) export. A new size requests the resize job: the export is
    saved with its old size and shows `resizing` until the job has run."""
    new_size = export.size
    export.size = old_size
    with transaction.atomic():
        export.save()
        if new_size == old_size:
            return None
        return provisioning.request_resize(export, new_size, force=force)


def resize_export(export: Export, new_size: int, force: bool = False) -> Job:
    """Check, save and request the resize of `export` to `new_size` bytes. On a refusal the
    export is left as it was."""
    export_states.check_changeable(export)
    if new_size == export.size:
        raise ValidationError({"size": ["The export already has this size."]})
    check_resize(export, new_size, force)
    old_size = export.size
    export.size = new_size
    try:
        export.full_clean()
    finally:
        # The size is stored when the job has resized the image.
        export.size = old_size
    with transaction.atomic():
        return provisioning.request_resize(export, new_size, force=force)
