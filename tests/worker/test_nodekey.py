"""Per-node keys (nbdworker/contract/nodekey.py): what one node's worker holds neither forges a
config another node's worker accepts nor opens another node's sealed private key, and the log
still tells a snapshot signed with another key from a forged one.

The attack (on main, one NBDWEB_CONFIG_SECRET for all nodes): whoever holds node A's worker's
secret signs a snapshot for node B (every export of B pointed anywhere under B's roots, TLS
off) and node B's worker applies it; and opens the private key in B's snapshot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
import redis.asyncio as aioredis

from nbdworker.configsource import ConfigSource
from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.nodekey import (
    NODE_KEY_ENV,
    derive_node_key,
    load_node_key,
    node_key_path,
)
from nbdworker.contract.sealed import SealError, open_sealed, seal
from nbdworker.contract.snapshot import (
    SecretError,
    SnapshotError,
    config_channel,
    config_key,
    key_id,
    sign_snapshot,
    verify_snapshot,
)
from tests.support.metrics import scrape, value
from tests.support.pki import make_pki, tls_config_dict
from tests.support.polling import poll
from tests.support.redisserver import private_redis
from tests.support.worker import start_worker

MASTER = "node-key-test-master-secret"


def config_for(node: str, generation: int = 5, **extra) -> WorkerConfig:
    return WorkerConfig.from_dict(
        {
            "version": 1,
            "generation": generation,
            "node": node,
            "exports": [{"name": "disk", "backend": "memory", "size": 1 << 20}],
            **extra,
        }
    )


def worker_key(node: str, tmp_path) -> str:
    """What node `node`'s worker is given, by the deployment's own path: the key file that
    ``manage.py node_key --write`` makes."""
    path = node_key_path(tmp_path, node)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(derive_node_key(MASTER, node) + "\n")
    path.chmod(0o600)
    return load_node_key(node, {"NBDWEB_DATA_DIR": str(tmp_path)})


def test_node_keys_differ_per_node_and_are_not_the_master() -> None:
    a, b = derive_node_key(MASTER, "a"), derive_node_key(MASTER, "b")
    assert a != b and len(a) == len(b) == 64
    assert MASTER not in (a, b)
    assert derive_node_key(MASTER, "a") == a  # the web side and the worker agree
    assert derive_node_key("another-master", "a") != a


def test_node_a_worker_key_cannot_forge_a_config_for_node_b(tmp_path) -> None:
    """With all node A's worker holds, a snapshot for node B is refused by B's worker as
    signed with another key, naming the node its payload claims."""
    key_a, key_b = worker_key("a", tmp_path), worker_key("b", tmp_path)
    forged = sign_snapshot(config_for("b", generation=10**12), key_a)
    with pytest.raises(SnapshotError, match="signed with another key") as refused:
        verify_snapshot(forged, key_b, node="b")
    assert refused.value.kind == "bad_signature"
    assert key_id(key_a) in str(refused.value) and key_id(key_b) in str(refused.value)
    assert "names node 'b'" in str(refused.value)
    # What the web side signs for B, B's worker takes.
    assert verify_snapshot(sign_snapshot(config_for("b"), derive_node_key(MASTER, "b")), key_b)


def test_key_ids_tell_another_key_from_a_forgery(tmp_path) -> None:
    key_a = worker_key("a", tmp_path)
    other = sign_snapshot(config_for("a"), derive_node_key(MASTER, "b"))
    with pytest.raises(SnapshotError, match=r"signed with another key \(key id k1-"):
        verify_snapshot(other, key_a, node="a")
    envelope = json.loads(sign_snapshot(config_for("a"), key_a))
    envelope["payload"] = envelope["payload"].replace('"generation":5', '"generation":6')
    with pytest.raises(SnapshotError, match=r"^bad signature$") as forged:
        verify_snapshot(json.dumps(envelope), key_a, node="a")
    assert forged.value.kind == "bad_signature"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_a_private_key_sealed_for_node_a_does_not_open_with_node_b_key(pki, tmp_path) -> None:
    key_a, key_b = worker_key("a", tmp_path), worker_key("b", tmp_path)
    sealed = seal(pki.server.key_pem, key_a.encode(), "a")
    assert open_sealed(sealed, key_a.encode(), "a") == pki.server.key_pem
    # Even claiming to be node A, B's key opens nothing.
    with pytest.raises(SealError):
        open_sealed(sealed, key_b.encode(), "a")
    envelope = sign_snapshot(
        config_for("a", tls=tls_config_dict(pki, "FORCEDTLS", revoked=())), key_a
    )
    payload = json.loads(json.loads(envelope)["payload"])
    with pytest.raises(SealError):
        open_sealed(payload["tls"]["key_pem"], key_b.encode(), "a")


def test_node_key_sources_in_order(tmp_path) -> None:
    env = {"NBDWEB_DATA_DIR": str(tmp_path), "NBDWEB_CONFIG_SECRET": MASTER}
    derived = load_node_key("a", env)
    assert derived == derive_node_key(MASTER, "a") and derived.from_master
    from_file = worker_key("a", tmp_path)
    assert not from_file.from_master and from_file.source == str(tmp_path / "node_keys" / "a")
    from_env = load_node_key("a", {**env, NODE_KEY_ENV: derive_node_key(MASTER, "x")})
    assert from_env == derive_node_key(MASTER, "x") and from_env.source == NODE_KEY_ENV


def test_node_key_refusals(tmp_path) -> None:
    env = {"NBDWEB_DATA_DIR": str(tmp_path)}
    with pytest.raises(SecretError, match="not a node key"):
        load_node_key("a", {**env, NODE_KEY_ENV: MASTER})  # the master is not a node key
    path = tmp_path / "node_keys" / "a"
    path.parent.mkdir()
    path.write_text(derive_node_key(MASTER, "a"))
    path.chmod(0o644)
    with pytest.raises(SecretError, match="others may read it"):
        load_node_key("a", env)
    path.unlink()
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(SecretError, match="cannot read"):
        load_node_key("a", env)
    with pytest.raises(SecretError, match="cannot name a key file"):
        load_node_key("../a", env)


def test_a_key_file_someone_else_could_have_put_there_is_refused(tmp_path) -> None:
    """Whoever writes the key file chooses the key the worker verifies its config with (and
    can then sign a config for it). A file of another user, or in a directory others may
    write, is not this worker's key."""
    env = {"NBDWEB_DATA_DIR": str(tmp_path)}
    path = tmp_path / "node_keys" / "a"
    path.parent.mkdir(mode=0o700)
    path.write_text(derive_node_key(MASTER, "a"))
    path.chmod(0o600)
    os.chown(path, os.geteuid() + 1, -1)  # another user's, still 0600
    with pytest.raises(SecretError, match=r"owned by uid \d+"):
        load_node_key("a", env)
    os.chown(path, os.geteuid(), -1)
    path.parent.chmod(0o777)
    with pytest.raises(SecretError, match="others may write"):
        load_node_key("a", env)
    path.parent.chmod(0o700)
    assert load_node_key("a", env) == derive_node_key(MASTER, "a")


