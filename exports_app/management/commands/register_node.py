"""`manage.py register_node`: make this host's node (`NBDWORKER_NODE`) if it does not exist yet.

For deployments that bring a storage node up unattended (docker-compose.yml's `node2`): the node
gets its storage root from `NBDWEB_STORAGE_ROOT`, its listen address from `NBD_LISTEN` and its
public address from `NBD_PUBLIC_ADDRESS` (when set), and the default node's TLS policy. It is
made through the API's serializer, so a value the API would refuse is refused here the same way.
A node that exists is left as it is: change it through the API or the admin.

With ``--worker-data-dir DIR`` it also writes the node's key to ``DIR/node_keys/<node>`` (0600):
the data dir of the node's nbdworker, which then holds its own key and nothing of the master
secret this command derives it from (docs/security.md, per-node keys).
"""

import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from exports_app.api.serializers import WorkerNodeSerializer
from exports_app.models import WorkerNode
from exports_app.services.nodekeys import write_node_key


class Command(BaseCommand):
    help = "Create this host's node (NBDWORKER_NODE) from the environment unless it exists."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--worker-data-dir",
            type=Path,
            help="also write the node's key to DIR/node_keys/<node> for its nbdworker",
        )

    def handle(self, *args, worker_data_dir: Path | None = None, **options) -> None:
        name = settings.NBDWORKER_NODE
        self._register(name)
        if worker_data_dir is not None:
            try:
                path = write_node_key(name, worker_data_dir)
            except OSError as exc:
                raise CommandError(f"cannot write the node key: {exc}") from None
            self.stdout.write(f"node {name!r}: key written to {path}")

    def _register(self, name: str) -> None:
        data = {
            "name": name,
            "storage_root": str(settings.NBDWEB_STORAGE_ROOT),
            "listen": settings.NBD_LISTEN,
            "public_address": os.environ.get("NBD_PUBLIC_ADDRESS", "").strip(),
            "description": "Registered by manage.py register_node.",
        }
        with transaction.atomic():
            if WorkerNode.objects.select_for_update().filter(name=name).exists():
                self.stdout.write(f"node {name!r} exists: left as it is")
                return
            serializer = WorkerNodeSerializer(data=data)
            if not serializer.is_valid():
                errors = "; ".join(
                    f"{field}: {' '.join(str(m) for m in messages)}"
                    for field, messages in serializer.errors.items()
                )
                raise CommandError(f"node {name!r} not registered: {errors}")
            serializer.save()
        self.stdout.write(f"node {name!r} registered (storage root {data['storage_root']})")
