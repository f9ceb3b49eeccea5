"""/api/v1/authorities/ and /api/v1/certificates/: the CA, chains checked with cryptography
and openssl, revocation, bundles, and keys encrypted at rest."""

import io
import subprocess
import tarfile
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.db import connection

from exports_app.choices import TLSMode
from exports_app.models import Certificate, CertificateAuthority, Export
from exports_app.services import ca
from exports_app.services.keystore import KeyDecryptionError
from nbdworker.contract.x509 import verify_issued_by

pytestmark = pytest.mark.django_db

CAS = "/api/v1/authorities/"
CERTS = "/api/v1/certificates/"


def _load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def openssl_verify(
    tmp_path, ca_pem: str, cert_pem: str, *extra: str
) -> subprocess.CompletedProcess:
    (tmp_path / "ca.pem").write_text(ca_pem)
    (tmp_path / "cert.pem").write_text(cert_pem)
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "ca.pem"),
            *extra,
            str(tmp_path / "cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def external_ca(key=None) -> tuple[str, str]:
    """A CA made outside nbdweb, as PEM (certificate, key)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "External CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


# -- authorities -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "key_type"),
    [("ec-p256", ec.EllipticCurvePublicKey), ("rsa-3072", rsa.RSAPublicKey)],
)
def test_create_internal_ca(api, tmp_path, algorithm, key_type):
    response = api.post(
        CAS,
        {"name": "root", "common_name": "Lab CA", "key_algorithm": algorithm, "validity_days": 30},
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["has_private_key"] is True and body["is_imported"] is False
    assert "private_key_pem" not in body
    cert = _load(body["certificate_pem"])
    assert isinstance(cert.public_key(), key_type)
    if key_type is rsa.RSAPublicKey:
        assert cert.public_key().key_size == 3072
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert body["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert body["serial"] == format(cert.serial_number, "x")
    assert (
        openssl_verify(tmp_path, body["certificate_pem"], body["certificate_pem"]).returncode == 0
    )


def test_import_external_ca_with_and_without_key(api):
    cert_pem, _ = external_ca()
    response = api.post(CAS, {"name": "ext", "certificate_pem": cert_pem})
    assert response.status_code == 201, response.content
    assert response.json()["has_private_key"] is False
    assert response.json()["is_imported"] is True
    # Without its key the CA cannot issue.
    response = api.post(CERTS, {"authority": response.json()["id"], "common_name": "x"})
    assert response.status_code == 400
    assert "authority" in response.json()

    cert2, key2 = external_ca()
    response = api.post(CAS, {"name": "ext2", "certificate_pem": cert2, "private_key_pem": key2})
    assert response.status_code == 201, response.content
    assert response.json()["has_private_key"] is True
    response = api.post(CERTS, {"authority": response.json()["id"], "common_name": "bob"})
    assert response.status_code == 201
    assert verify_issued_by(_load(response.json()["certificate_pem"]), _load(cert2))


def _leaf_pem(authority) -> str:
    return ca.issue_certificate(authority, "client", "leaf", name="leaf").certificate_pem


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "x"}, "non_field_errors"),
        ({"name": "x", "common_name": "a", "certificate_pem": "EXT"}, "non_field_errors"),
        ({"common_name": "a"}, "name"),
        ({"name": "x", "common_name": "a", "key_algorithm": "dsa"}, "key_algorithm"),
        ({"name": "x", "common_name": "a", "validity_days": 0}, "validity_days"),
        ({"name": "x", "common_name": "a\x01b"}, "common_name"),
        ({"name": "x", "common_name": "a", "validity_days": 99999}, "validity_days"),
        ({"name": "x", "common_name": "a", "private_key_pem": "KEY"}, "private_key_pem"),
        ({"name": "x", "certificate_pem": "garbage"}, "certificate_pem"),
        (
            {
                "name": "x",
                "certificate_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            },
            "certificate_pem",
        ),
        ({"name": "x", "certificate_pem": "LEAF"}, "certificate_pem"),
        ({"name": "x", "certificate_pem": "EXT", "private_key_pem": "OTHERKEY"}, "private_key_pem"),
        (
            {"name": "x", "certificate_pem": "EXT", "private_key_pem": "not a key"},
            "private_key_pem",
        ),
        (
            {
                "name": "x",
                "certificate_pem": "EXT",
                "private_key_pem": "-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n",
            },
            "private_key_pem",
        ),
        ({"name": "x", "certificate_pem": "EXT+EXT"}, "certificate_pem"),
        ({"name": "test-ca", "common_name": "dup"}, "name"),
        ({"name": "x", "certificate_pem": "OURS"}, "certificate_pem"),
    ],
)
def test_bad_authority_is_a_400(api, authority, payload, field):
    ext_cert, ext_key = external_ca()
    _, other_key = external_ca()
    values = {
        "EXT": ext_cert,
        "KEY": ext_key,
        "OTHERKEY": other_key,
        "LEAF": _leaf_pem(authority),
        "EXT+EXT": ext_cert + ext_cert,
        "OURS": authority.certificate_pem,
    }
    payload = {k: values.get(v, v) if isinstance(v, str) else v for k, v in payload.items()}
    before = CertificateAuthority.objects.count()
    response = api.post(CAS, payload)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert CertificateAuthority.objects.count() == before


def test_authority_patch_only_renames(api, authority):
    url = f"{CAS}{authority.pk}/"
    assert api.patch(url, {"description": "lab"}).status_code == 200
    response = api.patch(url, {"common_name": "other"})
    assert response.status_code == 400
    assert api.delete(url).status_code == 204


def test_authority_with_certificates_cannot_be_deleted(api, client_certificate):
    assert api.delete(f"{CAS}{client_certificate.authority_id}/").status_code == 409


# -- issuing -----------------------------------------------------------------------------------


def test_issue_server_certificate_chains_to_its_ca(api, authority, tmp_path):
    response = api.post(
        CERTS,
        {
            "kind": "server",
            "authority": authority.pk,
            "common_name": "nbd.example",
            "dns_names": ["nbd.example", "localhost"],
            "ip_addresses": ["127.0.0.1", "::1"],
            "validity_days": 90,
        },
    )
    assert response.status_code == 201, response.content
    body = response.json()
    cert, ca_cert = _load(body["certificate_pem"]), _load(authority.certificate_pem)
    cert.verify_directly_issued_by(ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nbd.example", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (89, 90)
    result = openssl_verify(
        tmp_path,
        authority.certificate_pem,
        body["certificate_pem"],
        "-purpose",
        "sslserver",
        "-verify_ip",
        "127.0.0.1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")
    result = openssl_verify(
        tmp_path, authority.certificate_pem, body["certificate_pem"], "-purpose", "sslclient"
    )
    assert result.returncode != 0  # a server certificate is not a client one


def test_issue_client_certificate_chains_to_its_ca(api, authority, tmp_path):
    response = api.post(CERTS, {"authority": authority.pk, "common_name": "alice"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["kind"] == "client"
    assert body["bundle_url"].endswith(f"/api/v1/certificates/{body['id']}/bundle/")
    cert = _load(body["certificate_pem"])
    cert.verify_directly_issued_by(_load(authority.certificate_pem))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    result = openssl_verify(
        tmp_path, authority.certificate_pem, body["certificate_pem"], "-purpose", "sslclient"
    )
    assert result.returncode == 0, result.stderr


def test_certificate_from_rsa_ca_verifies(api, tmp_path):
    authority = ca.create_authority("rsa", "RSA CA", "rsa-3072")
    body = api.post(
        CERTS, {"authority": authority.pk, "common_name": "r", "key_algorithm": "rsa-3072"}
    ).json()
    assert (
        openssl_verify(tmp_path, authority.certificate_pem, body["certificate_pem"]).returncode == 0
    )


def test_certificate_does_not_chain_to_another_ca(authority, client_certificate, tmp_path):
    other = ca.create_authority("other", "Other CA")
    assert not verify_issued_by(
        _load(client_certificate.certificate_pem), _load(other.certificate_pem)
    )
    assert (
        openssl_verify(
            tmp_path, other.certificate_pem, client_certificate.certificate_pem
        ).returncode
        != 0
    )


def test_server_certificate_without_sans_gets_its_cn(authority):
    cert = ca.issue_certificate(authority, "server", "host.example", name="h")
    assert cert.dns_names == ["host.example"]
    cert = ca.issue_certificate(authority, "server", "10.0.0.1", name="ip")
    assert cert.ip_addresses == ["10.0.0.1"]


def test_leaf_never_outlives_its_ca(db):
    short = ca.create_authority("short", "Short CA", validity_days=10)
    cert = ca.issue_certificate(short, "client", "c", validity_days=365)
    assert cert.not_after <= short.not_after


def test_import_server_certificate_with_key(api, authority):
    issued = ca.issue_certificate(authority, "server", "imp", name="tmp")
    cert_pem, key_pem = issued.certificate_pem, issued.private_key_pem()
    issued.delete()
    response = api.post(
        CERTS,
        {
            "name": "imported",
            "kind": "server",
            "certificate_pem": cert_pem,
            "private_key_pem": key_pem,
        },
    )
    assert response.status_code == 201, response.content
    assert response.json()["has_private_key"] is True
    assert response.json()["authority"] == authority.pk  # recognised as ours


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"common_name": "x"}, "authority"),
        ({"authority": "CA"}, "common_name"),
        ({"authority": 9999, "common_name": "x"}, "authority"),
        ({"authority": "CA", "common_name": "x", "kind": "both"}, "kind"),
        ({"authority": "CA", "common_name": "x", "dns_names": ["bad name!"]}, "dns_names"),
        (
            {"authority": "CA", "common_name": "x", "dns_names": ["a" * 64 + ".example"]},
            "dns_names",
        ),
        ({"authority": "CA", "common_name": "x", "ip_addresses": ["1.2.3.999"]}, "ip_addresses"),
        ({"authority": "CA", "common_name": "x", "dns_names": "notalist"}, "dns_names"),
        ({"authority": "CA", "common_name": "x", "validity_days": -1}, "validity_days"),
        ({"authority": "CA", "common_name": "x" * 65}, "common_name"),
        ({"authority": "CA", "common_name": "tab\there"}, "common_name"),
        ({"authority": "CA", "common_name": "x", "private_key_pem": "k"}, "private_key_pem"),
        ({"authority": "CA", "common_name": "x", "name": "taken"}, "name"),
        ({"authority": "KEYLESS", "common_name": "x"}, "authority"),
        ({"name": "i", "kind": "server", "certificate_pem": "SERVER"}, "private_key_pem"),
        (
            {
                "name": "i",
                "kind": "server",
                "certificate_pem": "SERVER",
                "private_key_pem": "WRONGKEY",
            },
            "private_key_pem",
        ),
        (
            {
                "name": "i",
                "kind": "client",
                "certificate_pem": "SERVER",
                "private_key_pem": "SERVERKEY",
            },
            "certificate_pem",
        ),
        ({"name": "i", "certificate_pem": "not pem"}, "certificate_pem"),
        (
            {
                "name": "i",
                "certificate_pem": "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----",
            },
            "certificate_pem",
        ),
        ({"name": "i", "certificate_pem": "CAPEM"}, "certificate_pem"),
        ({"name": "i", "certificate_pem": "TAKEN"}, "certificate_pem"),
        ({"certificate_pem": "SERVER", "private_key_pem": "SERVERKEY", "kind": "server"}, "name"),
        (
            {
                "name": "i",
                "certificate_pem": "SERVER",
                "private_key_pem": "SERVERKEY",
                "kind": "server",
                "authority": "CA",
            },
            "authority",
        ),
    ],
)
def test_bad_certificate_is_a_400(api, authority, client_certificate, payload, field):
    keyless = CertificateAuthority.objects.create(
        name="keyless", **{k: v for k, v in ca.certificate_facts(_load(external_ca()[0])).items()}
    )
    server = ca.issue_certificate(authority, "server", "s", name="s")
    server_pem, server_key = server.certificate_pem, server.private_key_pem()
    server.delete()
    client_certificate.name = "taken"
    client_certificate.save()
    values = {
        "CA": authority.pk,
        "KEYLESS": keyless.pk,
        "SERVER": server_pem,
        "SERVERKEY": server_key,
        "WRONGKEY": external_ca()[1],
        "CAPEM": authority.certificate_pem,
        "TAKEN": client_certificate.certificate_pem,
    }
    payload = {k: values.get(v, v) if isinstance(v, str) else v for k, v in payload.items()}
    before = Certificate.objects.count()
    response = api.post(CERTS, payload)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert Certificate.objects.count() == before


def test_certificate_patch_renames_only(api, client_certificate):
    url = f"{CERTS}{client_certificate.pk}/"
    assert api.patch(url, {"name": "alice-laptop"}).status_code == 200
    assert api.patch(url, {"common_name": "mallory"}).status_code == 400


def test_certificate_filters(api, client_certificate, server_certificate):
    assert api.get(CERTS, {"kind": "client"}).json()["count"] == 1
    assert api.get(CERTS, {"revoked": "false"}).json()["count"] == 2
    assert (
        api.get(CERTS, {"fingerprint_sha256": client_certificate.fingerprint_sha256}).json()[
            "count"
        ]
        == 1
    )
    assert api.get(CERTS, {"kind": "nope"}).status_code == 400


def test_near_expiry_is_flagged(api, authority):
    cert = ca.issue_certificate(authority, "client", "soon", validity_days=5)
    body = api.get(f"{CERTS}{cert.pk}/").json()
    assert body["expires_soon"] is True
    assert body["warnings"]
    later = ca.issue_certificate(authority, "client", "later", validity_days=200)
    assert api.get(f"{CERTS}{later.pk}/").json()["expires_soon"] is False


# -- revocation --------------------------------------------------------------------------------


def test_revoke(api, client_certificate):
    url = f"{CERTS}{client_certificate.pk}/revoke/"
    response = api.post(url, {"reason": "laptop lost"})
    assert response.status_code == 200
    assert response.json()["is_revoked"] is True
    assert response.json()["revocation_reason"] == "laptop lost"
    first = response.json()["revoked_at"]
    assert api.post(url).json()["revoked_at"] == first  # idempotent
    assert api.get(CERTS, {"revoked": "true"}).json()["count"] == 1
    assert api.post(url, {"reason": "x" * 201}).status_code == 400


def test_revoke_with_permission(make_user, token_client, client_certificate):
    client = token_client(
        make_user("exports_app.view_certificate", "exports_app.revoke_certificate")
    )
    assert client.post(f"{CERTS}{client_certificate.pk}/revoke/").status_code == 200


# -- bundles -----------------------------------------------------------------------------------


def _members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return {m.name: (m, archive.extractfile(m).read().decode()) for m in archive.getmembers()}


def test_bundle_contents(api, tls_node, client_certificate, server_certificate, tmp_path):
    node = tls_node(TLSMode.FORCEDTLS)
    export = Export.objects.create(node=node, name="disk one", size=512)
    response = api.get(f"{CERTS}{client_certificate.pk}/bundle/", {"export": export.pk})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/gzip"
    assert response["Content-Disposition"].endswith('-tls.tar.gz"')
    members = _members(response.content)
    assert set(members) == {"ca-cert.pem", "client-cert.pem", "client-key.pem", "README.txt"}
    assert members["client-key.pem"][0].mode == 0o600
    assert members["client-cert.pem"][1] == client_certificate.certificate_pem
    key = serialization.load_pem_private_key(members["client-key.pem"][1].encode(), None)
    cert = _load(members["client-cert.pem"][1])
    assert key.public_key() == cert.public_key()
    # ca-cert.pem verifies the server (what qemu and libnbd use it for) and the client.
    for leaf in (server_certificate.certificate_pem, client_certificate.certificate_pem):
        assert openssl_verify(tmp_path, members["ca-cert.pem"][1], leaf).returncode == 0
    readme = members["README.txt"][1]
    assert "tls-creds-x509,id=tls0,endpoint=client,dir=" in readme
    assert "driver=nbd,host=127.0.0.1,port=10809,export=disk one,tls-creds=tls0" in readme
    assert "nbds://127.0.0.1:10809/disk%20one?tls-certificates=" in readme
    assert "json:" in readme
    assert "nbd-client -N 'disk one' 127.0.0.1 10809 /dev/nbd0" in readme
    assert "--enable-tls --certfile" in readme


def test_the_bundle_holding_a_private_key_is_never_cached(api, client_certificate, default_node):
    response = api.get(f"{CERTS}{client_certificate.pk}/bundle/")
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"].split(", ")


def test_bundle_refusals(api, client_certificate, server_certificate, default_node):
    assert api.get(f"{CERTS}{server_certificate.pk}/bundle/").status_code == 400
    assert api.get(f"{CERTS}{client_certificate.pk}/bundle/", {"export": "x"}).status_code == 400
    assert api.get(f"{CERTS}{client_certificate.pk}/bundle/", {"node": 9999}).status_code == 400
    assert (
        api.get(f"{CERTS}{client_certificate.pk}/bundle/", {"node": default_node.pk}).status_code
        == 200
    )
    ca.revoke_certificate(client_certificate)
    assert api.get(f"{CERTS}{client_certificate.pk}/bundle/").status_code == 400
    assert api.get(f"{CERTS}999999/bundle/").status_code == 404


def test_bundle_with_permission(make_user, token_client, client_certificate, default_node):
    client = token_client(
        make_user("exports_app.view_certificate", "exports_app.download_certificate_bundle")
    )
    assert client.get(f"{CERTS}{client_certificate.pk}/bundle/").status_code == 200


# -- keys at rest ------------------------------------------------------------------------------


def _all_exports_app_rows() -> str:
    dump = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            if table.startswith("exports_app_"):
                cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
                dump.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(dump)


def test_private_keys_are_not_stored_in_plaintext(api, authority):
    body = api.post(CERTS, {"authority": authority.pk, "common_name": "secret"}).json()
    cert = Certificate.objects.get(pk=body["id"])
    ext_cert, ext_key = external_ca()
    api.post(CAS, {"name": "ext", "certificate_pem": ext_cert, "private_key_pem": ext_key})
    dump = _all_exports_app_rows()
    assert "PRIVATE KEY" not in dump
    for pem in (cert.private_key_pem(), authority.private_key_pem(), ext_key):
        body_lines = [line for line in pem.splitlines() if "-----" not in line]
        assert all(line not in dump for line in body_lines)
    assert cert.encrypted_private_key.startswith("fernet-v1:")


def test_keys_need_the_environment_key(client_certificate, settings):
    settings.NBDWEB_KEY_ENCRYPTION_KEY = "a different key"
    with pytest.raises(KeyDecryptionError):
        client_certificate.private_key_pem()
