"""/api/v1/exports/: create, list and filter, update, resize, delete, and every bad input."""

import os

import pytest

from exports_app.choices import ExportState, TLSMode
from exports_app.constants import MAX_NAME_BYTES
from exports_app.models import Export, WorkerNode
from exports_app.services import provisioning

pytestmark = pytest.mark.django_db

URL = "/api/v1/exports/"


@pytest.fixture
def hooks(monkeypatch):
    """Record the provisioning hooks' calls (the jobs engineer's seam)."""
    calls = []
    monkeypatch.setattr(
        provisioning, "request_create", lambda e, **kwargs: calls.append(("create", e.pk))
    )
    monkeypatch.setattr(
        provisioning,
        "request_resize",
        # (old, new): the export keeps its stored size until the job has resized the image.
        lambda e, size, force=False, **kwargs: calls.append(("resize", e.pk, e.size, size, force)),
    )
    return calls


def test_create_export_answers_201_with_state_and_uri(api, default_node, hooks):
    response = api.post(URL, {"name": "disk1", "size": "10G", "description": "d"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == ExportState.PROVISIONING
    assert body["size"] == 10 << 30
    assert body["node"] == default_node.pk
    assert body["uri"] == "nbd://127.0.0.1:10809/disk1"
    assert body["image_path"] == "disk1.img"
    assert body["absolute_image_path"] == os.path.join(default_node.storage_root, "disk1.img")
    assert hooks == [("create", body["id"])]


def test_create_all_documented_fields(api, default_node):
    response = api.post(
        URL,
        {
            "name": "full",
            "size": 1 << 30,
            "read_only": True,
            "tls_required": False,
            "description": "all fields",
            "node": default_node.pk,
        },
    )
    assert response.status_code == 201, response.content
    assert response.json()["read_only"] is True


def test_uri_quotes_the_name(api, default_node):
    body = api.post(URL, {"name": "a b/c?d#é", "size": 512}).json()
    assert body["uri"] == "nbd://127.0.0.1:10809/a%20b%2Fc%3Fd%23%C3%A9"


def test_uri_is_nbds_under_forcedtls_and_for_tls_required(api, tls_node):
    tls_node(TLSMode.FORCEDTLS)
    assert api.post(URL, {"name": "f", "size": 512}).json()["uri"].startswith("nbds://")
    tls_node(TLSMode.SELECTIVETLS)
    assert api.post(URL, {"name": "s", "size": 512}).json()["uri"].startswith("nbd://")
    body = api.post(URL, {"name": "t", "size": 512, "tls_required": True}).json()
    assert body["uri"].startswith("nbds://")


def test_uri_brackets_ipv6_and_uses_public_address(api, default_node):
    default_node.public_address = "[2001:db8::1]:10000"
    default_node.save()
    assert (
        api.post(URL, {"name": "v6", "size": 512}).json()["uri"] == "nbd://[2001:db8::1]:10000/v6"
    )


def test_optionaltls_export_carries_a_downgrade_warning(api, tls_node):
    tls_node(TLSMode.OPTIONALTLS)
    body = api.post(URL, {"name": "o", "size": 512}).json()
    assert any("STARTTLS" in w for w in body["warnings"])


def test_default_image_path_avoids_collisions(api, default_node):
    first = api.post(URL, {"name": "Disk", "size": 512}).json()
    second = api.post(URL, {"name": "disk", "size": 512}).json()
    assert (first["image_path"], second["image_path"]) == ("disk.img", "disk-2.img")


def test_explicit_image_path_in_subdirectory(api, default_node):
    body = api.post(URL, {"name": "x", "size": 512, "image_path": "vms/x.raw"}).json()
    assert body["absolute_image_path"] == os.path.join(default_node.storage_root, "vms", "x.raw")


def test_list_and_filters(api, default_node, storage_root):
    other = WorkerNode.objects.create(
        name="other",
        listen="10.0.0.2:10809",
        storage_root=str(storage_root),
        tls_policy=default_node.tls_policy,
    )
    Export.objects.create(node=default_node, name="a", size=512)
    Export.objects.create(node=default_node, name="b", size=512, state=ExportState.READY)
    Export.objects.create(node=other, name="a", size=512, image_path="other-a.img")
    assert api.get(URL).json()["count"] == 3
    assert api.get(URL, {"name": "a"}).json()["count"] == 2
    assert api.get(URL, {"node": other.pk}).json()["count"] == 1
    assert api.get(URL, {"node": "other"}).json()["count"] == 1
    assert api.get(URL, {"state": "ready"}).json()["count"] == 1
    assert api.get(URL, {"state": "bogus"}).status_code == 400
    page = api.get(URL, {"limit": 1}).json()
    assert len(page["results"]) == 1 and page["next"]


def test_patch_changes_fields_and_resize_calls_hook(api, default_node, hooks):
    export = Export.objects.create(node=default_node, name="p", size=1 << 20)
    response = api.patch(f"{URL}{export.pk}/", {"enabled": False, "size": "2M"})
    assert response.status_code == 200, response.content
    assert response.json()["enabled"] is False
    assert hooks == [("resize", export.pk, 1 << 20, 2 << 20, False)]


def test_shrink_needs_force(api, default_node, hooks):
    export = Export.objects.create(node=default_node, name="p", size=1 << 20)
    response = api.patch(f"{URL}{export.pk}/", {"size": 512})
    assert response.status_code == 400
    assert "size" in response.json()
    response = api.patch(f"{URL}{export.pk}/", {"size": 512, "force": True})
    assert response.status_code == 200
    assert hooks == [("resize", export.pk, 1 << 20, 512, True)]


def test_node_and_image_path_are_fixed_after_creation(api, default_node, storage_root):
    export = Export.objects.create(node=default_node, name="p", size=512)
    other = WorkerNode.objects.create(
        name="n2",
        listen="10.0.0.2:1",
        storage_root=str(storage_root),
        tls_policy=default_node.tls_policy,
    )
    assert "node" in api.patch(f"{URL}{export.pk}/", {"node": other.pk}).json()
    assert "image_path" in api.patch(f"{URL}{export.pk}/", {"image_path": "y.img"}).json()


def test_state_is_read_only(api, default_node):
    export = Export.objects.create(node=default_node, name="p", size=512)
    api.patch(f"{URL}{export.pk}/", {"state": "ready", "last_error": "x"})
    export.refresh_from_db()
    assert (export.state, export.last_error) == (ExportState.PROVISIONING, "")


def test_delete_answers_204_when_the_hook_deletes_at_once(api, default_node, monkeypatch):
    monkeypatch.setattr(provisioning, "request_delete", lambda e, **kwargs: e.delete() or True)
    export = Export.objects.create(node=default_node, name="gone", size=512)
    assert api.delete(f"{URL}{export.pk}/").status_code == 204
    assert not Export.objects.filter(pk=export.pk).exists()


def test_delete_answers_202_when_a_job_finishes_it(api, default_node, monkeypatch):
    def deferred(export, **kwargs):
        export.state = ExportState.DELETING
        export.save()
        return False

    monkeypatch.setattr(provisioning, "request_delete", deferred)
    export = Export.objects.create(node=default_node, name="slow", size=512)
    response = api.delete(f"{URL}{export.pk}/")
    assert response.status_code == 202
    assert response.json()["state"] == ExportState.DELETING
    # A deleting export takes no more edits.
    assert api.patch(f"{URL}{export.pk}/", {"description": "x"}).status_code == 409


def test_longest_name_is_accepted_and_unique(api, default_node):
    # 4096-byte names would overflow a PostgreSQL btree row; the unique index uses a digest.
    name = "n" * MAX_NAME_BYTES
    assert api.post(URL, {"name": name, "size": 512}).status_code == 201
    response = api.post(URL, {"name": name, "size": 512})
    assert response.status_code == 400
    assert "name" in response.json()


def test_same_name_on_another_node_is_fine(api, default_node, storage_root):
    other = WorkerNode.objects.create(
        name="n2",
        listen="10.0.0.2:1",
        storage_root=str(storage_root / "n2"),
        tls_policy=default_node.tls_policy,
    )
    assert api.post(URL, {"name": "same", "size": 512}).status_code == 201
    assert api.post(URL, {"name": "same", "size": 512, "node": other.pk}).status_code == 201


@pytest.fixture
def existing(default_node):
    return Export.objects.create(node=default_node, name="taken", size=512, image_path="taken.img")


BAD_CREATES = [
    ({"size": 512}, "name"),
    ({"name": "", "size": 512}, "name"),
    ({"name": "x" * (MAX_NAME_BYTES + 1), "size": 512}, "name"),
    ({"name": "a\0b", "size": 512}, "name"),
    ({"name": "a\x01b", "size": 512}, "name"),
    ({"name": "a\nb", "size": 512}, "name"),
    ({"name": "taken", "size": 512}, "name"),
    ({"name": 5, "size": 512}, None),
    ({"name": "x"}, "size"),
    ({"name": "x", "size": 0}, "size"),
    ({"name": "x", "size": -512}, "size"),
    ({"name": "x", "size": 1000}, "size"),
    ({"name": "x", "size": "10Q"}, "size"),
    ({"name": "x", "size": "1.5G"}, "size"),
    ({"name": "x", "size": True}, "size"),
    ({"name": "x", "size": None}, "size"),
    ({"name": "x", "size": 2**64}, "size"),
    ({"name": "x", "size": 512, "image_path": "../x.img"}, "image_path"),
    ({"name": "x", "size": 512, "image_path": "/etc/passwd"}, "image_path"),
    ({"name": "x", "size": 512, "image_path": "a/../../x"}, "image_path"),
    ({"name": "x", "size": 512, "image_path": "taken.img"}, "image_path"),
    ({"name": "x", "size": 512, "image_path": "link/x.img"}, "image_path"),
    ({"name": "x", "size": 512, "node": 999999}, "node"),
    ({"name": "x", "size": 512, "node": "default"}, "node"),
    ({"name": "x", "size": 512, "tls_required": True}, "tls_required"),
    ({"name": "x", "size": 512, "description": "d" * 4097}, "description"),
    ({"name": "x", "size": 512, "description": "a\0"}, "description"),
    ({"name": "x", "size": 512, "min_block_size": 3}, "min_block_size"),
    ({"name": "x", "size": 512, "min_block_size": 131072}, "min_block_size"),
    ({"name": "x", "size": 512, "min_block_size": 0}, "min_block_size"),
    ({"name": "x", "size": 512, "preferred_block_size": 256}, "preferred_block_size"),
    ({"name": "x", "size": 512, "preferred_block_size": 3000}, "preferred_block_size"),
    (
        {"name": "x", "size": 512, "max_block_size": 1024, "preferred_block_size": 4096},
        "max_block_size",
    ),
    ({"name": "x", "size": 512, "max_block_size": 64 << 20}, "max_block_size"),
    ({"name": "x", "size": 1024, "min_block_size": 4096}, "size"),
    ({"name": "x", "size": 512, "write_zeroes": False, "fast_zero": True}, "fast_zero"),
    ({"name": "x", "size": 512, "max_connections": -1}, "max_connections"),
    ({"name": "x", "size": 512, "allowed_clients": [{"cn": "a"}]}, "allowed_clients"),
    ({"name": "x", "size": 512, "allowed_clients": "alice"}, "allowed_clients"),
    ({"name": "x", "size": 512, "allowed_networks": ["10.0.0.0/40"]}, "allowed_networks"),
    ({"name": "x", "size": 512, "allowed_networks": "10.0.0.0/8"}, "allowed_networks"),
    ({"name": "x", "size": 512, "read_only": "maybe"}, "read_only"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_CREATES)
def test_bad_create_is_a_400_with_field_errors(
    api, default_node, existing, storage_root, payload, field
):
    if not (storage_root / "link").exists():
        os.symlink("/tmp", storage_root / "link")
    response = api.post(URL, payload)
    assert response.status_code == 400, response.content
    if field:
        assert field in response.json(), response.json()
    assert Export.objects.count() == 1


def test_malformed_json_is_a_400(api, default_node):
    response = api.post(URL, "{not json", content_type="application/json")
    assert response.status_code == 400


def test_allowed_clients_and_networks_are_normalised(api, default_node):
    body = api.post(
        URL,
        {
            "name": "acl",
            "size": 512,
            "allowed_clients": [
                {"fingerprint_sha256": "AA:" * 31 + "AA"},
                {"common_name": "alice"},
            ],
            "allowed_networks": ["10.1.2.3/8"],
        },
    ).json()
    assert body["allowed_clients"][0] == {"fingerprint_sha256": "aa" * 32}
    assert body["allowed_networks"] == ["10.0.0.0/8"]


def test_no_node_at_all_is_a_400(api, db):
    WorkerNode.objects.all().delete()
    response = api.post(URL, {"name": "x", "size": 512})
    assert response.status_code == 400
    assert "node" in response.json()


def test_history_records_the_api_user(api, superuser, default_node):
    body = api.post(URL, {"name": "audited", "size": 512}).json()
    api.patch(f"{URL}{body['id']}/", {"description": "changed"})
    export = Export.objects.get(pk=body["id"])
    records = list(export.history.all())
    assert [r.history_type for r in records] == ["~", "+"]
    assert all(r.history_user == superuser for r in records)
    delta = records[0].diff_against(records[1])
    assert [c.field for c in delta.changes] == ["description"]


def test_history_endpoint_lists_changes_newest_first(
    api, superuser, default_node, make_user, token_client
):
    body = api.post(URL, {"name": "trail", "size": 512}).json()
    api.patch(f"{URL}{body['id']}/", {"description": "now described", "enabled": False})
    response = api.get(f"{URL}{body['id']}/history/")
    assert response.status_code == 200
    entries = response.json()
    assert [e["type"] for e in entries] == ["changed", "created"]
    assert entries[0]["user"] == superuser.username
    changed = {c["field"]: (c["old"], c["new"]) for c in entries[0]["changes"]}
    assert changed == {"description": ("", "now described"), "enabled": (True, False)}
    assert token_client(make_user()).get(f"{URL}{body['id']}/history/").status_code == 403
