"""`manage.py publish_config [NODE ...]`: publish the config of every node (or those named) now.

For catching up after restoring Redis from a backup, or to republish a node whole (changes
are otherwise published out of band, and retried, by services.publisher).
"""

from django.core.management.base import BaseCommand, CommandError

from exports_app.models import WorkerNode
from exports_app.services.publishing import publish_nodes


class Command(BaseCommand):
    help = "Publish the worker config of every node (or the named ones) to Redis now."

    def add_arguments(self, parser) -> None:
        parser.add_argument("nodes", nargs="*", help="node names (default: all)")

    def handle(self, *args, nodes: list[str], **options) -> None:
        queryset = WorkerNode.objects.all()
        if nodes:
            queryset = queryset.filter(name__in=nodes)
            missing = set(nodes) - set(queryset.values_list("name", flat=True))
            if missing:
                raise CommandError(f"no such node: {', '.join(sorted(missing))}")
        results = publish_nodes(queryset.values_list("pk", flat=True))
        failed = sorted(name for name, generation in results.items() if generation is None)
        for name, generation in sorted(results.items()):
            if generation is not None:
                self.stdout.write(f"{name}: generation {generation}")
        if failed:
            raise CommandError(f"not published (see the log): {', '.join(failed)}")
