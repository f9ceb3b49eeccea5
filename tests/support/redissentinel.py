"""A private Redis Sentinel deployment for a test: a primary, a replica and sentinels, each a real
redis-server process (`redis-server <conf> --sentinel`) on its own free port and directory.

    with sentinel_cluster(tmp_path) as cluster:
        cluster.url                 # redis+sentinel://:<pw>@127.0.0.1:<p1>,.../nbdweb/0?...
        cluster.kill_primary()      # SIGKILL, as a crashed host
        cluster.wait_for_promotion()  # the replica, once every sentinel names it

The data nodes want a password, and so do the sentinels (their own, given in the URL as
``sentinel_password``). With `tls=` (a tests.support.pki.PKI) every one of them listens with
TLS only (replication and the sentinels' links too), `url` is ``rediss+sentinel://`` and
`client_env` holds the REDIS_TLS_* files. Failure detection is quick (`DOWN_AFTER_MS`) so a
test's failover takes seconds; the machine's shared Redis is never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
import redis

from tests.support.polling import poll
from tests.support.redisserver import START_TIMEOUT, PrivateRedis, free_port

if TYPE_CHECKING:
    from tests.support.pki import PKI

__all__ = ["SentinelCluster", "sentinel_cluster"]

MASTER = "nbdweb"
DOWN_AFTER_MS = 1500
FAILOVER_TIMEOUT_MS = 10000
DATA_PASSWORD = "data node pass/with:odd@chars"
SENTINEL_PASSWORD = "sentinel-pass"


class SentinelCluster:
    def __init__(self, directory: Path, sentinels: int = 3, tls: PKI | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server")
        self.binary = binary
        self.directory = directory
        self.tls = tls
        # Both data nodes can be primary: each has the password and knows the other's.
        auth = ["--masterauth", DATA_PASSWORD]
        if tls is not None:
            auth += ["--tls-replication", "yes", *self._tls_client_args()]
        self.primary = PrivateRedis(
            directory / "primary", password=DATA_PASSWORD, tls=tls, extra_args=auth
        )
        self.replica = PrivateRedis(
            directory / "replica",
            password=DATA_PASSWORD,
            tls=tls,
            extra_args=[*auth, "--replicaof", "127.0.0.1", str(self.primary.port)],
        )
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen] = []
        self.quorum = sentinels // 2 + 1

    def _tls_client_args(self) -> list[str]:
        """The certificate a server presents when it is the client (replication, sentinels)."""
        assert self.tls is not None
        client = self.tls.client_dir("alice")
        return [
            "--tls-client-cert-file", str(client / "client-cert.pem"),
            "--tls-client-key-file", str(client / "client-key.pem"),
        ]  # fmt: skip

    @property
    def client_env(self) -> dict[str, str]:
        return self.primary.client_env

    def sentinel_url(self, ports: list[int] | None = None) -> str:
        """The Sentinel URL of this deployment, listing `ports` (all sentinels by default)."""
        members = ",".join(f"127.0.0.1:{port}" for port in ports or self.sentinel_ports)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return (
            f"{scheme}://:{quote(DATA_PASSWORD, safe='')}@{members}/{MASTER}/0"
            f"?sentinel_password={SENTINEL_PASSWORD}"
        )

    @property
    def url(self) -> str:
        return self.sentinel_url()

    def sentinel(self, port: int) -> redis.Redis:
        tls = {}
        if self.tls is not None:
            env = self.client_env
            tls = {
                "ssl": True,
                "ssl_ca_certs": env["REDIS_TLS_CA_FILE"],
                "ssl_certfile": env["REDIS_TLS_CERT_FILE"],
                "ssl_keyfile": env["REDIS_TLS_KEY_FILE"],
            }
        return redis.Redis(
            port=port,
            password=SENTINEL_PASSWORD,
            socket_connect_timeout=1,
            decode_responses=True,
            **tls,
        )

    def _sentinel_config(self, port: int) -> Path:
        directory = self.directory / f"sentinel-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"  # sentinels rewrite their config: a file of its own
        listen = f"port {port}\n"
        if self.tls is not None:
            server, client = self.tls.server_dir, self.tls.client_dir("alice")
            listen = (
                f"port 0\ntls-port {port}\ntls-replication yes\ntls-auth-clients optional\n"
                f"tls-cert-file {server / 'server-cert.pem'}\n"
                f"tls-key-file {server / 'server-key.pem'}\n"
                f"tls-ca-cert-file {server / 'ca-cert.pem'}\n"
                f"tls-client-cert-file {client / 'client-cert.pem'}\n"
                f"tls-client-key-file {client / 'client-key.pem'}\n"
            )
        config.write_text(
            f"{listen}bind 127.0.0.1\ndir {directory}\n"
            f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} {self.quorum}\n"
            f'sentinel auth-pass {MASTER} "{DATA_PASSWORD}"\n'
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        return config

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for port in self.sentinel_ports:
            self.sentinel_procs.append(
                subprocess.Popen(
                    [self.binary, str(self._sentinel_config(port)), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        poll(self._ready, "the replica in sync and every sentinel seeing the others", START_TIMEOUT)

    def _ready(self) -> bool:
        for proc in self.sentinel_procs:
            if proc.poll() is not None:
                pytest.fail(f"a redis sentinel exited with status {proc.returncode}")
        try:
            if self.replica.client().info("replication").get("master_link_status") != "up":
                return False
            for port in self.sentinel_ports:
                # (redis-py's sentinel_* helpers fail to parse on a plain client: raw replies)
                reply = self.sentinel(port).execute_command("SENTINEL", "MASTER", MASTER)
                master = dict(zip(reply[::2], reply[1::2], strict=True))
                if int(master["num-slaves"]) < 1:
                    return False
                if int(master["num-other-sentinels"]) < len(self.sentinel_ports) - 1:
                    return False
        except redis.RedisError:
            return False
        return True

    def named_primary(self) -> int | None:
        """The primary's port if every sentinel names the same one, else None."""
        named = set()
        for port in self.sentinel_ports:
            try:
                address = self.sentinel(port).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER
                )
            except redis.RedisError:
                return None
            named.add(address[1] if address else None)
        return int(named.pop()) if len(named) == 1 and None not in named else None

    def kill_primary(self) -> None:
        """SIGKILL the primary: no goodbye to its clients or the sentinels."""
        assert self.primary.proc is not None
        self.primary.proc.kill()
        self.primary.proc.wait()
        self.primary.proc = None

    def wait_for_promotion(self, timeout: float = 60.0) -> PrivateRedis:
        """Wait until every sentinel names the replica and it answers as a primary."""

        def promoted() -> bool:
            if self.named_primary() != self.replica.port:
                return False
            try:
                return self.replica.client().role()[0] == "master"
            except redis.RedisError:
                return False

        started = time.monotonic()
        poll(promoted, "the sentinels promoting the replica", timeout)
        self.failover_seconds = time.monotonic() - started
        return self.replica

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinel_procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.replica.stop()
        self.primary.stop()


@contextlib.contextmanager
def sentinel_cluster(
    directory: Path, sentinels: int = 3, tls: PKI | None = None
) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(directory, sentinels, tls)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
