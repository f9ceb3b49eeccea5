"""nbdworker/contract/redisconn.py: a redis:// URL gets no TLS options; rediss:// always
verifies the server, with the CA and client certificate from REDIS_TLS_*. A Sentinel URL
(``redis+sentinel://``) is taken apart, refused with a reason when malformed, and turned into
Celery's own Sentinel settings; no client shows a password. (Failover with real sentinels:
tests/worker/test_redis_sentinel.py and tests/e2e/test_redis_sentinel.py.)"""

import ssl

import pytest
import redis
import redis.asyncio

from nbdworker.contract.redisconn import (
    SentinelURL,
    celery_settings,
    connect,
    is_sentinel,
    parse_sentinel_url,
    tls_options,
    uses_tls,
)


def test_plain_url_gets_no_tls_options() -> None:
    assert tls_options("redis://u:p@127.0.0.1:6379/0", {"REDIS_TLS_CA_FILE": "/ca.pem"}) == {}


def test_rediss_url_verifies_the_server_with_the_given_files() -> None:
    env = {
        "REDIS_TLS_CA_FILE": "/etc/ca.pem",
        "REDIS_TLS_CERT_FILE": "/etc/client.pem",
        "REDIS_TLS_KEY_FILE": "/etc/client.key",
    }
    assert tls_options("rediss://u:p@redis.example:6380/0", env) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_certfile": "/etc/client.pem",
        "ssl_keyfile": "/etc/client.key",
    }


def test_rediss_without_files_still_verifies_against_the_system_cas() -> None:
    assert tls_options("rediss://redis.example/0", {}) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


# -- Redis Sentinel URLs ----------------------------------------------------------------------


def test_a_sentinel_url_names_its_sentinels_master_db_and_both_credentials() -> None:
    url = (
        "redis+sentinel://nbdweb:p%40ss%2Fword@s1.example:26380,s2.example,[::1]:26381"
        "/primary-set/3?sentinel_password=s%26cret&sentinel_username=watcher"
    )
    assert is_sentinel(url) and not uses_tls(url)
    assert parse_sentinel_url(url) == SentinelURL(
        sentinels=(("s1.example", 26380), ("s2.example", 26379), ("::1", 26381)),
        master="primary-set",
        db=3,
        username="nbdweb",
        password="p@ss/word",
        sentinel_username="watcher",
        sentinel_password="s&cret",
        tls=False,
    )


def test_a_sentinel_url_without_credentials_or_db_uses_db_0() -> None:
    target = parse_sentinel_url("redis+sentinel://10.0.0.1/mymaster")
    assert (target.sentinels, target.master, target.db) == ((("10.0.0.1", 26379),), "mymaster", 0)
    assert target.username is target.password is target.sentinel_password is None


def test_rediss_sentinel_turns_tls_on_for_sentinels_and_data_nodes() -> None:
    url = "rediss+sentinel://:pw@s1:26379/mymaster/0"
    assert uses_tls(url) and parse_sentinel_url(url).tls
    env = {"REDIS_TLS_CA_FILE": "/etc/ca.pem"}
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert tls_options(url, env) == expected
    celery = celery_settings(url, env)
    assert celery["broker_use_ssl"] == celery["redis_backend_use_ssl"] == tls_options(url, env)
    sentinel_kwargs = celery["broker_transport_options"]["sentinel_kwargs"]
    assert sentinel_kwargs["ssl"] is True and sentinel_kwargs["ssl_ca_certs"] == "/etc/ca.pem"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "path is /<master name>"),
        ("redis+sentinel://s1:26379/m/0/extra", "path is /<master name>"),
        ("redis+sentinel://s1:26379/m/zero", "database of a Sentinel URL is a number"),
        ("redis+sentinel://:pw@/m/0", "at least one sentinel"),
        ("redis+sentinel://s1:port/m", "bad sentinel address"),
        ("redis+sentinel://s1:99999/m", "bad sentinel port"),
        ("redis+sentinel://s1:\u00b2/m", "bad sentinel address"),
        ("redis+sentinel://s1/m/\u0663", "database of a Sentinel URL is a number"),
        ("redis+sentinel://s1/m?socket_timeout=1", "unknown Sentinel URL options"),
        ("redis://s1/0", "not a Sentinel URL"),
    ],
)
def test_a_bad_sentinel_url_is_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)


def test_a_bad_sentinel_url_never_echoes_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url("redis+sentinel://:hunter2@s1:bad/m")
    assert "hunter2" not in str(caught.value)


