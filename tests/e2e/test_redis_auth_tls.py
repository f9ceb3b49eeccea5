"""Redis with an ACL user, `requirepass` and TLS only (client certificates required), end to
end: `make run` (scripts/runstack.py) given a ``rediss://user:password@`` URL and the REDIS_TLS_*
files uses that Redis (no private one), the web side publishes to it and reads worker status
from it, Celery takes its jobs through it as broker and result backend, and nbdworker follows
its config from it: an export made through the API is served, and its node shows online."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from nbdworker.contract.entries import entries_key, head_key
from tests.support.livestack import StartedStack, create_api_token, http_status, started_stack
from tests.support.pki import make_pki
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.tools import require_tool

PASSWORD = "acl pass/with:odd@chars"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    pki = make_pki(tmp_path / "pki")
    with private_redis(
        tmp_path / "redis",
        password="default-user-password",
        acl_user=("nbdweb", PASSWORD),
        tls=pki,
        tls_auth_clients="yes",
    ) as server:
        yield server


def test_unauthenticated_and_plaintext_clients_are_refused(tls_redis: PrivateRedis) -> None:
    """What the rest relies on: this Redis really demands TLS, a certificate and a password."""
    assert tls_redis.client().acl_whoami() == "nbdweb"
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls_redis.port, socket_connect_timeout=2).ping()
    no_password = f"rediss://127.0.0.1:{tls_redis.port}/0"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(
            no_password,
            ssl_cert_reqs="required",
            ssl_ca_certs=tls_redis.client_env["REDIS_TLS_CA_FILE"],
            ssl_certfile=tls_redis.client_env["REDIS_TLS_CERT_FILE"],
            ssl_keyfile=tls_redis.client_env["REDIS_TLS_KEY_FILE"],
        ).get("x")


@pytest.fixture
def stack(tmp_path: Path, tls_redis: PrivateRedis) -> Iterator[StartedStack]:
    with started_stack(tmp_path, {"REDIS_URL": tls_redis.url, **tls_redis.client_env}) as running:
        yield running


def test_whole_stack_over_rediss_with_an_acl_user(
    stack: StartedStack, tls_redis: PrivateRedis
) -> None:
    nbdinfo = require_tool("nbdinfo")
    api = f"http://{stack.http}/api/v1/"
    stack.wait_for(lambda: http_status(api) is not None, "the web server answering")
    assert any("redis answers at rediss://nbdweb:***@" in line for line in stack.lines)
    assert not any("private redis-server" in line for line in stack.lines)
    stack.wait_for(lambda: any(" ready." in line for line in stack.lines), "celery ready")

    token = create_api_token(stack.env)
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(
        f"{api}exports/", data=b'{"name": "overtls", "size": "1M"}', headers=headers
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201

    host, port = stack.nbd.rsplit(":", 1)

    def served() -> bool:
        result = subprocess.run(
            [nbdinfo, "--size", f"nbd://{host}:{port}/overtls"], capture_output=True, timeout=20
        )
        return result.returncode == 0 and result.stdout.strip() == b"1048576"

    # Celery ran the create job (broker and result backend over TLS), published the config,
    # and nbdworker (following Redis over TLS) serves the export.
    stack.wait_for(served, "the export served by nbdworker")

    def node_online() -> bool:
        request = urllib.request.Request(f"{api}nodes/", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.load(response)["results"]
        return any(node.get("status", {}).get("status") == "online" for node in nodes)

    # The web side reads nbdworker's heartbeat from the same Redis.
    stack.wait_for(node_online, "the node shown online")
    # The config went out as per-export entries under their signed head, over TLS.
    assert tls_redis.client().exists(head_key("default"), entries_key("default")) == 2
    assert not any(PASSWORD in line for line in stack.lines), "the Redis password was logged"
