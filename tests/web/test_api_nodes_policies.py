"""/api/v1/nodes/ and /api/v1/tls-policies/: read, edit, and the TLS rules."""

import pytest

from exports_app.choices import TLSMode
from exports_app.models import Export, TLSPolicy, WorkerNode
from exports_app.services import ca

pytestmark = pytest.mark.django_db

NODES = "/api/v1/nodes/"
POLICIES = "/api/v1/tls-policies/"


def test_default_node_exists_with_notls(api, default_node):
    body = api.get(NODES).json()
    assert body["count"] == 1
    node = body["results"][0]
    assert node["name"] == "default"
    assert node["tls_mode"] == TLSMode.NOTLS
    assert node["warnings"] == []


def test_create_update_delete_node(api, default_node, tmp_path):
    response = api.post(
        NODES, {"name": "n2", "listen": "[::1]:10810", "storage_root": str(tmp_path)}
    )
    assert response.status_code == 201, response.content
    node_id = response.json()["id"]
    assert response.json()["tls_policy"] == default_node.tls_policy_id
    response = api.patch(f"{NODES}{node_id}/", {"public_address": "nbd.example:10810"})
    assert response.status_code == 200
    assert api.delete(f"{NODES}{node_id}/").status_code == 204


def test_node_with_exports_cannot_be_deleted_or_moved(api, default_node, tmp_path):
    Export.objects.create(node=default_node, name="x", size=512)
    assert api.delete(f"{NODES}{default_node.pk}/").status_code == 409
    response = api.patch(f"{NODES}{default_node.pk}/", {"storage_root": str(tmp_path / "new")})
    assert response.status_code == 400
    assert "storage_root" in response.json()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"listen": "1.2.3.4:1", "storage_root": "/srv"}, "name"),
        ({"name": "bad name", "listen": "1.2.3.4:1", "storage_root": "/srv"}, "name"),
        ({"name": "node.with.queue-chars_ok", "listen": "nope", "storage_root": "/srv"}, "listen"),
        ({"name": "n", "listen": "1.2.3.4:70000", "storage_root": "/srv"}, "listen"),
        ({"name": "n", "listen": "1.2.3.4:1", "storage_root": "relative"}, "storage_root"),
        (
            {"name": "n", "listen": "1.2.3.4:1", "storage_root": "/srv", "public_address": "x"},
            "public_address",
        ),
        ({"name": "default", "listen": "1.2.3.4:1", "storage_root": "/srv"}, "name"),
        (
            {"name": "n", "listen": "1.2.3.4:1", "storage_root": "/srv", "tls_policy": 9999},
            "tls_policy",
        ),
    ],
)
def test_bad_node_is_a_400(api, default_node, payload, field):
    response = api.post(NODES, payload)
    assert response.status_code == 400, response.content
    assert field in response.json()


def test_switching_mode_is_one_patch(api, default_node, server_certificate):
    url = f"{POLICIES}{default_node.tls_policy_id}/"
    response = api.patch(url, {"mode": "FORCEDTLS", "server_certificate": server_certificate.pk})
    assert response.status_code == 200, response.content
    response = api.patch(url, {"mode": "SELECTIVETLS"})
    assert response.status_code == 200
    assert response.json()["mode"] == "SELECTIVETLS"
    assert response.json()["warnings"] == []


def test_optionaltls_answers_with_a_downgrade_warning(api, default_node, server_certificate):
    url = f"{POLICIES}{default_node.tls_policy_id}/"
    body = api.patch(
        url, {"mode": "OPTIONALTLS", "server_certificate": server_certificate.pk}
    ).json()
    assert any("STARTTLS" in w for w in body["warnings"])
    node = api.get(f"{NODES}{default_node.pk}/").json()
    assert any("STARTTLS" in w for w in node["warnings"])


def test_create_policy_with_client_verification(api, server_certificate, authority):
    response = api.post(
        POLICIES,
        {
            "name": "mtls",
            "mode": "FORCEDTLS",
            "server_certificate": server_certificate.pk,
            "trusted_authorities": [authority.pk],
            "client_verification": "required",
            "min_tls_version": "1.3",
        },
    )
    assert response.status_code == 201, response.content
    assert response.json()["revoked_serials"] == []


def test_revoked_serials_follow_revocations(api, tls_node, client_certificate):
    node = tls_node(TLSMode.FORCEDTLS)
    ca.revoke_certificate(client_certificate)
    body = api.get(f"{POLICIES}{node.tls_policy_id}/").json()
    assert body["revoked_serials"] == [client_certificate.serial]


@pytest.fixture
def keyless_server_certificate(authority):
    cert = ca.issue_certificate(authority, "server", "nokey", name="nokey")
    cert.encrypted_private_key = ""
    cert.save()
    return cert


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"mode": "FORCEDTLS"}, "server_certificate"),
        ({"mode": "SELECTIVETLS"}, "server_certificate"),
        ({"mode": "OPTIONALTLS"}, "server_certificate"),
        ({"mode": "FORCEDTLS", "server_certificate": "KEYLESS"}, "server_certificate"),
        ({"mode": "FORCEDTLS", "server_certificate": "CLIENT"}, "server_certificate"),
        ({"mode": "FORCEDTLS", "server_certificate": "REVOKED"}, "server_certificate"),
        (
            {
                "mode": "FORCEDTLS",
                "server_certificate": "SERVER",
                "client_verification": "required",
            },
            "trusted_authorities",
        ),
        ({"mode": "TLS"}, "mode"),
        ({"min_tls_version": "1.0"}, "min_tls_version"),
        ({"client_verification": "maybe"}, "client_verification"),
        ({"server_certificate": 99999}, "server_certificate"),
        ({"trusted_authorities": [99999]}, "trusted_authorities"),
    ],
)
def test_bad_policy_is_a_400(
    api,
    default_node,
    server_certificate,
    client_certificate,
    keyless_server_certificate,
    authority,
    payload,
    field,
):
    revoked = ca.issue_certificate(authority, "server", "revoked", name="revoked")
    ca.revoke_certificate(revoked)
    ids = {
        "KEYLESS": keyless_server_certificate.pk,
        "CLIENT": client_certificate.pk,
        "REVOKED": revoked.pk,
        "SERVER": server_certificate.pk,
    }
    payload = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in payload.items()}
    response = api.patch(f"{POLICIES}{default_node.tls_policy_id}/", payload)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert TLSPolicy.objects.get(pk=default_node.tls_policy_id).mode == TLSMode.NOTLS