def test_celery_gets_kombus_sentinel_form_with_the_master_in_the_transport_options() -> None:
    url = "redis+sentinel://nbdweb:p%40ss@s1:26380,[fd00::2]/mymaster/2?sentinel_password=sp"
    celery = celery_settings(url, {})
    joined = "sentinel://nbdweb:p%40ss@s1:26380/2;sentinel://nbdweb:p%40ss@[fd00::2]:26379/2"
    assert celery["broker_url"] == celery["result_backend"] == joined
    for options in ("broker_transport_options", "result_backend_transport_options"):
        assert celery[options]["master_name"] == "mymaster"
        credentials = celery[options]["sentinel_kwargs"]["credential_provider"]
        assert credentials.get_credentials() == ("sp",)
    # Celery's Sentinel result backend takes the user from this setting, not from the URL.
    assert celery["redis_username"] == "nbdweb"
    assert "broker_use_ssl" not in celery


def test_celery_gets_a_plain_url_as_it_is() -> None:
    url = "rediss://u:p@redis.example:6380/0"
    celery = celery_settings(url, {})
    assert celery["broker_url"] == celery["result_backend"] == url
    assert celery["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert "broker_transport_options" not in celery


def test_clients_never_show_a_password_in_their_repr() -> None:
    """redis-py prints a pool's options in errors that get logged (a Sentinel finding no
    primary lists every sentinel client): the passwords go in a credential provider."""
    direct = connect(redis, "redis://nbdweb:data-secret@127.0.0.1:1/0")
    assert "data-secret" not in repr(direct)
    assert direct.connection_pool.connection_kwargs["credential_provider"].get_credentials() == (
        "nbdweb",
        "data-secret",
    )
    sentinel_url = "redis+sentinel://:data-secret@127.0.0.1:1/m/0?sentinel_password=s-secret"
    for module in (redis, redis.asyncio):
        client = connect(module, sentinel_url)
        pool = client.connection_pool
        sentinels = pool.connection_kwargs  # the data nodes' options
        assert "data-secret" not in repr(sentinels)
        for sentinel in pool.sentinel_manager.sentinels:
            assert "s-secret" not in repr(sentinel)
        assert "secret" not in repr(client)


def test_a_sentinel_client_finding_no_primary_says_so_without_passwords() -> None:
    url = "redis+sentinel://:data-secret@127.0.0.1:1/m/0?sentinel_password=s-secret"
    client = connect(redis, url, socket_connect_timeout=1)
    with pytest.raises(redis.sentinel.MasterNotFoundError) as caught:
        client.ping()
    assert "No master found for 'm'" in str(caught.value)
    assert "secret" not in str(caught.value)


# A generated password often holds "/" (base64), "?" or "#"; unencoded, it ends the URL's
# authority early and its tail would be read (and quoted) as a host, a master or an option.
UNENCODED_PASSWORDS = [
    "redis+sentinel://:s3cr/et-tail@s1/m",
    "redis+sentinel://:s3cr#et-tail@s1/m",
    "redis+sentinel://:s3cr?et-tail@s1/m",
    "redis+sentinel://nbdweb:12/s3cret-tail@s1/3",  # would parse: sentinel nbdweb:12, master ..@s1
    "redis+sentinel://:s3c@r/et-tail@s1/m",
]


@pytest.mark.parametrize("url", UNENCODED_PASSWORDS)
def test_an_unencoded_password_is_refused_without_quoting_any_of_it(url: str) -> None:
    with pytest.raises(ValueError, match="percent-encode") as caught:
        parse_sentinel_url(url)
    assert "s3c" not in str(caught.value) and "tail" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        *UNENCODED_PASSWORDS,
        "redis://:s3cr/et-tail@127.0.0.1:6379/0",
        "redis://:s3cr#et-tail@127.0.0.1:6379/0",
        "rediss://nbdweb:s3cr?et-tail@127.0.0.1:6379/0",
    ],
)
def test_no_client_is_built_for_an_unencoded_password_and_the_error_quotes_none(url: str) -> None:
    for module in (redis, redis.asyncio):
        with pytest.raises(ValueError, match="percent-encode") as caught:
            connect(module, url)
        assert "s3c" not in str(caught.value) and "tail" not in str(caught.value)
    with pytest.raises(ValueError, match="percent-encode"):
        celery_settings(url)


def test_an_ipv6_sentinel_without_its_closing_bracket_is_refused() -> None:
    with pytest.raises(ValueError, match="without ']'"):
        parse_sentinel_url("redis+sentinel://[::1/m")
