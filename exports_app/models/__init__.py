"""nbdweb's models, one module per concern."""

from exports_app.models.certificates import Certificate, CertificateAuthority
from exports_app.models.exports import Export
from exports_app.models.idempotency import IdempotencyKey
from exports_app.models.jobs import Job
from exports_app.models.nodes import WorkerNode
from exports_app.models.publishing import PendingPublish
from exports_app.models.tls import TLSPolicy
from exports_app.models.webhooks import WebhookDelivery, WebhookSubscription

__all__ = [
    "Certificate",
    "CertificateAuthority",
    "Export",
    "IdempotencyKey",
    "Job",
    "PendingPublish",
    "TLSPolicy",
    "WebhookDelivery",
    "WebhookSubscription",
    "WorkerNode",
]
