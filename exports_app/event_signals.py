"""Model signals that emit events (`services.events.emit`) for changes any path can make: an
export's state (the API, the admin and the jobs all save it, through
services.export_states.set_state or by making or deleting the export) and a certificate's
revocation. They are the only source of `export.state_changed`: one event per change.

Like exports_app.signals, a path cannot forget them; bulk `QuerySet.update()` bypasses them.
"""

from __future__ import annotations

from django.db.models.signals import post_delete, post_init, post_save
from django.dispatch import receiver

from exports_app.models import Certificate, Export
from exports_app.services import events

__all__: list[str] = []


@receiver(post_init, sender=Export, dispatch_uid="nbdweb-events-export-init")
def remember_export_state(sender, instance: Export, **kwargs) -> None:
    # From __dict__: a deferred field (`.only()`) must not cost a query per row.
    instance._state_as_loaded = instance.__dict__.get("state") if instance.pk else None


@receiver(post_save, sender=Export, dispatch_uid="nbdweb-events-export-saved")
def export_saved(sender, instance: Export, created: bool, **kwargs) -> None:
    old = None if created else getattr(instance, "_state_as_loaded", None)
    if created or old != instance.state:
        events.emit(
            "export.state_changed",
            instance,
            {"old": old, "new": instance.state, "node": instance.node.name},
        )
    instance._state_as_loaded = instance.state


@receiver(post_delete, sender=Export, dispatch_uid="nbdweb-events-export-deleted")
def export_deleted(sender, instance: Export, **kwargs) -> None:
    events.emit(
        "export.state_changed",
        instance,
        {"old": instance.state, "new": None, "deleted": True, "node": instance.node.name},
    )


@receiver(post_init, sender=Certificate, dispatch_uid="nbdweb-events-certificate-init")
def remember_revocation(sender, instance: Certificate, **kwargs) -> None:
    instance._revoked_as_loaded = instance.__dict__.get("revoked_at") is not None


@receiver(post_save, sender=Certificate, dispatch_uid="nbdweb-events-certificate-saved")
def certificate_saved(sender, instance: Certificate, **kwargs) -> None:
    if instance.revoked_at is not None and not getattr(instance, "_revoked_as_loaded", False):
        events.emit(
            "certificate.revoked",
            instance,
            {
                "serial": instance.serial,
                "common_name": instance.common_name,
                "reason": instance.revocation_reason,
            },
        )
    instance._revoked_as_loaded = instance.revoked_at is not None
