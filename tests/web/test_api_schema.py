"""The OpenAPI schema as a contract: it validates without warnings, describes every operation
and field for a person, types every choice as an enum, keeps request and response models
apart, documents one error shape on every operation, and is browsable from the app's own
static files."""

from __future__ import annotations

import re
import urllib.request

import pytest
import yaml
from django.core.management import call_command

pytestmark = pytest.mark.django_db

METHODS = ("get", "post", "patch", "put", "delete")


@pytest.fixture(scope="module")
def schema(django_db_blocker) -> dict:
    with django_db_blocker.unblock():
        from drf_spectacular.generators import SchemaGenerator

        return SchemaGenerator().get_schema(request=None, public=True)


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_the_schema_validates_and_the_generator_warns_of_nothing(tmp_path, capsys):
    out = tmp_path / "schema.yaml"
    # --fail-on-warn: any generator warning or error makes the command fail.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    assert "openapi" in yaml.safe_load(out.read_text())
    assert "Warning" not in capsys.readouterr().err


def test_every_operation_and_field_has_a_description_for_people(schema):
    missing = [f"{m.upper()} {p}" for p, m, op in operations(schema) if not op.get("description")]
    assert missing == []
    for component, body in schema["components"]["schemas"].items():
        for name, field in body.get("properties", {}).items():
            assert field.get("description"), f"{component}.{name} has no description"
    text = yaml.safe_dump(schema)
    for internal in ("Mixed into", "NetBox", "full_clean", "Hook:"):
        assert internal not in text


def test_choice_fields_are_enums(schema):
    components = schema["components"]["schemas"]

    def enum_of(component: str, field: str) -> list[str]:
        prop = components[component]["properties"][field]
        ref = prop.get("$ref") or prop["allOf"][0]["$ref"]
        return components[ref.rsplit("/", 1)[1]]["enum"]

    assert set(enum_of("Export", "state")) == {
        "provisioning",
        "cloning",
        "ready",
        "resizing",
        "verifying",
        "failed",
        "deleting",
    }
    assert set(enum_of("Job", "kind")) == {
        "create",
        "clone",
        "resize",
        "delete",
        "verify",
        "import",
    }
    assert set(enum_of("Job", "state")) == {"queued", "running", "succeeded", "failed"}
    assert set(enum_of("Certificate", "kind")) == {"server", "client"}


def test_request_and_response_models_are_apart(schema):
    components = schema["components"]["schemas"]
    request = components["ExportRequest"]
    assert request["required"] == ["name"]
    for read_only in ("id", "url", "state", "uri", "created", "job"):
        assert read_only not in request["properties"]
    assert {"id", "url", "state", "uri", "created"} <= set(components["Export"]["required"])


def test_request_bodies_are_json_only(schema):
    for path, method, operation in operations(schema):
        if "requestBody" in operation:
            assert list(operation["requestBody"]["content"]) == ["application/json"], (
                method,
                path,
            )


def test_every_operation_documents_the_one_error_shape(schema):
    error_ref = "#/components/schemas/Error"
    assert "detail" in schema["components"]["schemas"]["Error"]["properties"]
    for path, method, operation in operations(schema):
        responses = operation["responses"]
        expected = {"401", "403"}
        if "{id}" in path:
            expected.add("404")
        if "requestBody" in operation:
            expected.add("400")
        if method in ("patch", "delete") and path.count("/") == 5 and "sessions" not in path:
            expected |= {"409", "412"}
        assert expected <= set(responses), (method, path, sorted(responses))
        for code, response in responses.items():
            if code.startswith("4"):
                assert response["content"]["application/json"]["schema"] == {"$ref": error_ref}
                assert response["description"]


def test_changes_refused_by_an_exports_state_document_409(schema):
    # An export being deleted answers 409 to these (tests/web/test_export_rules.py).
    paths = schema["paths"]
    for path, method in [
        ("/api/v1/exports/{id}/", "patch"),
        ("/api/v1/exports/{id}/resize/", "post"),
        ("/api/v1/exports/{id}/verify/", "post"),
    ]:
        conflict = paths[path][method]["responses"]["409"]
        assert conflict["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        assert "being deleted" in conflict["description"]


def test_operations_are_tagged_by_resource_and_put_is_gone(schema):
    tags = {tag for _, _, op in operations(schema) for tag in op["tags"]}
    assert tags == {
        "authorities",
        "certificates",
        "events",
        "exports",
        "jobs",
        "nodes",
        "sessions",
        "tls-policies",
        "webhooks",
    }
    assert not [p for p, m, _ in operations(schema) if m == "put"]


def test_object_writes_take_if_match_and_reads_return_an_etag(schema):
    item = schema["paths"]["/api/v1/exports/{id}/"]
    for method in ("patch", "delete"):
        names = [p["name"] for p in item[method]["parameters"]]
        assert "If-Match" in names, method
    assert "ETag" in item["get"]["responses"]["200"]["headers"]


def test_every_read_takes_if_none_match_and_documents_304(schema):
    reads = [(path, op) for path, method, op in operations(schema) if method == "get"]
    assert len(reads) > 10
    for path, operation in reads:
        names = [p["name"] for p in operation.get("parameters", [])]
        assert "If-None-Match" in names, path
        assert "content" not in operation["responses"]["304"], path
        assert "ETag" in operation["responses"]["200"]["headers"], path


def test_posts_that_create_or_start_jobs_take_an_idempotency_key(schema):
    for path in ("/api/v1/exports/", "/api/v1/exports/{id}/resize/", "/api/v1/jobs/{id}/retry/"):
        operation = schema["paths"][path]["post"]
        assert "Idempotency-Key" in [p["name"] for p in operation["parameters"]], path
        assert {"409", "422"} <= set(operation["responses"]), path


def test_the_bundle_is_described_as_binary(schema):
    response = schema["paths"]["/api/v1/certificates/{id}/bundle/"]["get"]["responses"]["200"]
    assert response["content"]["application/gzip"]["schema"] == {
        "type": "string",
        "format": "binary",
    }


def test_put_is_refused(make_user, token_client):
    client = token_client(make_user(superuser=True))
    response = client.put("/api/v1/nodes/1/", {"name": "x"}, format="json")
    assert response.status_code == 405


# The live server's transactional test flushes the database: serialized_rollback puts back
# what the migrations made (the default node) for the tests after it.
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
@pytest.mark.parametrize("page", ["/api/docs/", "/api/redoc/"])
def test_the_docs_pages_use_only_the_apps_own_assets(page, live_server):
    with urllib.request.urlopen(live_server.url + page) as reply:
        html = reply.read().decode()
    # Every absolute URL on the page is the app's own; every asset is served.
    foreign = [u for u in re.findall(r"https?://[^\s\"'<>)]+", html) if live_server.url not in u]
    assert foreign == []
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        with urllib.request.urlopen(live_server.url + asset) as reply:
            assert reply.status == 200, asset
            assert reply.read(), asset
