"""Authentication and permissions for every endpoint: no token → 401, no permission → 403."""

import pytest

from exports_app.models import Export

pytestmark = pytest.mark.django_db

# (list URL, model name for permissions, a detail object factory name)
ENDPOINTS = [
    ("/api/v1/nodes/", "workernode", "default_node"),
    ("/api/v1/tls-policies/", "tlspolicy", "policy"),
    ("/api/v1/exports/", "export", "export"),
    ("/api/v1/authorities/", "certificateauthority", "authority"),
    ("/api/v1/certificates/", "certificate", "client_certificate"),
]


@pytest.fixture
def objects(default_node, authority, client_certificate):
    export = Export.objects.create(node=default_node, name="disk", size=1 << 20)
    return {
        "default_node": default_node,
        "policy": default_node.tls_policy,
        "export": export,
        "authority": authority,
        "client_certificate": client_certificate,
    }


def _requests(url: str, pk: int):
    detail = f"{url}{pk}/"
    return [
        ("get", url, None),
        ("get", detail, None),
        ("post", url, {}),
        ("patch", detail, {"description": "x"}),
        ("put", detail, {}),
        ("delete", detail, None),
    ]


@pytest.mark.parametrize(("url", "model", "key"), ENDPOINTS)
def test_anonymous_gets_401_with_www_authenticate(anon_client, objects, url, model, key):
    for method, target, body in _requests(url, objects[key].pk):
        response = getattr(anon_client, method)(target, body, format="json")
        assert response.status_code == 401, (method, target, response.content)
        assert response["WWW-Authenticate"] == "Token"


@pytest.mark.parametrize(("url", "model", "key"), ENDPOINTS)
def test_bad_token_gets_401(anon_client, objects, url, model, key):
    anon_client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert anon_client.get(url).status_code == 401


@pytest.mark.parametrize(("url", "model", "key"), ENDPOINTS)
def test_user_without_permission_gets_403(make_user, token_client, objects, url, model, key):
    client = token_client(make_user())
    for method, target, body in _requests(url, objects[key].pk):
        response = getattr(client, method)(target, body, format="json")
        assert response.status_code == 403, (method, target, response.content)


@pytest.mark.parametrize(("url", "model", "key"), ENDPOINTS)
def test_view_permission_reads_but_cannot_write(make_user, token_client, objects, url, model, key):
    client = token_client(make_user(f"exports_app.view_{model}"))
    pk = objects[key].pk
    assert client.get(url).status_code == 200
    assert client.get(f"{url}{pk}/").status_code == 200
    assert client.get(f"{url}{pk}/history/").status_code == 200
    assert client.post(url, {}, format="json").status_code == 403
    assert client.patch(f"{url}{pk}/", {"description": "x"}, format="json").status_code == 403
    assert client.delete(f"{url}{pk}/").status_code == 403


def test_api_root_refuses_anonymous(anon_client, superuser, token_client):
    assert anon_client.get("/api/v1/").status_code == 401
    response = token_client(superuser).get("/api/v1/")
    assert response.status_code == 200
    assert set(response.json()) >= {
        "nodes",
        "tls-policies",
        "exports",
        "authorities",
        "certificates",
    }


def test_session_auth_works(client, superuser, default_node):
    client.force_login(superuser)
    assert client.get("/api/v1/exports/").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "perms"),
    [
        ("get", "bundle/", ["exports_app.view_certificate"]),
        ("post", "revoke/", ["exports_app.view_certificate", "exports_app.change_certificate"]),
    ],
)
def test_certificate_actions_need_their_own_permission(
    make_user, token_client, anon_client, client_certificate, method, path, perms
):
    url = f"/api/v1/certificates/{client_certificate.pk}/{path}"
    assert getattr(anon_client, method)(url).status_code == 401
    assert getattr(token_client(make_user(*perms)), method)(url).status_code == 403


def test_schema_and_docs(api):
    assert api.get("/api/schema/").status_code == 200
    assert api.get("/api/docs/").status_code == 200


@pytest.mark.parametrize(("url", "model", "key"), ENDPOINTS)
def test_list_query_count_does_not_grow_with_rows(
    api, objects, url, model, key, django_assert_max_num_queries
):
    from exports_app.services import ca

    # Many rows of every kind; a list must not cost a query per row.
    node = objects["default_node"]
    for i in range(15):
        Export.objects.create(node=node, name=f"bulk{i}", size=512)
        ca.issue_certificate(objects["authority"], "client", f"c{i}", name=f"c{i}")
    with django_assert_max_num_queries(12):
        assert api.get(url).status_code == 200
