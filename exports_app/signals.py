"""Model signals that publish worker configs: every save or delete that changes what a worker
serves marks the nodes it affects (`services.publisher.schedule_publish`: a marker in the same
transaction, published out of band after commit).

Signals rather than calls in each view, admin action and job: a path that changes a model
cannot forget to publish. Bulk `QuerySet.update()` bypasses signals; code that uses it must call
`schedule_publish` itself (nbdweb does not use it on these models).

Only a change to what the worker's config holds publishes (`WORKER_FIELDS`): `pre_save` reads
those fields' stored values and `post_save` compares. A description of a TLS policy, a node's
listen address or an export the worker does not serve (disabled, still provisioning) publishes
nothing. An export's `size` and `image_identity` are not in the config but count: the worker
reads the image's size when the export's config is applied, and a new image is another file.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model, Q
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save
from django.dispatch import receiver

from exports_app.models import Certificate, CertificateAuthority, Export, TLSPolicy, WorkerNode
from exports_app.models.publishing import NODE_SCOPE, TLS_SCOPE
from exports_app.services.export_states import SERVED_STATES
from exports_app.services.publisher import schedule_publish

__all__ = ["WORKER_FIELDS", "export_scope"]

# The fields of each model that reach a worker's config (exports_app/services/publishing.py).
WORKER_FIELDS: dict[type[Model], tuple[str, ...]] = {
    Export: (
        "node_id",
        "name",
        "image_path",
        "size",
        "image_identity",
        "state",
        "enabled",
        "description",
        "read_only",
        "tls_required",
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
        "allowed_clients",
        "allowed_networks",
    ),
    WorkerNode: ("name", "storage_root", "tls_policy_id"),
    TLSPolicy: ("mode", "server_certificate_id", "client_verification", "min_tls_version"),
    Certificate: (
        "certificate_pem",
        "encrypted_private_key",
        "serial",
        "revoked_at",
        "authority_id",
    ),
    CertificateAuthority: ("certificate_pem",),
}

_BEFORE = "_nbdweb_worker_fields_before"


def export_scope(export_id: int) -> str:
    return f"export:{export_id}"


def _values(instance: Model, fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in fields}


@receiver(pre_save, dispatch_uid="nbdweb-publish-before")
def remember_worker_fields(sender, instance: Model, raw: bool = False, **kwargs) -> None:
    fields = WORKER_FIELDS.get(sender)
    if fields is None or raw or instance.pk is None:
        return
    stored = sender._default_manager.filter(pk=instance.pk).values(*fields).first()
    setattr(instance, _BEFORE, stored)


def _changed(instance: Model, created: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the worker fields as stored before this save, or None if new; as saved now)."""
    before = None if created else getattr(instance, _BEFORE, None)
    if hasattr(instance, _BEFORE):
        delattr(instance, _BEFORE)
    return before, _values(instance, WORKER_FIELDS[type(instance)])


def _served_view(values: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the worker sees of an export: nothing unless served (in which served state does not
    matter: a resize starting changes nothing on the worker, its end does, with the size)."""
    if values is None or not values["enabled"] or values["state"] not in SERVED_STATES:
        return None
    return {name: value for name, value in values.items() if name != "state"}


def _nodes_of_policies(policies: Q) -> list[int]:
    return list(WorkerNode.objects.filter(policies).values_list("pk", flat=True))


@receiver(post_save, sender=Export, dispatch_uid="nbdweb-publish-export")
def export_saved(sender, instance: Export, created: bool = False, **kwargs) -> None:
    before, after = (_served_view(values) for values in _changed(instance, created))
    if before == after:
        return  # nothing the worker serves changed (or the worker serves it in neither)
    scope = export_scope(instance.pk)
    if before is not None and before["node_id"] != instance.node_id:
        schedule_publish(before["node_id"], scope)
    schedule_publish(instance.node_id, scope)


@receiver(post_delete, sender=Export, dispatch_uid="nbdweb-publish-export-delete")
def export_deleted(sender, instance: Export, **kwargs) -> None:
    if instance.enabled and instance.state in SERVED_STATES:
        schedule_publish(instance.node_id, export_scope(instance.pk))


@receiver(post_save, sender=WorkerNode, dispatch_uid="nbdweb-publish-node")
def node_changed(sender, instance: WorkerNode, created: bool = False, **kwargs) -> None:
    # A deleted node has no worker config left to publish (its exports are PROTECTed anyway).
    # A new one is published at once: its worker may be waiting for its (empty) config.
    before, after = _changed(instance, created)
    if before != after:
        schedule_publish(instance.pk, NODE_SCOPE)


@receiver(post_save, sender=TLSPolicy, dispatch_uid="nbdweb-publish-policy")
def policy_changed(sender, instance: TLSPolicy, created: bool = False, **kwargs) -> None:
    before, after = _changed(instance, created)
    if not created and before != after:
        schedule_publish(_nodes_of_policies(Q(tls_policy=instance)), TLS_SCOPE)


@receiver(
    m2m_changed, sender=TLSPolicy.trusted_authorities.through, dispatch_uid="nbdweb-publish-cas"
)
def policy_authorities_changed(sender, instance, action: str, pk_set, **kwargs) -> None:
    if not action.startswith("post_"):
        return
    if isinstance(instance, TLSPolicy):
        schedule_publish(_nodes_of_policies(Q(tls_policy=instance)), TLS_SCOPE)
    elif pk_set:  # changed from the CA's side: the policies are in pk_set
        schedule_publish(_nodes_of_policies(Q(tls_policy__in=pk_set)), TLS_SCOPE)


def _certificate_nodes(instance: Certificate) -> list[int]:
    # A revocation reaches the policies that trust the issuer; a new key or PEM, the policies
    # that serve with it.
    match = Q(tls_policy__server_certificate=instance.pk)
    if instance.authority_id is not None:
        match |= Q(tls_policy__trusted_authorities=instance.authority_id)
    return _nodes_of_policies(match)


@receiver(post_save, sender=Certificate, dispatch_uid="nbdweb-publish-certificate")
def certificate_saved(sender, instance: Certificate, created: bool = False, **kwargs) -> None:
    before, after = _changed(instance, created)
    if created and instance.revoked_at is None:
        return  # a new certificate is in no snapshot until a policy names it or it is revoked
    if before != after:
        schedule_publish(_certificate_nodes(instance), TLS_SCOPE)


@receiver(post_delete, sender=Certificate, dispatch_uid="nbdweb-publish-certificate-delete")
def certificate_deleted(sender, instance: Certificate, **kwargs) -> None:
    schedule_publish(_certificate_nodes(instance), TLS_SCOPE)


@receiver(post_save, sender=CertificateAuthority, dispatch_uid="nbdweb-publish-ca")
def authority_saved(
    sender, instance: CertificateAuthority, created: bool = False, **kwargs
) -> None:
    before, after = _changed(instance, created)
    if created or before == after:
        return  # no policy trusts a new CA yet
    schedule_publish(_nodes_of_policies(Q(tls_policy__trusted_authorities=instance.pk)), TLS_SCOPE)


@receiver(post_delete, sender=CertificateAuthority, dispatch_uid="nbdweb-publish-ca-delete")
def authority_deleted(sender, instance: CertificateAuthority, **kwargs) -> None:
    schedule_publish(_nodes_of_policies(Q(tls_policy__trusted_authorities=instance.pk)), TLS_SCOPE)