def test_config_source_for_node_a_logs_and_counts_node_b_snapshot(tmp_path, caplog) -> None:
    """A validly signed snapshot of node B copied to node A's key: node A's follower refuses
    it (logged, counted as bad_signature) and keeps its own config."""
    with private_redis(tmp_path / "redis") as server:
        r = server.client()
        r.set(config_key("a"), sign_snapshot(config_for("a", 1), derive_node_key(MASTER, "a")))
        rejected: list[str] = []

        async def main() -> tuple[WorkerConfig, bool]:
            client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1.0)
            source = ConfigSource(
                client,
                "a",
                worker_key("a", tmp_path),
                tmp_path / "state",
                apply=lambda config: None,
                on_rejected=rejected.append,
            )
            try:
                first = await source.initial()
                b_snapshot = sign_snapshot(config_for("b", 2), derive_node_key(MASTER, "b"))
                await client.set(config_key("a"), b_snapshot)
                return first, await source.fetch()
            finally:
                await client.aclose()

        with caplog.at_level(logging.ERROR, "nbdworker.configsource"):
            first, applied = asyncio.run(main())
    assert first.generation == 1 and not applied
    assert rejected == ["bad_signature"]
    assert "signed with another key" in caplog.text
    assert "names node 'b'" in caplog.text


