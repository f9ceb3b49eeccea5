"""nbdworker/contract/redisconn.py: a redis:// URL gets no TLS options; rediss:// always
verifies the server, with the CA and client certificate from REDIS_TLS_*."""

import ssl

from nbdworker.contract.redisconn import tls_options


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
