"""`manage.py node_key NODE [--write]`: the key NODE's worker verifies its config with.

Each worker gets only its own node's key (docs/security.md): it signs nothing another node
accepts and opens no other node's private key. Without ``--write`` the key is printed on the
last line (for ``NBDWEB_NODE_KEY`` on the worker's host); with it, it is written to
``$NBDWEB_DATA_DIR/node_keys/NODE`` (0600) for a worker that shares this data dir.
"""

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from exports_app.models import WorkerNode
from exports_app.services.nodekeys import node_key, write_node_key
from exports_app.validators import validate_node_name


class Command(BaseCommand):
    help = "Print (or --write into the data dir) the key of one node's worker."

    def add_arguments(self, parser) -> None:
        parser.add_argument("node", help="the node's name")
        parser.add_argument(
            "--write",
            action="store_true",
            help="write it to $NBDWEB_DATA_DIR/node_keys/NODE (0600) instead of printing it",
        )

    def handle(self, *args, node: str, write: bool, **options) -> None:
        try:
            validate_node_name(node)
        except ValidationError as exc:
            raise CommandError(f"node name {node!r}: {' '.join(exc.messages)}") from None
        if not WorkerNode.objects.filter(name=node).exists():
            # A key may be handed out before the node is made; say so, it may be a typo.
            self.stderr.write(f"note: there is no node {node!r} (yet)")
        if write:
            try:
                path = write_node_key(node)
            except OSError as exc:
                raise CommandError(f"cannot write the node key: {exc}") from None
            self.stdout.write(f"{node}: key written to {path}")
        else:
            self.stdout.write(node_key(node))
