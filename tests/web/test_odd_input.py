"""Odd input answers 400 with a field error, never a 5xx (issue 15, item 5).

Numbers in query parameters and bodies are ASCII digits only: Python's int() also takes "²"
(isdigit() but not int()-able) and Arabic-Indic digits, and a 23-digit ID overflows the
database's integer. A body of nested brackets must not reach the JSON parser's recursion limit.
"""

import pytest

from exports_app.models import Export
from tests.support.adminforms import export_add_form

pytestmark = pytest.mark.django_db

MiB = 1 << 20
# Each is a number to int() or Decimal() (or isdigit()), but not ASCII digits in range.
ODD_NUMBERS = [
    "²",
    "١٢",
    "٣",
    "\uff11\uff12",
    "99999999999999999999999",
    "1.5",
    "1e3",
    "0x1",
    "1_0",
]
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
LISTS_WITH_NODE = ["/api/v1/exports/", "/api/v1/jobs/", "/api/v1/sessions/"]


@pytest.mark.parametrize("value", [*ODD_NUMBERS, "-1"])
@pytest.mark.parametrize("url", LISTS_WITH_NODE)
def test_node_filter_with_odd_number_is_never_a_5xx(api, default_node, url, value):
    # A node is named by ID or by name, so an odd value is a name nobody has: an empty list.
    response = api.get(url, {"node": value})
    assert response.status_code in (200, 503), response.content  # 503: sessions without Redis
    if response.status_code == 200:
        body = response.json()
        assert (body["results"] if isinstance(body, dict) else body) == []


@pytest.mark.parametrize("url", LISTS_WITH_NODE)
def test_node_filter_by_ascii_id_still_works(api, default_node, url):
    Export.objects.create(node=default_node, name="disk", size=MiB)
    response = api.get(url, {"node": str(default_node.pk)})
    assert response.status_code in (200, 503), response.content
    if url == "/api/v1/exports/":
        assert [e["name"] for e in response.json()["results"]] == ["disk"]


@pytest.mark.parametrize("value", ODD_NUMBERS)
@pytest.mark.parametrize(
    "url,param",
    [
        ("/api/v1/jobs/", "export"),
        ("/api/v1/jobs/", "id"),
        ("/api/v1/exports/", "id"),
        ("/api/v1/nodes/", "tls_policy"),
        ("/api/v1/certificates/", "authority"),
        ("/api/v1/exports/", "limit"),
        ("/api/v1/exports/", "offset"),
    ],
)
def test_numeric_filter_with_odd_number_is_400_naming_it(api, default_node, url, param, value):
    response = api.get(url, {param: value})
    if param in ("limit", "offset"):
        # DRF's pagination ignores a bad limit/offset (documented); it must not be a 5xx.
        assert response.status_code == 200, response.content
        return
    assert response.status_code == 400, response.content
    assert param in response.json()


@pytest.mark.parametrize(
    "url,param", [("/api/v1/nodes/", "tls_policy"), ("/api/v1/exports/", "id")]
)
def test_existing_id_in_arabic_indic_digits_is_not_read_as_it(api, default_node, url, param):
    export = Export.objects.create(node=default_node, name="disk", size=MiB)
    pk = default_node.tls_policy_id if param == "tls_policy" else export.pk
    assert api.get(url, {param: str(pk)}).json()["count"] == 1
    response = api.get(url, {param: str(pk).translate(ARABIC_INDIC)})
    assert response.status_code == 400, response.content
    assert param in response.json()


@pytest.mark.parametrize("param", ["node", "export"])
@pytest.mark.parametrize("value", ["²", "١٢", "99999999999999999999999"])
def test_bundle_with_odd_id_is_400_naming_it(api, client_certificate, param, value):
    url = f"/api/v1/certificates/{client_certificate.pk}/bundle/"
    response = api.get(url, {param: value})
    assert response.status_code == 400, response.content
    assert param in response.json()


@pytest.mark.parametrize("path", ["/api/v1/exports/{}/", "/api/v1/jobs/{}/"])
@pytest.mark.parametrize("value", ["99999999999999999999999", "²"])
def test_detail_with_odd_id_is_404(api, default_node, path, value):
    assert api.get(path.format(value)).status_code == 404


@pytest.mark.parametrize("size", ["١٠٢٤", "\u0661G", "²", "\uff11\uff10\uff12\uff14"])
def test_size_in_non_ascii_digits_is_400(api, default_node, size):
    response = api.post("/api/v1/exports/", {"name": "disk", "size": size})
    assert response.status_code == 400, response.content
    assert "size" in response.json()
    assert not Export.objects.exists()


