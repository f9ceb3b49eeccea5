"""`/api/v1/sessions/` and the status in `/api/v1/nodes/`, reading what a worker writes to a
private Redis (the entries are written here in the worker's format; the real worker is driven
in tests/e2e/test_config_distribution.py)."""

from __future__ import annotations

import pytest

from exports_app.models import PendingPublish, WorkerNode
from nbdworker.contract.snapshot import (
    heartbeat_key,
    kick_channel,
    kicks_key,
    published_key,
    sessions_key,
)
from tests.support.workerrecords import heartbeat_record, session_record

SESSIONS = "/api/v1/sessions/"


def session(sid: str, node: str, export: str, since: str = "2026-01-01T00:00:00Z") -> dict:
    return {
        "id": sid,
        "node": node,
        "client": "127.0.0.1:40000",
        "export": export,
        "tls": False,
        "client_identity": None,
        "reads": 3,
        "bytes_read": 12288,
        "writes": 1,
        "bytes_written": 4096,
        "requests": 4,
        "connected_since": since,
    }


def signed(node: str, sid: str, export: str, *since: str) -> str:
    return session_record(node, session(sid, node, export, *since))


@pytest.fixture
def live(web_redis, default_node, storage_root) -> WorkerNode:
    """Two nodes with a heartbeat; three sessions between them."""
    other = WorkerNode.objects.create(
        name="other",
        listen="127.0.0.1:10810",
        storage_root=str(storage_root),
        tls_policy=default_node.tls_policy,
    )
    # The fixtures' changes count as published (this test's transaction never commits).
    PendingPublish.objects.all().delete()
    for node in (default_node, other):
        beat = heartbeat_record(node.name, {"node": node.name, "generation": 5})
        web_redis.set(heartbeat_key(node.name), beat, ex=60)
    web_redis.hset(
        sessions_key(default_node.name),
        mapping={
            "aa01": signed(default_node.name, "aa01", "disk1"),
            "aa02": signed(default_node.name, "aa02", "disk2", "2026-01-02T00:00:00Z"),
        },
    )
    web_redis.hset(sessions_key("other"), "bb01", signed("other", "bb01", "disk1"))
    return other


def test_anonymous_is_refused(anon_client, live) -> None:
    assert anon_client.get(SESSIONS).status_code == 401
    assert anon_client.delete(f"{SESSIONS}aa01/").status_code == 401


def test_listing_needs_view_export(make_user, token_client, live) -> None:
    assert token_client(make_user()).get(SESSIONS).status_code == 403
    response = token_client(make_user("exports_app.view_export")).get(SESSIONS)
    assert response.status_code == 200
    assert sorted(s["id"] for s in response.json()["results"]) == ["aa01", "aa02", "bb01"]


def test_list_shows_each_session_and_filters(api, live, default_node) -> None:
    sessions = api.get(SESSIONS).json()["results"]
    first = next(s for s in sessions if s["id"] == "aa01")
    assert first == {**session("aa01", default_node.name, "disk1"), "node": default_node.name}
    by_node = api.get(SESSIONS, {"node": "other"}).json()["results"]
    assert [s["id"] for s in by_node] == ["bb01"]
    by_id = api.get(SESSIONS, {"node": str(live.pk)}).json()["results"]
    assert [s["id"] for s in by_id] == ["bb01"]
    by_export = api.get(SESSIONS, {"export": "disk1"}).json()["results"]
    assert sorted(s["id"] for s in by_export) == ["aa01", "bb01"]
    both = api.get(SESSIONS, {"export": "disk1", "node": default_node.name}).json()["results"]
    assert [s["id"] for s in both] == ["aa01"]


def test_the_list_is_paginated_like_every_other(api, live) -> None:
    body = api.get(SESSIONS, {"limit": 2}).json()
    assert (body["count"], len(body["results"]), body["previous"]) == (3, 2, None)
    assert body["unknown_nodes"] == []
    rest = api.get(body["next"]).json()
    # Oldest first: aa01 and bb01 connected on the 1st, aa02 on the 2nd.
    assert [s["id"] for s in rest["results"]] == ["aa02"] and rest["next"] is None


def test_an_offline_workers_sessions_are_unknown_not_none(api, live, web_redis) -> None:
    # The node's worker stopped: its heartbeat expired, its last session entry lingers.
    web_redis.delete(heartbeat_key("other"))
    body = api.get(SESSIONS).json()
    assert body["unknown_nodes"] == ["other"]
    assert sorted(s["id"] for s in body["results"]) == ["aa01", "aa02"]
    only_other = api.get(SESSIONS, {"node": "other"}).json()
    assert (only_other["count"], only_other["unknown_nodes"]) == (0, ["other"])


