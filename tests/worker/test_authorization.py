"""nbdworker.auth: client identity from certificates, and per-export authorization."""

from __future__ import annotations

import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from nbdworker.auth import (
    ClientIdentity,
    ExportAuthorizer,
    authorize_export,
    client_matches,
    peer_ip,
)
from nbdworker.contract.config import ClientMatch, ExportConfig
from nbdworker.protocol import ExportView, TransmissionFlag
from tests.support import pki as pkimod
from tests.support.pki import PKI, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def identity(pki: PKI, name: str) -> ClientIdentity:
    return ClientIdentity.from_der(pki.clients[name].der)


def export(**kwargs) -> ExportConfig:
    return ExportConfig.from_dict({"name": "a", "backend": "memory", "size": 4096, **kwargs}, "e")


def rule(**kwargs) -> ClientMatch:
    return ClientMatch.from_dict(kwargs, "rule")


def view(name: str = "a") -> ExportView:
    return ExportView(name=name, description="", size=4096, flags=TransmissionFlag.HAS_FLAGS)


# -- identity -------------------------------------------------------------------------------------


def test_identity_fingerprint_and_serial_agree_with_openssl(pki: PKI) -> None:
    path = pki.client_dir("alice") / "client-cert.pem"
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-fingerprint", "-sha256", "-serial"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines())
    ident = identity(pki, "alice")
    fingerprint = next(v for k, v in fields.items() if "Fingerprint" in k)
    assert ident.fingerprint_sha256 == fingerprint.replace(":", "").lower()
    assert ident.serial == fields["serial"].lower().lstrip("0")


def test_identity_reads_common_name_and_every_san_kind(pki: PKI) -> None:
    ident = identity(pki, "alice")
    assert ident.common_names == ("alice",)
    assert ident.dns_names == ("alice.clients.example",)
    assert ident.emails == ("alice@example.com",)
    assert ident.uris == ("spiffe://nbdweb.test/alice",)
    server = ClientIdentity.from_der(pki.server.der)
    assert [str(ip) for ip in server.ip_addresses] == ["127.0.0.1", "::1"]


def test_identity_of_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        ClientIdentity.from_der(b"\x30\x03\x02\x01\x00")


# -- matching rules -------------------------------------------------------------------------------


def test_fingerprint_rule_matches_in_display_form(pki: PKI) -> None:
    fp = identity(pki, "alice").fingerprint_sha256
    display = ":".join(fp.upper()[i : i + 2] for i in range(0, 64, 2))
    assert client_matches(rule(fingerprint_sha256=display), identity(pki, "alice"))
    assert not client_matches(rule(fingerprint_sha256=display), identity(pki, "bob"))


def test_common_name_rule_is_exact(pki: PKI) -> None:
    assert client_matches(rule(common_name="alice"), identity(pki, "alice"))
    assert not client_matches(rule(common_name="alic"), identity(pki, "alice"))
    assert not client_matches(rule(common_name="CN=alice"), identity(pki, "alice"))
    # A CN rule looks at the subject only, never at the SANs.
    assert not client_matches(rule(common_name="alice.clients.example"), identity(pki, "alice"))


def test_common_name_rule_ignores_the_order_of_the_distinguished_name(pki: PKI) -> None:
    cn_first = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "dave"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc."),
        ]
    )
    cn_last = x509.Name(list(reversed(list(cn_first))))
    for subject in (cn_first, cn_last):
        cred = pkimod._issue(pki.ca, subject, server=False)
        assert client_matches(rule(common_name="dave"), ClientIdentity.from_der(cred.der))


@pytest.mark.parametrize(
    "san",
    [
        "DNS:alice.clients.example",
        "dns:ALICE.Clients.Example",
        "alice.clients.example",
        "email:alice@EXAMPLE.com",
        "alice@example.com",
        "URI:spiffe://nbdweb.test/alice",
        "spiffe://nbdweb.test/alice",
    ],
)
def test_san_rule_matches_the_parsed_entry(pki: PKI, san: str) -> None:
    assert client_matches(rule(san=san), identity(pki, "alice"))
    assert not client_matches(rule(san=san), identity(pki, "bob"))


