"""Safe for tools that race: every object answer has an ETag, and PATCH and DELETE with
If-Match change only the version that was read (412 otherwise)."""

from __future__ import annotations

import pytest

from exports_app.models import Export, WorkerNode
from nbdworker.contract.snapshot import heartbeat_key
from tests.support.workerrecords import heartbeat_record

pytestmark = pytest.mark.django_db

EXPORTS = "/api/v1/exports/"


@pytest.fixture
def export(api, default_node) -> dict:
    response = api.post(EXPORTS, {"name": "etag1", "size": "1G"}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_every_object_answer_has_an_etag_that_changes_only_with_the_object(api, export):
    url = f"{EXPORTS}{export['id']}/"
    first, again = api.get(url), api.get(url)
    assert first["ETag"].startswith('"') and first["ETag"] == again["ETag"]
    changed = api.patch(url, {"description": "new"}, format="json")
    assert changed.status_code == 200
    assert changed["ETag"] != first["ETag"]
    assert api.get(url)["ETag"] == changed["ETag"]
    job = api.get(f"/api/v1/jobs/{export['job']}/")
    assert job.status_code == 200 and job["ETag"]
    node = api.get(f"/api/v1/nodes/{export['node']}/")
    assert node["ETag"]


def test_patch_with_a_stale_if_match_is_refused_and_changes_nothing(api, export):
    url = f"{EXPORTS}{export['id']}/"
    stale = api.get(url)["ETag"]
    fresh = api.patch(url, {"description": "first"}, format="json", HTTP_IF_MATCH=stale)
    assert fresh.status_code == 200, fresh.content
    # A second client that read the same version loses.
    response = api.patch(url, {"description": "second"}, format="json", HTTP_IF_MATCH=stale)
    assert response.status_code == 412
    assert "detail" in response.json()
    assert Export.objects.get(pk=export["id"]).description == "first"
    # The current ETag, several tags, or * go through; a weak tag never matches.
    current = fresh["ETag"]
    assert (
        api.patch(url, {"enabled": False}, format="json", HTTP_IF_MATCH=current).status_code == 200
    )
    assert (
        api.patch(
            url, {"enabled": True}, format="json", HTTP_IF_MATCH=f'"x", W/{current}'
        ).status_code
        == 412
    )
    assert api.patch(url, {"enabled": True}, format="json", HTTP_IF_MATCH="*").status_code == 200


def test_delete_with_a_stale_if_match_is_refused(api, export):
    url = f"{EXPORTS}{export['id']}/"
    stale = api.get(url)["ETag"]
    api.patch(url, {"description": "changed"}, format="json")
    assert api.delete(url, HTTP_IF_MATCH=stale).status_code == 412
    assert Export.objects.filter(pk=export["id"]).exists()
    current = api.get(url)["ETag"]
    assert api.delete(url, HTTP_IF_MATCH=current).status_code in (202, 204)


def test_if_match_on_another_resource(api, default_node):
    url = f"/api/v1/nodes/{default_node.pk}/"
    etag = api.get(url)["ETag"]
    WorkerNode.objects.filter(pk=default_node.pk).update(description="changed behind")
    response = api.patch(url, {"description": "mine"}, format="json", HTTP_IF_MATCH=etag)
    assert response.status_code == 412
    assert WorkerNode.objects.get(pk=default_node.pk).description == "changed behind"


def test_put_is_not_offered(api, export):
    url = f"{EXPORTS}{export['id']}/"
    response = api.put(url, {"name": "etag1", "size": "2G"}, format="json")
    assert response.status_code == 405
    assert "PUT" not in response["Allow"]


def test_a_get_whose_if_none_match_names_the_current_version_is_304(api, export):
    url = f"{EXPORTS}{export['id']}/"
    etag = api.get(url)["ETag"]
    unchanged = api.get(url, HTTP_IF_NONE_MATCH=etag)
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert unchanged["ETag"] == etag
    assert api.get(url, HTTP_IF_NONE_MATCH=f'"other", {etag}').status_code == 304
    api.patch(url, {"description": "changed"}, format="json")
    changed = api.get(url, HTTP_IF_NONE_MATCH=etag)
    assert changed.status_code == 200
    assert changed.json()["description"] == "changed"


def test_the_etag_follows_what_the_answer_shows_not_only_the_row(api, export):
    # Renaming the node changes the export's `node_name` but no column of the export: a client
    # holding the old version must get the new answer, not a 304.
    url = f"{EXPORTS}{export['id']}/"
    etag = api.get(url)["ETag"]
    WorkerNode.objects.filter(pk=export["node"]).update(name="renamed")
    fresh = api.get(url, HTTP_IF_NONE_MATCH=etag)
    assert fresh.status_code == 200
    assert fresh.json()["node_name"] == "renamed"
    assert fresh["ETag"] != etag


def test_a_list_has_an_etag_and_answers_304_while_it_is_unchanged(api, export):
    listed = api.get(EXPORTS)
    etag = listed["ETag"]
    assert api.get(EXPORTS, HTTP_IF_NONE_MATCH=etag).status_code == 304
    api.post(EXPORTS, {"name": "etag2", "size": "1G"}, format="json")
    grown = api.get(EXPORTS, HTTP_IF_NONE_MATCH=etag)
    assert grown.status_code == 200
    assert grown.json()["count"] == 2


def test_a_nodes_etag_is_its_own_version_not_its_workers_heartbeat(api, default_node, web_redis):
    # The worker rewrites its heartbeat (with the time) every 2 s: a node read before one must
    # still be changeable with If-Match, and still unchanged to If-None-Match.
    def beat(time: str) -> None:
        record = {"node": default_node.name, "generation": 1, "time": time}
        web_redis.set(heartbeat_key(default_node.name), heartbeat_record(default_node.name, record))

    url = f"/api/v1/nodes/{default_node.pk}/"
    beat("2026-12-08T00:00:00Z")
    read = api.get(url)
    assert read.json()["status"]["status"] == "online"
    beat("2026-12-08T00:00:02Z")
    assert api.get(url, HTTP_IF_NONE_MATCH=read["ETag"]).status_code == 304
    changed = api.patch(url, {"description": "rack 4"}, format="json", HTTP_IF_MATCH=read["ETag"])
    assert changed.status_code == 200, changed.content