def test_notls_refused_while_exports_require_tls(api, tls_node):
    node = tls_node(TLSMode.SELECTIVETLS)
    Export.objects.create(node=node, name="secret", size=512, tls_required=True)
    response = api.patch(f"{POLICIES}{node.tls_policy_id}/", {"mode": "NOTLS"})
    assert response.status_code == 400
    assert "mode" in response.json()
    plain = TLSPolicy.objects.create(name="plain")
    response = api.patch(f"{NODES}{node.pk}/", {"tls_policy": plain.pk})
    assert response.status_code == 400
    assert "tls_policy" in response.json()


def test_policy_in_use_cannot_be_deleted(api, default_node):
    assert api.delete(f"{POLICIES}{default_node.tls_policy_id}/").status_code == 409
    spare = TLSPolicy.objects.create(name="spare")
    assert api.delete(f"{POLICIES}{spare.pk}/").status_code == 204


def test_filters(api, default_node):
    TLSPolicy.objects.create(name="spare", mode=TLSMode.NOTLS)
    assert api.get(POLICIES, {"mode": "NOTLS"}).json()["count"] == 2
    assert api.get(POLICIES, {"mode": "FORCEDTLS"}).json()["count"] == 0
    assert api.get(NODES, {"name": "default"}).json()["count"] == 1
    assert api.get(NODES, {"tls_mode": "NOTLS"}).json()["count"] == WorkerNode.objects.count()


def test_policy_history_includes_trusted_authority_changes(
    api, default_node, server_certificate, authority
):
    url = f"{POLICIES}{default_node.tls_policy_id}/"
    api.patch(url, {"mode": "FORCEDTLS", "server_certificate": server_certificate.pk})
    api.patch(url, {"trusted_authorities": [authority.pk], "client_verification": "required"})
    entries = api.get(f"{url}history/").json()
    # The m2m change is recorded as its own entry right after the field changes.
    assert {c["field"] for c in entries[0]["changes"]} == {"trusted_authorities"}
    assert {c["field"] for c in entries[1]["changes"]} == {"client_verification"}
    # The migration made the policy without a history record, so the first PATCH is the oldest
    # entry and has nothing to be compared with.
    assert len(entries) == 3


def test_expired_server_certificate_is_refused(api, default_node, server_certificate):
    from datetime import timedelta

    from django.utils import timezone

    server_certificate.not_after = timezone.now() - timedelta(days=1)
    server_certificate.save()
    url = f"{POLICIES}{default_node.tls_policy_id}/"
    response = api.patch(url, {"mode": "FORCEDTLS", "server_certificate": server_certificate.pk})
    assert response.status_code == 400
    assert "expired" in response.json()["server_certificate"][0]


def _add_nodes(count: int, exports_each: int, policy: TLSPolicy, root) -> list[WorkerNode]:
    first = WorkerNode.objects.count()
    nodes = WorkerNode.objects.bulk_create(
        WorkerNode(
            name=f"bulk{first + i}",
            listen=f"127.0.0.1:{20000 + first + i}",
            storage_root=str(root),
            tls_policy=policy,
        )
        for i in range(count)
    )
    Export.objects.bulk_create(
        Export(node=node, name=f"e{j}", name_digest=f"{node.pk}-{j}", image_path=f"{j}.img",
               size=512)
        for node in nodes
        for j in range(exports_each)
    )  # fmt: skip
    return nodes


def test_the_node_list_costs_the_same_queries_for_any_number_of_nodes_and_exports(
    api, default_node, tmp_path
):
    """Issue 19: the list counted every export of every node (a JOIN + GROUP BY in the page
    query and again in the paginator's COUNT). Now a page costs a fixed number of queries,
    whatever the fleet's size, the paginator's count never reads the exports, and each node's
    count is its own."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def listed() -> tuple[list[str], dict[str, int]]:
        with CaptureQueriesContext(connection) as queries:
            response = api.get(NODES, {"limit": 5})
        assert response.status_code == 200
        counts = {node["name"]: node["export_count"] for node in response.json()["results"]}
        return [q["sql"] for q in queries.captured_queries], counts

    _add_nodes(2, 3, default_node.tls_policy, tmp_path)
    small, counts = listed()
    assert counts == {"bulk1": 3, "bulk2": 3, "default": 0}
    _add_nodes(30, 40, default_node.tls_policy, tmp_path)
    large, counts = listed()
    assert len(large) == len(small)
    assert len(counts) == 5 and set(counts.values()) == {3, 40}
    paginator_count = next(sql for sql in large if sql.startswith("SELECT COUNT(*)"))
    assert "exports_app_export" not in paginator_count
    assert api.get(f"{NODES}{default_node.pk}/").json()["export_count"] == 0
