"""`manage.py register_node` (docker-compose.yml's second node): makes this host's node from the
environment with the API's rules and the default node's TLS policy, once; a value the API refuses
is refused with the field's message; an existing node is never changed; `--worker-data-dir`
gives the node's worker its own key, which verifies the node's snapshots."""

import io
import stat

import pytest
from django.core.management import CommandError, call_command

from exports_app.models import WorkerNode
from exports_app.services.nodekeys import node_key
from nbdworker.contract.nodekey import load_node_key


def register(*args: str) -> str:
    out = io.StringIO()
    call_command("register_node", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def node2_env(settings, monkeypatch, tmp_path):
    settings.NBDWORKER_NODE = "node2"
    settings.NBDWEB_STORAGE_ROOT = tmp_path / "images"
    settings.NBD_LISTEN = "0.0.0.0:10809"
    monkeypatch.setenv("NBD_PUBLIC_ADDRESS", "nbd2.example.net:10810")
    return settings


def test_registers_the_node_of_this_host_once(default_node, node2_env) -> None:
    assert "node 'node2' registered" in register()
    node = WorkerNode.objects.get(name="node2")
    assert node.storage_root == str(node2_env.NBDWEB_STORAGE_ROOT)
    assert (node.listen, node.public_address) == ("0.0.0.0:10809", "nbd2.example.net:10810")
    assert node.tls_policy == default_node.tls_policy

    node.storage_root = "/srv/elsewhere"
    node.save()
    assert "exists: left as it is" in register()
    node.refresh_from_db()
    assert node.storage_root == "/srv/elsewhere"
    assert WorkerNode.objects.filter(name="node2").count() == 1


def test_a_value_the_api_refuses_is_refused_with_its_field(default_node, node2_env) -> None:
    node2_env.NBD_LISTEN = "not an address"
    with pytest.raises(CommandError, match="node 'node2' not registered: listen: "):
        register()
    assert not WorkerNode.objects.filter(name="node2").exists()


def test_the_workers_own_data_dir_gets_the_nodes_key_only(default_node, node2_env, tmp_path):
    worker_dir = tmp_path / "node2-data"
    worker_dir.mkdir()
    assert "key written to" in register("--worker-data-dir", str(worker_dir))
    key_file = worker_dir / "node_keys" / "node2"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == node_key("node2") != node_key("default")
    assert sorted(p.name for p in worker_dir.rglob("*")) == ["node2", "node_keys"]
    # What nbdworker finds there, with no master secret in reach.
    found = load_node_key("node2", {"NBDWEB_DATA_DIR": str(worker_dir)})
    assert (str(found), found.source) == (node_key("node2"), str(key_file))
