"""Dirty markers: committed changes a node's worker has not been sent yet.

A change to what a worker serves inserts a `PendingPublish` row in the change's own transaction
(`services.publisher.schedule_publish`), so the marker commits or rolls back with the change.
The publisher (`services.publisher`) deletes a node's markers only after the node's config that
includes them is stored in Redis: a publisher that dies leaves them for the next one.
"""

from django.db import models

__all__ = ["PendingPublish"]

# `scope` of a change to the node as a whole (its storage root, name, policy): every entry is
# written again.
NODE_SCOPE = "node"
# `scope` of a change to the node's TLS section alone (the policy's settings, certificates,
# CAs, revocations): one entry.
TLS_SCOPE = "tls"


class PendingPublish(models.Model):
    node = models.ForeignKey("exports_app.WorkerNode", on_delete=models.CASCADE, related_name="+")
    # "node", "tls", or "export:<pk>" for a change to one export (the row may be gone).
    scope = models.CharField(max_length=40, default=NODE_SCOPE)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["node", "id"], name="pending_publish_node")]

    def __str__(self) -> str:
        return f"{self.node_id}:{self.scope}"
