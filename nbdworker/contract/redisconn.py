"""How every nbdweb process connects to Redis: `REDIS_URL` and, for TLS, the REDIS_TLS_* files.

One rule for the web side (publishing, worker status, events), Celery (broker and result
backend) and nbdworker (config source, heartbeat). `REDIS_URL` is either

* one Redis: ``redis://[user:password@]host:6379/<db>``, or ``rediss://`` for TLS; or
* Redis Sentinel: ``redis+sentinel://[user:password@]host1[:26379][,host2[:port]...]/<master>[/<db>]``
  (``rediss+sentinel://`` for TLS to the sentinels and to the data nodes), the form of the
  Redis-Sentinel-Url package that other Redis clients read too. The sentinels are asked which
  server is the primary of `<master>`, and asked again whenever a connection to it fails, so
  every client follows a failover. The user and password are the data nodes' (a password alone
  authenticates as ``default``); sentinels that want a password of their own (their
  ``requirepass``) get ``?sentinel_password=...`` (and ``sentinel_username=...``).

A "/", "?", "#" or "@" in a user or password is percent-encoded, as in any URL: a URL with an
"@" after its host list is refused (it would otherwise split inside the password and show its
tail in errors as a host, a master's name or an option).

With TLS the server is always verified, against ``REDIS_TLS_CA_FILE`` (the system's CAs when
unset), and a client certificate is presented from ``REDIS_TLS_CERT_FILE`` /
``REDIS_TLS_KEY_FILE`` when Redis asks for one (its ``tls-auth-clients``).

Standard library only (the web side imports it): `connect` is handed the redis-py module to
build with, `redis` or `redis.asyncio`, whose `Redis` and `Sentinel` have the same interface.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

__all__ = [
    "SENTINEL_SCHEMES",
    "TLS_ENV",
    "RedisCredentials",
    "SentinelURL",
    "celery_settings",
    "check_url",
    "connect",
    "is_sentinel",
    "parse_sentinel_url",
    "tls_options",
    "uses_tls",
]

# Environment variable → the redis-py / kombu / Celery SSL option it sets.
TLS_ENV = {
    "REDIS_TLS_CA_FILE": "ssl_ca_certs",
    "REDIS_TLS_CERT_FILE": "ssl_certfile",
    "REDIS_TLS_KEY_FILE": "ssl_keyfile",
}

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme → TLS
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_QUERY_KEYS = {"sentinel_username", "sentinel_password"}
# Seconds a sentinel gets to answer unless the caller sets its own socket timeouts: a dead or
# black-holed sentinel is skipped for the next one instead of holding the client.
SENTINEL_TIMEOUT = 2.0


@dataclass(frozen=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL, taken apart."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None
    sentinel_username: str | None
    sentinel_password: str | None
    tls: bool


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def is_sentinel(url: str) -> bool:
    return _scheme(url) in SENTINEL_SCHEMES


def uses_tls(url: str) -> bool:
    scheme = _scheme(url)
    return scheme == "rediss" or SENTINEL_SCHEMES.get(scheme, False)


# A user or password with an unencoded "/", "?" or "#" ends the URL's authority early: the rest
# of it lands in the host list, the path or the query, where an error message would quote it.
_UNENCODED_USERINFO = (
    "an '@' after the host list: percent-encode '/', '?', '#' and '@' in the user, the password "
    "and the query (%2F, %3F, %23, %40)"
)


def _refuse_misplaced_at(url: str) -> None:
    """ValueError (quoting nothing) when an '@' follows the authority: most likely a password
    with an unencoded '/', '?' or '#', whose tail would otherwise be taken for a host, a master
    name, a database or an option, and shown in errors and logs."""
    rest = url.partition("://")[2]
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    if "@" in rest[authority_end:]:
        raise ValueError(f"malformed Redis URL: {_UNENCODED_USERINFO}")


def check_url(url: str) -> None:
    """ValueError, never quoting a password, when `url` is not a usable REDIS_URL: the same
    checks every client's `connect` makes, for a process to refuse a bad setting at start."""
    _refuse_misplaced_at(url)
    if is_sentinel(url):
        parse_sentinel_url(url)


def _host_port(member: str) -> tuple[str, int]:
    if member.startswith("["):  # [IPv6]:port
        host, bracket, rest = member[1:].partition("]")
        if not bracket:
            raise ValueError(f"bad sentinel address {member!r} (an IPv6 address without ']')")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = member.partition(":")
    if not host or (port_text and not (port_text.isascii() and port_text.isdigit())):
        raise ValueError(f"bad sentinel address {member!r} (host[:port])")
    port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
    if not 0 < port < 65536:
        raise ValueError(f"bad sentinel port in {member!r}")
    return host, port