@pytest.mark.parametrize(
    "san", ["IP:127.0.0.1", "IP Address:127.0.0.1", "127.0.0.1", "IP:::1", "::ffff:127.0.0.1"]
)
def test_san_rule_matches_ip_addresses_by_value(pki: PKI, san: str) -> None:
    assert client_matches(rule(san=san), ClientIdentity.from_der(pki.server.der))


def test_san_rule_of_one_kind_does_not_match_another(pki: PKI) -> None:
    ident = identity(pki, "alice")
    assert not client_matches(rule(san="URI:alice.clients.example"), ident)
    assert not client_matches(rule(san="email:alice.clients.example"), ident)
    assert not client_matches(rule(san="DNS:alice@example.com"), ident)
    # The subject CN is not a SAN.
    assert not client_matches(rule(san="alice"), ident)


def test_san_rule_does_not_expand_wildcards(pki: PKI) -> None:
    assert not client_matches(rule(san="DNS:*.clients.example"), identity(pki, "alice"))


# -- the authorization decision -------------------------------------------------------------------


def test_export_without_rules_admits_anyone(pki: PKI) -> None:
    assert authorize_export(export(), None, None) is None
    assert authorize_export(export(), "192.0.2.1", identity(pki, "mallory")) is None


def test_allowed_clients_admit_any_matching_rule(pki: PKI) -> None:
    e = export(allowed_clients=[{"common_name": "bob"}, {"san": "DNS:alice.clients.example"}])
    assert authorize_export(e, "127.0.0.1", identity(pki, "alice")) is None
    assert authorize_export(e, "127.0.0.1", identity(pki, "bob")) is None
    assert "none of the export's allowed clients" in authorize_export(
        e, "127.0.0.1", identity(pki, "carol")
    )


def test_allowed_clients_refuse_a_client_without_certificate() -> None:
    e = export(allowed_clients=[{"common_name": "bob"}])
    assert "no client certificate" in authorize_export(e, "127.0.0.1", None)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("::ffff:10.1.0.9", True),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        (None, False),
    ],
)
def test_allowed_networks_check_the_peer_address(address: str | None, allowed: bool) -> None:
    e = export(allowed_networks=["10.1.0.0/16", "2001:db8::/32"])
    assert (authorize_export(e, address, None) is None) is allowed


def test_networks_and_clients_must_both_admit(pki: PKI) -> None:
    e = export(allowed_networks=["127.0.0.0/8"], allowed_clients=[{"common_name": "alice"}])
    assert authorize_export(e, "127.0.0.1", identity(pki, "alice")) is None
    assert authorize_export(e, "192.0.2.1", identity(pki, "alice")) is not None
    assert authorize_export(e, "127.0.0.1", identity(pki, "bob")) is not None


@pytest.mark.parametrize(
    ("peername", "ip"),
    [
        (("127.0.0.1", 5555), "127.0.0.1"),
        (("::1", 5555, 0, 0), "::1"),
        (("::ffff:192.0.2.7", 5555, 0, 0), "192.0.2.7"),
        (("fe80::1%eth0", 5555, 0, 2), "fe80::1"),
        ("", None),
        (None, None),
    ],
)
def test_peer_ip_from_transport_peername(peername, ip) -> None:
    assert peer_ip(peername) == ip


# -- the per-connection callback ------------------------------------------------------------------


def test_authorizer_uses_the_identity_set_after_tls(pki: PKI) -> None:
    exports = {"a": export(allowed_clients=[{"common_name": "alice"}])}
    auth = ExportAuthorizer(exports.get, ("127.0.0.1", 4242))
    assert auth(view("a")) is not None
    auth.identity = identity(pki, "alice")
    assert auth(view("a")) is None


def test_authorizer_refuses_an_export_missing_from_its_config() -> None:
    auth = ExportAuthorizer({}.get, ("127.0.0.1", 4242))
    assert auth(view("gone")) == "export is not configured"


def test_authorizer_describes_the_client_by_address_and_certificate(pki: PKI) -> None:
    auth = ExportAuthorizer({}.get, ("192.0.2.9", 4242))
    assert auth.describe() == "192.0.2.9:4242 [no certificate]"
    auth.identity = identity(pki, "bob")
    text = auth.describe()
    assert text.startswith("192.0.2.9:4242 [CN=bob ")
    assert f"serial={pki.clients['bob'].serial_hex}" in text
    assert ExportAuthorizer({}.get, ("::1", 7, 0, 0)).describe().startswith("[::1]:7 ")
