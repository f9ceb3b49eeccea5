"""Events: what emits them (export states, job outcomes, revocations, the workers' heartbeats
and sessions, expiring certificates), the Redis stream they go to, and reading them back
through `/api/v1/events/` and the server-sent-events stream, filtered by permission."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from exports_app.api import events as event_api
from exports_app.choices import ExportState, JobKind
from exports_app.models import Certificate, Export, Job
from exports_app.services import events, observer
from exports_app.tasks import fail_job
from nbdworker.contract.snapshot import heartbeat_key, sessions_key
from tests.support.workerrecords import heartbeat_record, session_record

EVENTS = "/api/v1/events/"
STREAM = "/api/v1/events/stream/"


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Run the on-commit callbacks (where events are recorded) of the block."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


def recorded(web_redis) -> list[dict]:
    return [json.loads(f["event"]) for _, f in web_redis.xrange(events.EVENT_STREAM)]


def test_export_state_changes_are_recorded(web_redis, default_node, committed) -> None:
    with committed():
        export = Export.objects.create(node=default_node, name="disk1", size=1 << 20)
    pk = export.pk
    with committed():
        export.state = ExportState.READY
        export.save()
    with committed():
        export.description = "no state change"
        export.save()
    with committed():
        export.delete()
    states = [
        (e["data"]["old"], e["data"]["new"])
        for e in recorded(web_redis)
        if e["kind"] == "export.state_changed"
    ]
    assert states == [(None, "provisioning"), ("provisioning", "ready"), ("ready", None)]
    assert recorded(web_redis)[0]["object"] == {"type": "export", "id": pk, "name": "disk1"}


def test_nothing_is_recorded_on_rollback(web_redis, default_node, committed) -> None:
    from django.db import transaction

    with committed(), pytest.raises(RuntimeError), transaction.atomic():
        Export.objects.create(node=default_node, name="rolled-back", size=1 << 20)
        raise RuntimeError
    assert recorded(web_redis) == []


def test_a_failed_job_is_an_event(web_redis, default_node, committed) -> None:
    with committed():
        export = Export.objects.create(node=default_node, name="disk2", size=1 << 20)
        job = Job.objects.create(
            kind=JobKind.CREATE, export=export, export_name=export.name, node=default_node
        )
    with committed():
        fail_job(job.pk, "disk full")
    failed = [e for e in recorded(web_redis) if e["kind"] == "job.failed"]
    assert len(failed) == 1
    assert failed[0]["object"]["id"] == job.pk
    assert failed[0]["data"]["error"] == "disk full"
    assert failed[0]["data"]["export"] == export.pk


def test_revoking_a_certificate_is_one_event(web_redis, api, client_certificate, committed) -> None:
    url = f"/api/v1/certificates/{client_certificate.pk}/revoke/"
    with committed():
        assert api.post(url, {"reason": "laptop lost"}).status_code == 200
    with committed():
        api.post(url, {"reason": "again"})  # already revoked: no second event
    revoked = [e for e in recorded(web_redis) if e["kind"] == "certificate.revoked"]
    assert len(revoked) == 1
    assert revoked[0]["data"]["serial"] == client_certificate.serial
    assert revoked[0]["data"]["reason"] == "laptop lost"


def test_certificates_about_to_expire_are_announced_once(web_redis, authority, committed) -> None:
    from exports_app.choices import CertificateKind
    from exports_app.services import ca

    soon = ca.issue_certificate(authority, CertificateKind.CLIENT, "bob", name="bob")
    Certificate.objects.filter(pk=soon.pk).update(not_after=timezone.now() + timedelta(days=3))
    with committed():
        assert observer.check_expiry() == 1
    with committed():
        assert observer.check_expiry() == 0
    expiring = [e for e in recorded(web_redis) if e["kind"] == "certificate.expiring"]
    assert [e["object"]["id"] for e in expiring] == [soon.pk]


def _session(node: str, sid: str, export: str) -> str:
    return session_record(
        node,
        {"id": sid, "export": export, "client": "127.0.0.1:5000", "tls": False,
         "client_identity": None, "connected_since": "2026-01-01T00:00:00Z"}
    )  # fmt: skip


def test_observer_turns_heartbeats_and_sessions_into_events(
    web_redis, default_node, committed
) -> None:
    name = default_node.name
    with committed():
        assert observer.observe_workers()  # the first look only records
    web_redis.set(
        heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60
    )
    web_redis.hset(sessions_key(name), "s1", _session(name, "s1", "disk1"))
    with committed():
        assert observer.observe_workers()
    web_redis.hdel(sessions_key(name), "s1")
    web_redis.hset(sessions_key(name), "s2", _session(name, "s2", "disk2"))
    with committed():
        assert observer.observe_workers()
    web_redis.delete(heartbeat_key(name), sessions_key(name))
    with committed():
        assert observer.observe_workers()
    seen = [(e["kind"], e["object"].get("id") or e["object"]["name"]) for e in recorded(web_redis)]
    assert seen == [
        ("node.online", name),
        ("session.opened", "s1"),
        ("session.opened", "s2"),
        ("session.ended", "s1"),
        ("session.ended", "s2"),
        ("node.offline", name),
    ]


def test_observer_runs_once_at_a_time(web_redis, default_node) -> None:
    web_redis.set(observer.LOCK_KEY, "another run", ex=30)
    assert observer.observe_workers() is False


def test_unreachable_redis_is_not_a_node_going_offline(web_redis, default_node, settings) -> None:
    name = default_node.name
    web_redis.set(heartbeat_key(name), heartbeat_record(name, {"node": name}), ex=60)
    observer.observe_workers()
    url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    assert observer.observe_workers() is False
    settings.REDIS_URL = url
    assert recorded(web_redis) == []


# -- reading them back ---------------------------------------------------------------------------


@pytest.fixture
def some_events(web_redis, default_node, client_certificate, committed) -> None:
    with committed():
        Export.objects.create(node=default_node, name="disk3", size=1 << 20)
    with committed():
        client_certificate.revoked_at = timezone.now()
        client_certificate.save()


def test_events_list_resumes_after_an_id(api, some_events) -> None:
    everything = api.get(EVENTS).json()
    assert [e["kind"] for e in everything] == ["export.state_changed", "certificate.revoked"]
    after_first = api.get(EVENTS, {"after": everything[0]["id"]}).json()
    assert [e["id"] for e in after_first] == [everything[1]["id"]]
    assert api.get(EVENTS, {"after": "yesterday"}).status_code == 400
    assert api.get(EVENTS, {"limit": "0"}).status_code == 400


def test_events_list_shows_only_what_the_user_may_view(make_user, token_client, some_events):
    viewer = token_client(make_user("exports_app.view_export"))
    assert [e["kind"] for e in viewer.get(EVENTS).json()] == ["export.state_changed"]
    # A user who may view no kind of event gets neither the list nor a stream (a stream holds
    # a gunicorn thread).
    nobody = token_client(make_user())
    assert nobody.get(EVENTS).status_code == 403
    assert nobody.get(STREAM, HTTP_ACCEPT="text/event-stream").status_code == 403


def test_events_need_authentication(anon_client, web_redis) -> None:
    assert anon_client.get(EVENTS).status_code == 401
    assert anon_client.get(STREAM, HTTP_ACCEPT="text/event-stream").status_code == 401


def _frames(response) -> list[dict[str, str]]:
    text = b"".join(response.streaming_content).decode()
    frames = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            frames.append(fields)
    return frames


def test_stream_resumes_after_last_event_id_and_filters(
    make_user, token_client, api, some_events, settings
) -> None:
    settings.NBDWEB_EVENT_STREAM_MAX_SECONDS = 0.5
    listed = api.get(EVENTS).json()
    response = api.get(STREAM, HTTP_ACCEPT="text/event-stream", HTTP_LAST_EVENT_ID="0-0")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    frames = _frames(response)
    assert [(f["id"], f["event"]) for f in frames] == [(e["id"], e["kind"]) for e in listed]
    assert json.loads(frames[1]["data"]) == listed[1]

    after_first = _frames(
        api.get(STREAM, {"last_event_id": listed[0]["id"]}, HTTP_ACCEPT="text/event-stream")
    )
    assert [f["id"] for f in after_first] == [listed[1]["id"]]

    viewer = token_client(make_user("exports_app.view_certificate"))
    only_certs = _frames(viewer.get(STREAM, HTTP_LAST_EVENT_ID="0-0"))
    assert [f["event"] for f in only_certs] == ["certificate.revoked"]


def test_stream_ends_at_its_deadline_and_says_when_to_reconnect(api, web_redis, settings):
    # A stream holds a gunicorn thread: it ends after NBDWEB_EVENT_STREAM_MAX_SECONDS, and
    # its first frame tells EventSource how soon to come back (with Last-Event-ID).
    settings.NBDWEB_EVENT_STREAM_MAX_SECONDS = 0.3
    response = api.get(STREAM, HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    text = b"".join(response.streaming_content).decode()
    assert text.startswith(f"retry: {event_api.RECONNECT_MS}\n\n"), text
    assert event_api.RECONNECT_MS <= 10_000


def test_stream_without_an_id_starts_with_the_next_event(api, some_events, settings) -> None:
    settings.NBDWEB_EVENT_STREAM_MAX_SECONDS = 0.3
    assert _frames(api.get(STREAM)) == []


def test_stream_refuses_a_malformed_last_event_id(api, web_redis) -> None:
    response = api.get(STREAM, HTTP_LAST_EVENT_ID="../../etc", HTTP_ACCEPT="application/json")
    assert response.status_code == 400
    assert "Last-Event-ID" in response.json()


def test_open_streams_are_capped_per_user_and_in_all(
    make_user, token_client, web_redis, settings
) -> None:
    settings.NBDWEB_EVENT_STREAM_MAX_SECONDS = 0.2
    settings.NBDWEB_EVENT_STREAMS_PER_USER = 2
    settings.NBDWEB_EVENT_STREAMS_TOTAL = 3
    alice = token_client(make_user("exports_app.view_export"))
    bob = token_client(make_user("exports_app.view_export"))
    # Responses not yet read are streams still open: each holds its slot.
    open_streams = [alice.get(STREAM), alice.get(STREAM)]
    assert all(s.status_code == 200 for s in open_streams)
    refused = alice.get(STREAM, HTTP_ACCEPT="application/json")
    assert refused.status_code == 429
    assert refused["Retry-After"] == str(settings.NBDWEB_EVENT_STREAM_RETRY_AFTER_SECONDS)
    open_streams.append(bob.get(STREAM))
    assert open_streams[-1].status_code == 200
    assert bob.get(STREAM).status_code == 429  # the global cap
    # A stream that ends gives its slot back.
    _frames(open_streams.pop(0))
    open_streams.append(bob.get(STREAM))
    assert open_streams[-1].status_code == 200
    for response in open_streams:
        response.close()
    assert web_redis.zcard(event_api.STREAM_SLOTS_KEY) == 0


def test_slots_of_a_dead_process_lapse(make_user, token_client, web_redis, settings) -> None:
    settings.NBDWEB_EVENT_STREAMS_TOTAL = 1
    # A slot that lapsed a second ago, as a crashed web process leaves it.
    web_redis.zadd(event_api.STREAM_SLOTS_KEY, {"crashed": time.time() - 1})
    settings.NBDWEB_EVENT_STREAM_MAX_SECONDS = 0.2
    viewer = token_client(make_user("exports_app.view_export"))
    response = viewer.get(STREAM)
    assert response.status_code == 200
    _frames(response)
