"""One rule, one answer: creating or importing a CA or a certificate is refused the same way, with
the same message on the same input, by the API's POST and by the admin's add form
(exports_app/services/certificates.py), and nothing is saved."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from exports_app.models import Certificate, CertificateAuthority
from exports_app.services import ca

pytestmark = pytest.mark.django_db

# Each way of adding: (created, {field: messages}). Admin non-field errors are named as the API
# names them.
Outcome = tuple[bool, dict[str, list[str]]]


def _api(url: str) -> Callable[..., Outcome]:
    def post(api, admin_client, data: dict) -> Outcome:
        response = api.post(url, data, format="json")
        assert response.status_code in (201, 400), response.content
        return response.status_code == 201, ({} if response.status_code == 201 else response.json())

    post.__name__ = "api"
    return post


def _admin(model: str, defaults: dict) -> Callable[..., Outcome]:
    def post(api, admin_client, data: dict) -> Outcome:
        form = {**defaults}
        for key, value in data.items():
            # The admin takes SANs comma-separated, like a person types them.
            form[key] = ", ".join(value) if isinstance(value, list) else value
        response = admin_client.post(f"/admin/exports_app/{model}/add/", form)
        if response.status_code == 302:
            return True, {}
        assert response.status_code == 200
        errors = response.context["adminform"].form.errors
        return False, {
            ("non_field_errors" if k == "__all__" else k): list(v) for k, v in errors.items()
        }

    post.__name__ = "admin"
    return post


AUTHORITY_PATHS = [
    _api("/api/v1/authorities/"),
    _admin("certificateauthority", {"key_algorithm": "ec-p256"}),
]
CERTIFICATE_PATHS = [_api("/api/v1/certificates/"), _admin("certificate", {"kind": "client"})]


@pytest.fixture
def keyless_authority(db) -> CertificateAuthority:
    authority = ca.create_authority("keyless", "Keyless CA")
    CertificateAuthority.objects.filter(pk=authority.pk).update(encrypted_private_key="")
    authority.refresh_from_db()
    return authority


AUTHORITY_REFUSALS = {
    "neither": (
        {"name": "x"},
        "non_field_errors",
        "Give common_name to create a CA, or certificate_pem to import one.",
    ),
    "both": (
        {"name": "x", "common_name": "X", "certificate_pem": "AUTHORITY"},
        "non_field_errors",
        "Give common_name to create a CA, or certificate_pem to import one.",
    ),
    "key-for-an-internal-ca": (
        {"name": "x", "common_name": "X", "private_key_pem": "KEY"},
        "private_key_pem",
        "Only an imported CA takes a private key.",
    ),
    "already-imported": (
        {"name": "x", "certificate_pem": "AUTHORITY"},
        "certificate_pem",
        "This CA is already imported.",
    ),
    "not-a-ca": (
        {"name": "x", "certificate_pem": "CLIENT"},
        "certificate_pem",
        "This certificate is not a CA",
    ),
}


def _fill(data: dict, authority, client_certificate) -> dict:
    pems = {
        "AUTHORITY": authority.certificate_pem,
        "CLIENT": client_certificate.certificate_pem,
        "KEY": client_certificate.private_key_pem(),
    }
    return {k: pems.get(v, v) if isinstance(v, str) else v for k, v in data.items()}


@pytest.mark.parametrize("case", AUTHORITY_REFUSALS, ids=str)
@pytest.mark.parametrize("add", AUTHORITY_PATHS, ids=lambda f: f.__name__)
def test_an_authority_is_refused_alike(api, admin_client, authority, client_certificate, add, case):
    data, field, message = AUTHORITY_REFUSALS[case]
    before = CertificateAuthority.objects.count()
    created, errors = add(api, admin_client, _fill(data, authority, client_certificate))
    assert not created
    assert any(message in m for m in errors.get(field, [])), errors
    assert CertificateAuthority.objects.count() == before


CERTIFICATE_REFUSALS = {
    "already-imported": (
        {"name": "again", "certificate_pem": "CLIENT"},
        "certificate_pem",
        "This certificate is already imported.",
    ),
    "issuing-input-on-import": (
        {"name": "again", "certificate_pem": "CLIENT", "common_name": "bob"},
        "common_name",
        "Not used when importing a certificate.",
    ),
    "unnamed-import": (
        {"certificate_pem": "CLIENT"},
        "name",
        "Name the imported certificate.",
    ),
    "no-issuer": (
        {"common_name": "bob"},
        "authority",
        "Give the issuing CA, or certificate_pem to import.",
    ),
    "issuer-without-key": (
        {"authority": "KEYLESS", "common_name": "bob"},
        "authority",
        "has no private key; it cannot issue.",
    ),
    "no-common-name": (
        {"authority": "ISSUER"},
        "common_name",
        "This field is required to issue a certificate.",
    ),
    "key-when-issuing": (
        {"authority": "ISSUER", "common_name": "bob", "private_key_pem": "KEY"},
        "private_key_pem",
        "Only an imported certificate takes a private key.",
    ),
    "bad-ip-san": (
        {"authority": "ISSUER", "common_name": "bob", "ip_addresses": ["not-an-ip"]},
        "ip_addresses",
        "'not-an-ip' is not an IP address.",
    ),
}


@pytest.mark.parametrize("case", CERTIFICATE_REFUSALS, ids=str)
@pytest.mark.parametrize("add", CERTIFICATE_PATHS, ids=lambda f: f.__name__)
def test_a_certificate_is_refused_alike(
    api, admin_client, authority, keyless_authority, client_certificate, add, case
):
    data, field, message = CERTIFICATE_REFUSALS[case]
    data = _fill(data, authority, client_certificate)
    issuers = {"ISSUER": authority.pk, "KEYLESS": keyless_authority.pk}
    data = {k: issuers.get(v, v) if isinstance(v, str) else v for k, v in data.items()}
    before = Certificate.objects.count()
    created, errors = add(api, admin_client, data)
    assert not created
    assert any(message in m for m in errors.get(field, [])), errors
    assert Certificate.objects.count() == before


@pytest.mark.parametrize("add", AUTHORITY_PATHS, ids=lambda f: f.__name__)
def test_an_internal_authority_is_created_alike(api, admin_client, add):
    created, errors = add(api, admin_client, {"name": "lab", "common_name": "Lab CA"})
    assert created, errors
    authority = CertificateAuthority.objects.get(name="lab")
    assert authority.has_private_key and not authority.is_imported


@pytest.mark.parametrize("add", CERTIFICATE_PATHS, ids=lambda f: f.__name__)
def test_a_certificate_is_issued_alike(api, admin_client, authority, add):
    data = {"authority": authority.pk, "common_name": "bob", "dns_names": ["Bob.Example."]}
    created, errors = add(api, admin_client, data)
    assert created, errors
    issued = Certificate.objects.get(common_name="bob")
    assert (issued.authority, issued.dns_names) == (authority, ["bob.example"])
