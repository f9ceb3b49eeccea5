"""`manage.py sync_node_listen`: this host's node (`NBDWORKER_NODE`) listens where `NBD_LISTEN`
says. `make run` and docker compose's `init` run it at start, beside the nbdworker they start
with that very `NBD_LISTEN`: the node was made with the address of the first start (migration
0002), so a stack started again on another port kept giving export URIs with the old one."""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from exports_app.models import WorkerNode


class Command(BaseCommand):
    help = "Set this host's node's listen address (NBDWORKER_NODE) to NBD_LISTEN."

    def handle(self, *args, **options) -> None:
        node = WorkerNode.objects.filter(name=settings.NBDWORKER_NODE).first()
        if node is None:
            raise CommandError(f"no node named {settings.NBDWORKER_NODE!r}")
        if node.listen == settings.NBD_LISTEN:
            return
        previous, node.listen = node.listen, settings.NBD_LISTEN
        try:
            node.full_clean()
        except ValidationError as exc:
            raise CommandError(f"NBD_LISTEN: {' '.join(exc.messages)}") from None
        node.save()
        self.stdout.write(f"node {node.name!r}: listens on {node.listen} (was {previous})")