@pytest.mark.parametrize("value", ["١٢", "99999999999999999999999"])
def test_integer_body_field_in_odd_digits_is_400(api, default_node, value):
    response = api.post("/api/v1/exports/", {"name": "disk", "size": MiB, "max_connections": value})
    assert response.status_code == 400, response.content
    assert "max_connections" in response.json()


@pytest.mark.parametrize("value", ["arabic", "99999999999999999999999", 1 << 70])
def test_related_id_in_odd_digits_is_400(api, default_node, value):
    if value == "arabic":
        value = str(default_node.pk).translate(ARABIC_INDIC)
    response = api.post("/api/v1/exports/", {"name": "disk", "size": MiB, "node": value})
    assert response.status_code == 400, response.content
    assert "node" in response.json()


@pytest.mark.parametrize(
    "body",
    ["[" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000],
    ids=["open-brackets", "open-objects", "balanced-brackets"],
)
def test_deeply_nested_json_body_is_400(api, default_node, body):
    response = api.generic("POST", "/api/v1/exports/", body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert "detail" in response.json()


def test_every_writable_number_field_of_the_api_reads_ascii_only():
    # The one place: a serializer field added later with DRF's IntegerField would take "١٢".
    from rest_framework import serializers

    from exports_app.api.fields import AsciiIntegerField, AsciiPrimaryKeyRelatedField
    from exports_app.api.urls import router

    loose = []
    for _prefix, viewset, _basename in router.registry:
        serializer_class = getattr(viewset, "serializer_class", None)
        # Sessions' serializer only renders what the workers report; it never reads input.
        if serializer_class is None or not issubclass(
            serializer_class, serializers.ModelSerializer
        ):
            continue
        for name, field in serializer_class().fields.items():
            if field.read_only:
                continue
            if isinstance(field, serializers.IntegerField) and not isinstance(
                field, AsciiIntegerField
            ):
                loose.append(f"{serializer_class.__name__}.{name}")
            if isinstance(field, serializers.PrimaryKeyRelatedField) and not isinstance(
                field, AsciiPrimaryKeyRelatedField
            ):
                loose.append(f"{serializer_class.__name__}.{name}")
    assert loose == []


@pytest.mark.parametrize(
    "path", ["/api/v1/exports/1.5/", "/api/v1/authorities/-3.7e-300/", "/api/v1/nope/"]
)
def test_an_api_path_no_route_matches_is_a_json_404(api, path):
    # Found by the API fuzzer: Django's HTML 404 page, not the documented JSON error.
    response = api.delete(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}


def test_a_page_no_route_matches_outside_the_api_is_still_html(client, db):
    response = client.get("/nope/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


# -- the admin's forms read numbers as the API does (one field: exports_app/formfields.py) --------


@pytest.mark.parametrize("value", ["١٢", "\uff11\uff12", "²", "99999999999999999999999"])
def test_admin_export_integer_fields_in_odd_digits_are_form_errors(
    admin_client, default_node, value
):
    data = export_add_form(default_node.pk, max_connections=value, preferred_block_size="٤٠٩٦")
    response = admin_client.post("/admin/exports_app/export/add/", data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert {"max_connections", "preferred_block_size"} <= set(errors), errors
    assert not Export.objects.exists()


def test_admin_certificate_validity_in_odd_digits_is_a_form_error(admin_client, authority):
    response = admin_client.post(
        "/admin/exports_app/certificate/add/",
        {"kind": "client", "authority": authority.pk, "common_name": "c", "validity_days": "٣٠"},
    )
    assert response.status_code == 200
    assert "validity_days" in response.context["adminform"].form.errors


def test_every_integer_field_of_the_admin_forms_reads_ascii_only(admin_client, default_node):
    """The one place: an admin form whose integer field is Django's own would take "١٢"."""
    from django import forms
    from django.contrib import admin

    from exports_app.formfields import AsciiIntegerFormField

    loose = []
    request = admin_client.get("/admin/").wsgi_request
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label != "exports_app":
            continue
        for form_class in {model_admin.get_form(request), model_admin.get_form(request, None)}:
            for name, field in form_class.base_fields.items():
                if isinstance(field, forms.IntegerField) and not isinstance(
                    field, AsciiIntegerFormField
                ):
                    loose.append(f"{model.__name__}.{name}")
    assert loose == []


@pytest.mark.parametrize("query", ["²", "99999999999999999999999"])
def test_console_changelog_search_with_odd_number_is_not_a_5xx(admin_client, default_node, query):
    response = admin_client.get("/admin/console/changes/", {"q": query})
    assert response.status_code < 500