def parse_sentinel_url(url: str) -> SentinelURL:
    """Take a Sentinel URL apart; ValueError says what is wrong with it (never the password)."""
    scheme = _scheme(url)
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: the scheme is {scheme!r}")
    # After this, the user and password are all before the authority's last "@": the host list,
    # path and query that errors quote hold none of them.
    _refuse_misplaced_at(url)
    # urlsplit refuses a host list with an IPv6 member, and its .port a list: split by hand
    # (a password with "/", "?" or "#" in it is percent-encoded, as in any URL).
    rest = url.partition("://")[2].partition("#")[0]
    rest, _, query_text = rest.partition("?")
    netloc, _, path_text = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    if not at:
        credentials = ""
    username = password = None
    if credentials:
        user_text, colon, password_text = credentials.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    sentinels = tuple(_host_port(member) for member in hosts.split(",") if member)
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one sentinel (host[:port],...)")
    path = [unquote(segment) for segment in path_text.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError("a Sentinel URL's path is /<master name>[/<db>]")
    if len(path) == 2 and not (path[1].isascii() and path[1].isdigit()):
        raise ValueError(f"the database of a Sentinel URL is a number, not {path[1]!r}")
    query = parse_qs(query_text, keep_blank_values=True)
    unknown = set(query) - SENTINEL_QUERY_KEYS
    if unknown:
        raise ValueError(f"unknown Sentinel URL options: {', '.join(sorted(unknown))}")
    return SentinelURL(
        sentinels=sentinels,
        master=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username", [None])[-1] or None,
        sentinel_password=query.get("sentinel_password", [None])[-1] or None,
        tls=SENTINEL_SCHEMES[scheme],
    )


def tls_options(url: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The SSL keyword arguments for `url`: `{}` unless it asks for TLS.

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


class RedisCredentials:
    """A user and password for redis-py's `credential_provider` option.

    Given as a password, redis-py prints it in its clients' and pools' reprs, and those end up
    in logged errors (a Sentinel that finds no primary lists every sentinel client it asked).
    Given as this object, the repr says nothing."""

    def __init__(self, username: str | None, password: str) -> None:
        self._username = username
        self._password = password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        if self._username:
            return (self._username, self._password)
        return (self._password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()

    def __repr__(self) -> str:
        return "<RedisCredentials (hidden)>"


def _credentials(username: str | None, password: str | None) -> dict[str, Any]:
    """redis-py's keyword arguments for these credentials (none without a password)."""
    if password is None:
        return {"username": username} if username else {}
    return {"credential_provider": RedisCredentials(username, password)}


def _split_credentials(url: str) -> tuple[str, dict[str, Any]]:
    """A redis:// or rediss:// URL without its user and password, and those as redis-py
    keyword arguments."""
    parts = urlsplit(url)
    _credentials_text, at, host = parts.netloc.rpartition("@")
    if not at or parts.password is None:
        return url, {}
    username = unquote(parts.username or "") or None
    return urlunsplit(parts._replace(netloc=host)), _credentials(username, unquote(parts.password))


def _sentinel_kwargs(target: SentinelURL, tls: dict[str, Any], options: dict[str, Any]) -> dict:
    """How to talk to the sentinels themselves: their own credentials, the data nodes' TLS
    files, and the caller's timeouts (a dead sentinel must not hold a request)."""
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "socket_timeout": SENTINEL_TIMEOUT,
    }
    kwargs.update((k, v) for k, v in options.items() if k.startswith("socket_"))
    kwargs.update(_credentials(target.sentinel_username, target.sentinel_password))
    if target.tls:
        kwargs.update(ssl=True, **tls)
    return kwargs


def connect(
    redis_module: ModuleType, url: str, environ: Mapping[str, str] | None = None, **options: Any
) -> Any:
    """A client of `redis_module` (`redis` or `redis.asyncio`) for `url`, with `options`
    (timeouts, decode_responses) for every connection. With a Sentinel URL its pool asks the
    sentinels for the primary on each new connection, so it follows a failover by itself."""
    tls = tls_options(url, environ)
    _refuse_misplaced_at(url)
    if not is_sentinel(url):
        bare_url, credentials = _split_credentials(url)
        return redis_module.Redis.from_url(bare_url, **credentials, **tls, **options)
    target = parse_sentinel_url(url)
    sentinel = redis_module.Sentinel(
        list(target.sentinels),
        sentinel_kwargs=_sentinel_kwargs(target, tls, options),
        **_credentials(target.username, target.password),
        db=target.db,
        **({"ssl": True, **tls} if target.tls else {}),
        **options,
    )
    return sentinel.master_for(target.master)


def celery_settings(url: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Celery's settings (lower-case names, without the ``CELERY_`` prefix) for `url`.

    A Sentinel URL becomes kombu's and Celery's own form, one ``sentinel://`` URL per sentinel
    joined by ``;`` with the master's name in the transport options: the same sentinels,
    credentials and TLS as every other client."""
    tls = tls_options(url, environ)
    _refuse_misplaced_at(url)
    settings: dict[str, Any] = {"broker_url": url, "result_backend": url}
    if not is_sentinel(url):
        if tls:
            settings["broker_use_ssl"] = settings["redis_backend_use_ssl"] = tls
        return settings
    target = parse_sentinel_url(url)
    userinfo = ""
    if target.password is not None:
        userinfo = f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"
    elif target.username:
        userinfo = f"{quote(target.username, safe='')}@"
    joined = ";".join(
        f"sentinel://{userinfo}{f'[{host}]' if ':' in host else host}:{port}/{target.db}"
        for host, port in target.sentinels
    )
    transport = {
        "master_name": target.master,
        "sentinel_kwargs": _sentinel_kwargs(target, tls, {}),
    }
    settings.update(
        broker_url=joined,
        result_backend=joined,
        broker_transport_options=transport,
        result_backend_transport_options=dict(transport),
    )
    if target.username:
        # Celery's Sentinel result backend reads the password from the URL but not the user.
        settings["redis_username"] = target.username
    if tls:
        settings["broker_use_ssl"] = settings["redis_backend_use_ssl"] = tls
    return settings
