"""A private redis-server for a test: its own port and directory, stopped and restarted at will.

The machine's shared Redis (6379) is never touched. Persistence is on (append-only file in the
test's directory), so a restart keeps the data as a production Redis would.

    with private_redis(tmp_path) as r:
        r.url            # redis://127.0.0.1:<port>/0
        r.stop(); r.start()

With `password=` the default user needs it (`requirepass`); with `acl_user=(name, password)`
that ACL user exists too (admin commands denied) and `url` names it; with `tls=` (a
tests.support.pki.PKI) it listens with TLS only, `url` is ``rediss://`` and `client_env` holds
the REDIS_TLS_* files a client needs (`tls_auth_clients`: Redis's "yes", "optional" or "no").
`extra_args` go on redis-server's command line as they are (e.g. ``--replicaof``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
import redis

from nbdworker.contract.redisconn import tls_options

if TYPE_CHECKING:
    from tests.support.pki import PKI

__all__ = ["PrivateRedis", "free_port", "private_redis"]

START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        acl_user: tuple[str, str] | None = None,
        tls: PKI | None = None,
        tls_auth_clients: str = "optional",
        extra_args: list[str] | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server")
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.acl_user = acl_user
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        if self.acl_user:
            credentials = f"{quote(self.acl_user[0])}:{quote(self.acl_user[1], safe='')}@"
        elif self.password:
            credentials = f":{quote(self.password, safe='')}@"
        else:
            credentials = ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}/0"

    @property
    def client_env(self) -> dict[str, str]:
        """REDIS_TLS_* for a client of this server (empty without TLS)."""
        if self.tls is None:
            return {}
        client = self.tls.client_dir("alice")
        return {
            "REDIS_TLS_CA_FILE": str(client / "ca-cert.pem"),
            "REDIS_TLS_CERT_FILE": str(client / "client-cert.pem"),
            "REDIS_TLS_KEY_FILE": str(client / "client-key.pem"),
        }

    def client(self) -> redis.Redis:
        if not (self.password or self.acl_user or self.tls):
            return redis.Redis(port=self.port, socket_connect_timeout=1, decode_responses=True)
        return redis.Redis.from_url(
            self.url,
            socket_connect_timeout=1,
            decode_responses=True,
            **tls_options(self.url, self.client_env),
        )

    def _argv(self) -> list[str]:
        argv = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.directory)]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        if self.tls:
            server = self.tls.server_dir
            argv += ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(server / "server-cert.pem")]
            argv += ["--tls-key-file", str(server / "server-key.pem")]
            argv += ["--tls-ca-cert-file", str(server / "ca-cert.pem")]
            argv += ["--tls-auth-clients", self.tls_auth_clients]
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.acl_user:
            name, password = self.acl_user
            argv += ["--user", name, "on", f">{password}", "~*", "&*", "+@all", "-@admin"]
        return argv + self.extra_args

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        client = self.client()
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.AuthenticationError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def private_redis(directory: Path, **options: Any) -> Iterator[PrivateRedis]:
    server = PrivateRedis(directory, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