def test_kicking_needs_change_export(make_user, token_client, live, web_redis) -> None:
    viewer = token_client(make_user("exports_app.view_export"))
    assert viewer.delete(f"{SESSIONS}aa01/").status_code == 403
    assert web_redis.smembers(kicks_key("default")) == set()


def test_kick_asks_the_sessions_worker_and_notifies_it(
    make_user, token_client, live, web_redis
) -> None:
    editor = token_client(make_user("exports_app.view_export", "exports_app.change_export"))
    pubsub = web_redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(kick_channel("other"))
    try:
        assert editor.delete(f"{SESSIONS}bb01/").status_code == 202
        message = None
        while message is None:
            message = pubsub.get_message(timeout=10)
    finally:
        pubsub.close()
    assert message["data"] == "other"
    assert web_redis.smembers(kicks_key("other")) == {"bb01"}
    assert web_redis.ttl(kicks_key("other")) > 0
    assert web_redis.smembers(kicks_key("default")) == set()


def test_kicking_an_unknown_session_is_404(api, live) -> None:
    assert api.delete(f"{SESSIONS}ffff/").status_code == 404


def test_redis_down_is_503_not_500(api, live, settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    assert api.get(SESSIONS).status_code == 503
    assert api.delete(f"{SESSIONS}aa01/").status_code == 503


# -- node status ---------------------------------------------------------------------------------


def test_node_status_online_offline_and_current(api, web_redis, default_node, live) -> None:
    web_redis.set(published_key(default_node.name), 7)  # newer than the heartbeat's 5
    web_redis.set(published_key("other"), 5)
    offline = WorkerNode.objects.create(
        name="gone",
        listen="127.0.0.1:10811",
        storage_root=default_node.storage_root,
        tls_policy=default_node.tls_policy,
    )
    web_redis.set(published_key("gone"), 3)
    nodes = {n["name"]: n["status"] for n in api.get("/api/v1/nodes/").json()["results"]}
    assert nodes[default_node.name]["status"] == "online"
    assert nodes[default_node.name]["generation_applied"] == 5
    assert nodes[default_node.name]["generation_published"] == 7
    assert nodes[default_node.name]["current"] is False
    assert nodes["other"]["current"] is True
    assert nodes["gone"] == {
        "status": "offline",
        "generation_applied": None,
        "generation_published": 3,
        "current": None,
        "heartbeat": None,
    }
    detail = api.get(f"/api/v1/nodes/{offline.pk}/").json()
    assert detail["status"]["status"] == "offline"


def test_node_status_is_unknown_without_redis(api, default_node, settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = api.get("/api/v1/nodes/")
    assert response.status_code == 200
    assert response.json()["results"][0]["status"]["status"] == "unknown"


# -- admin ---------------------------------------------------------------------------------------

ADMIN_SESSIONS = "/admin/exports_app/workernode/sessions/"


def test_admin_node_list_shows_worker_status(staff, live, web_redis, default_node) -> None:
    web_redis.set(published_key(default_node.name), 5)
    page = staff(superuser=True).get("/admin/exports_app/workernode/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'data-state="online"' in html and "config current" in html
    assert "generation" not in html.lower()


def test_admin_sessions_page_lists_and_ends_sessions(staff, live, web_redis) -> None:
    client = staff(superuser=True)
    page = client.get(ADMIN_SESSIONS, {"node": "other"})
    text = page.content.decode()
    assert page.status_code == 200
    assert "bb01" in text and "aa01" not in text
    assert "End session" in text
    response = client.post(f"{ADMIN_SESSIONS}?node=other", {"end": "bb01"})
    assert response.status_code == 302
    assert web_redis.smembers(kicks_key("other")) == {"bb01"}


def test_admin_sessions_page_needs_the_export_permissions(staff, live, web_redis) -> None:
    assert staff().get(ADMIN_SESSIONS).status_code == 403
    viewer = staff("exports_app.view_export")
    page = viewer.get(ADMIN_SESSIONS)
    assert page.status_code == 200
    assert "aa01" in page.content.decode()
    assert "End session" not in page.content.decode()
    assert viewer.post(ADMIN_SESSIONS, {"end": "aa01"}).status_code == 403
    assert web_redis.smembers(kicks_key("default")) == set()