def test_worker_process_gets_its_node_key_and_serving_processes_no_secret(tmp_path) -> None:
    """A worker started from the master secret (single machine) derives its key, warns, and
    refuses node B's snapshot counting it; its serving processes' environment holds no
    secret."""
    with private_redis(tmp_path / "redis") as server:
        r = server.client()
        r.set(config_key("a"), sign_snapshot(config_for("a", 1), derive_node_key(MASTER, "a")))
        worker = start_worker(
            None,
            workdir=tmp_path / "worker",
            storage_root=tmp_path,
            env={
                "REDIS_URL": server.url,
                "NBDWEB_CONFIG_SECRET": MASTER,
                "NBDWORKER_NODE": "a",
                "NBDWEB_DATA_DIR": str(tmp_path / "data"),
            },
            args=["--metrics-listen", "127.0.0.1:0", "--workers", "2"],
        )
        try:
            worker.wait_for_log(r"key from the master config secret")
            worker.wait_for_log(r"can read the master config secret")
            worker.wait_for_log(r"following nbdweb:config-changed")
            r.set(config_key("a"), sign_snapshot(config_for("b", 2), derive_node_key(MASTER, "b")))
            r.publish(config_channel("a"), "a:2")
            worker.wait_for_log(r"rejected: signed with another key .* names node 'b'")
            poll(
                lambda: value(
                    scrape(worker), "nbdworker_config_rejected_total", reason="bad_signature"
                )
                == 1,
                "the refusal counted",
            )
            pid = worker.proc.pid
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(child) for child in f.read().split()]
            assert children
            for pid in children:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    names = {item.split(b"=", 1)[0] for item in f.read().split(b"\0")}
                assert b"NBDWEB_CONFIG_SECRET" not in names and NODE_KEY_ENV.encode() not in names
            # Its serving processes run as its user: they could read its /proc/PID/environ,
            # the environment it started with, unless the secret's bytes are gone from it.
            with open(f"/proc/{worker.proc.pid}/environ", "rb") as f:
                assert MASTER.encode() not in f.read()
        finally:
            worker.stop()


def test_serving_processes_get_no_redis_password(tmp_path) -> None:
    """Serving processes use no Redis: REDIS_URL (with its password) is not in their
    environment, nor, where they could read it, in the worker's /proc/PID/environ."""
    password = "redis-pass-for-the-supervisor-only"
    key = derive_node_key(MASTER, "a")
    with private_redis(tmp_path / "redis", password=password) as server:
        server.client().set(config_key("a"), sign_snapshot(config_for("a", 1), key))
        env = {
            "REDIS_URL": server.url,
            NODE_KEY_ENV: key,
            "NBDWORKER_NODE": "a",
            "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        }
        assert password in server.url
        worker = start_worker(
            None, workdir=tmp_path / "w", storage_root=tmp_path, env=env, args=["--workers", "2"]
        )
        try:
            worker.wait_for_log(r"following nbdweb:config-changed")
            pid = worker.proc.pid
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(child) for child in f.read().split()]
            assert children
            for child in [pid, *children]:
                with open(f"/proc/{child}/environ", "rb") as f:
                    assert password.encode() not in f.read()
        finally:
            worker.stop()


def test_a_node_key_given_in_the_environment_is_wiped_from_the_workers_environ(tmp_path):
    key = derive_node_key(MASTER, "a")
    with private_redis(tmp_path / "redis") as server:
        server.client().set(config_key("a"), sign_snapshot(config_for("a", 1), key))
        env = {
            "REDIS_URL": server.url,
            NODE_KEY_ENV: key,
            "NBDWORKER_NODE": "a",
            "NBDWEB_DATA_DIR": str(tmp_path / "data"),
        }
        worker = start_worker(
            None, workdir=tmp_path / "w", storage_root=tmp_path, env=env, args=["--workers", "2"]
        )
        try:
            worker.wait_for_log(r"following nbdweb:config-changed")
            with open(f"/proc/{worker.proc.pid}/environ", "rb") as f:
                assert key.encode() not in f.read()
        finally:
            worker.stop()
