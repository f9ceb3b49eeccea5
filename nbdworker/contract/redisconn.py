"""How every nbdweb process connects to Redis: `REDIS_URL` and, for ``rediss://``, TLS files.

One rule for the web side (publishing, worker status), Celery (broker and result backend) and
nbdworker (config source, heartbeat): the URL carries the ACL user and password
(``redis://user:password@host:6379/0``; a password alone authenticates as ``default``), and a
``rediss://`` URL turns TLS on, verifying the server against ``REDIS_TLS_CA_FILE`` (the system's
CAs when unset), with a client certificate from ``REDIS_TLS_CERT_FILE`` / ``REDIS_TLS_KEY_FILE``
when Redis asks for one (its ``tls-auth-clients``). Standard library only.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["TLS_ENV", "tls_options", "uses_tls"]

# Environment variable → the redis-py / kombu / Celery SSL option it sets.
TLS_ENV = {
    "REDIS_TLS_CA_FILE": "ssl_ca_certs",
    "REDIS_TLS_CERT_FILE": "ssl_certfile",
    "REDIS_TLS_KEY_FILE": "ssl_keyfile",
}


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme == "rediss"


def tls_options(url: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The SSL keyword arguments for `url`: `{}` unless it is ``rediss://``.

    The same keys suit `redis.Redis.from_url(url, **options)` (sync and asyncio) and Celery's
    `broker_use_ssl` / `redis_backend_use_ssl`. The server's certificate is always verified.
    """
    if not uses_tls(url):
        return {}
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    for variable, option in TLS_ENV.items():
        if env.get(variable):
            options[option] = env[variable]
    return options
