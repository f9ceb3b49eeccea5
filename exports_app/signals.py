"""Model signals that publish worker configs: every save or delete of something a worker serves
schedules a publish of the nodes it affects (`services.publishing.schedule_publish`, one
publish per node per transaction, after commit).

Signals rather than calls in each view, admin action and job: a path that changes a model
cannot forget to publish. Bulk `QuerySet.update()` bypasses signals; code that uses it must call
`schedule_publish` itself (nbdweb does not use it on these models).
"""

from __future__ import annotations

from django.db.models import Q
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from exports_app.models import Certificate, CertificateAuthority, Export, TLSPolicy, WorkerNode
from exports_app.services.publishing import schedule_publish

__all__: list[str] = []


def _nodes_of_policies(policies: Q) -> list[int]:
    return list(WorkerNode.objects.filter(policies).values_list("pk", flat=True))


@receiver([post_save, post_delete], sender=Export, dispatch_uid="nbdweb-publish-export")
def export_changed(sender, instance: Export, **kwargs) -> None:
    schedule_publish(instance.node_id)


@receiver(post_save, sender=WorkerNode, dispatch_uid="nbdweb-publish-node")
def node_changed(sender, instance: WorkerNode, **kwargs) -> None:
    # A deleted node has no worker config left to publish (its exports are PROTECTed anyway).
    schedule_publish(instance.pk)


@receiver(post_save, sender=TLSPolicy, dispatch_uid="nbdweb-publish-policy")
def policy_changed(sender, instance: TLSPolicy, **kwargs) -> None:
    schedule_publish(_nodes_of_policies(Q(tls_policy=instance)))


@receiver(
    m2m_changed, sender=TLSPolicy.trusted_authorities.through, dispatch_uid="nbdweb-publish-cas"
)
def policy_authorities_changed(sender, instance, action: str, pk_set, **kwargs) -> None:
    if not action.startswith("post_"):
        return
    if isinstance(instance, TLSPolicy):
        schedule_publish(_nodes_of_policies(Q(tls_policy=instance)))
    elif pk_set:  # changed from the CA's side: the policies are in pk_set
        schedule_publish(_nodes_of_policies(Q(tls_policy__in=pk_set)))


@receiver([post_save, post_delete], sender=Certificate, dispatch_uid="nbdweb-publish-certificate")
def certificate_changed(sender, instance: Certificate, created: bool = False, **kwargs) -> None:
    if created and instance.revoked_at is None:
        return  # a new certificate is in no snapshot until a policy names it or it is revoked
    # A revocation reaches the policies that trust the issuer; a new key or PEM, the policies
    # that serve with it.
    match = Q(tls_policy__server_certificate=instance.pk)
    if instance.authority_id is not None:
        match |= Q(tls_policy__trusted_authorities=instance.authority_id)
    schedule_publish(_nodes_of_policies(match))


@receiver([post_save, post_delete], sender=CertificateAuthority, dispatch_uid="nbdweb-publish-ca")
def authority_changed(
    sender, instance: CertificateAuthority, created: bool = False, **kwargs
) -> None:
    if created:
        return  # no policy trusts it yet
    schedule_publish(_nodes_of_policies(Q(tls_policy__trusted_authorities=instance.pk)))
