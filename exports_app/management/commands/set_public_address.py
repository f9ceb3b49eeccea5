"""Set the default node's public address (the host:port in export URIs) from
NBD_PUBLIC_ADDRESS, when it is set; `make run` and docker compose's `init` run it at start, so
remote clients get URIs they can reach (compose listens on 0.0.0.0)."""

import os

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from exports_app.models import WorkerNode


class Command(BaseCommand):
    help = "Copy NBD_PUBLIC_ADDRESS into the default node's public_address (nothing if unset)."

    def handle(self, *args, **options) -> None:
        address = os.environ.get("NBD_PUBLIC_ADDRESS", "").strip()
        if not address:
            return
        node = WorkerNode.objects.filter(name=settings.NBDWORKER_NODE).first()
        if node is None:
            raise CommandError(f"no node named {settings.NBDWORKER_NODE!r}")
        if node.public_address == address:
            return
        node.public_address = address
        try:
            node.full_clean()
        except ValidationError as exc:
            raise CommandError(f"NBD_PUBLIC_ADDRESS: {' '.join(exc.messages)}") from None
        node.save()
        self.stdout.write(f"node {node.name!r}: export URIs use {address}")
