"""Anyone who can write to Redis writes where the workers report (sessions, heartbeats) and
where the web side keeps its events and the observer's state. Before, the web side believed and
read all of it: 100,000 made-up sessions were read whole by every `/api/v1/sessions/` and became
100,000 `session.opened` events (each a webhook delivery per subscription) in one observer run;
a heartbeat key holding a list made Redis look down to the observer (no events at all); bytes
that are not UTF-8 and a garbage generation answered 500. Now only records signed with the
node's key (or the web side's own) count, every read is bounded, and every answer is 200."""

from __future__ import annotations

import json

import pytest

from exports_app.models import WorkerNode
from exports_app.services import events, observer, workerstatus
from nbdworker.contract.snapshot import heartbeat_key, published_key, sessions_key
from tests.support.workerrecords import heartbeat_record, session_record

SESSIONS = "/api/v1/sessions/"
NODES = "/api/v1/nodes/"
FAKE_SESSIONS = 100_000
# What one request may make Redis send: a few real records, never the hostile keys whole.
READ_BOUND = 256 << 10


@pytest.fixture
def r(web_redis):
    return web_redis


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    return lambda: django_capture_on_commit_callbacks(execute=True)


def sent_by_redis(r) -> int:
    return int(r.info("stats")["total_net_output_bytes"])


def session(sid: str, node: str, export: str = "disk") -> dict:
    return {
        "id": sid,
        "node": node,
        "export": export,
        "client": "192.0.2.1:40000",
        "tls": False,
        "client_identity": None,
        "reads": 0,
        "bytes_read": 0,
        "writes": 0,
        "bytes_written": 0,
        "requests": 0,
        "connected_since": "2026-01-01T00:00:00Z",
    }


def stream_kinds(r) -> list[str]:
    return [json.loads(f["event"])["kind"] for _, f in r.xrange(events.EVENT_STREAM)]


def fill_fake_sessions(r, node: str, count: int) -> None:
    """`count` unsigned, worker-looking sessions, written as a hostile client would."""
    with r.pipeline(transaction=False) as pipe:
        for start in range(0, count, 10_000):
            pipe.hset(
                sessions_key(node),
                mapping={
                    f"f{i:06x}": json.dumps(session(f"f{i:06x}", node))
                    for i in range(start, min(count, start + 10_000))
                },
            )
        pipe.execute()


def test_100000_fake_sessions_are_neither_read_nor_listed_nor_events(
    api, r, default_node, committed
) -> None:
    name = default_node.name
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60)
    with committed():
        assert observer.observe_workers()  # the first run records
    fill_fake_sessions(r, name, FAKE_SESSIONS)
    before = sent_by_redis(r)
    response = api.get(SESSIONS)
    assert response.status_code == 200, response.content
    assert response.json()["count"] == 0
    assert sent_by_redis(r) - before < READ_BOUND
    assert workerstatus.refused_records["too_many"] >= FAKE_SESSIONS
    with committed():
        assert observer.observe_workers()
    assert "session.opened" not in stream_kinds(r)
    assert api.get(NODES).status_code == 200


def test_unsigned_sessions_within_bounds_are_not_believed(api, r, default_node, committed):
    name = default_node.name
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60)
    with committed():
        assert observer.observe_workers()
    r.hset(sessions_key(name), "real", session_record(name, session("real", name)))
    r.hset(sessions_key(name), "fake", json.dumps(session("fake", name)))
    # Another node's genuine record copied here: signed, but not by this node's key.
    r.hset(sessions_key(name), "moved", session_record("other", session("moved", name)))
    # A genuine record under another id (to end someone else's session by it).
    r.hset(sessions_key(name), "alias", session_record(name, session("real", name)))
    response = api.get(SESSIONS)
    assert response.status_code == 200
    assert [s["id"] for s in response.json()["results"]] == ["real"]
    assert api.delete(f"{SESSIONS}fa/").status_code == 404
    with committed():
        assert observer.observe_workers()
    opened = [
        json.loads(f["event"])["object"]["id"]
        for _, f in r.xrange(events.EVENT_STREAM)
        if json.loads(f["event"])["kind"] == "session.opened"
    ]
    assert opened == ["real"]


def test_giant_and_malformed_values_answer_200_and_read_little(api, r, default_node, storage_root):
    """A 32 MiB heartbeat, a heartbeat key of another type, bytes that are not UTF-8, a
    generation that is no number, a 1 MiB session record."""
    other = WorkerNode.objects.create(
        name="other",
        listen="127.0.0.1:10810",
        storage_root=str(storage_root),
        tls_policy=default_node.tls_policy,
    )
    name = default_node.name
    r.setrange(heartbeat_key(name), 32 << 20, b"x")
    r.set(published_key(name), "\u0663\u0663")
    r.rpush(heartbeat_key("other"), "not a string")
    r.set(published_key("other"), b"\xff\xfe")
    r.hset(sessions_key(name), "big", "x" * (1 << 20))
    r.hset(sessions_key(name), "bytes", b"\xff\xfe\x80")
    r.hset(sessions_key("other"), b"\xff", b"\xff")
    before = sent_by_redis(r)
    nodes = api.get(NODES)
    assert nodes.status_code == 200, nodes.content
    statuses = {n["name"]: n["status"]["status"] for n in nodes.json()["results"]}
    assert statuses == {name: "offline", other.name: "offline"}
    sessions = api.get(SESSIONS)
    assert sessions.status_code == 200, sessions.content
    assert sent_by_redis(r) - before < 2 * READ_BOUND
    assert observer.observe_workers()  # another key type is not "Redis unreachable"


def test_ending_a_session_whose_record_is_giant_reads_little(api, r, default_node) -> None:
    """DELETE /sessions/<id>/ reads that one record: a 32 MiB one is refused unread."""
    name = default_node.name
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60)
    r.hset(sessions_key(name), "b16", "x" * (32 << 20))
    before = sent_by_redis(r)
    response = api.delete(f"{SESSIONS}b16/")
    assert response.status_code == 404, response.content
    assert sent_by_redis(r) - before < READ_BOUND
    assert workerstatus.refused_records["too_large"] >= 1
    r.hset(sessions_key(name), "ea1", session_record(name, session("ea1", name)))
    assert api.delete(f"{SESSIONS}ea1/").status_code == 202


def test_giant_event_entries_are_skipped_unread_by_the_list_and_the_stream(
    api, r, default_node, committed, settings
) -> None:
    """Stream entries are read whole by XRANGE / XREAD: three 16 MiB entries added by someone
    else went to every reader, the list and each open event stream (and the stream's start)."""
    settings.NBDWEB_EVENT_STREAM_MAX_SECONDS = 1.0
    with committed():
        events.emit("node.online", {"type": "workernode", "id": None, "name": "before"}, {})
    for _ in range(3):
        r.xadd(events.EVENT_STREAM, {"event": "x" * (16 << 20)})
    with committed():
        events.emit("node.online", {"type": "workernode", "id": None, "name": "after"}, {})
    before = sent_by_redis(r)
    listed = api.get("/api/v1/events/")
    assert listed.status_code == 200, listed.content
    assert [e["object"]["name"] for e in listed.json()] == ["before", "after"]
    assert events.refused_events["too_large"] >= 3
    stream = api.get("/api/v1/events/stream/", HTTP_LAST_EVENT_ID="0-0")
    text = b"".join(stream.streaming_content).decode()
    assert text.count("event: node.online") == 2
    assert sent_by_redis(r) - before < READ_BOUND
    r.xadd(events.EVENT_STREAM, {"event": "x" * (16 << 20)})
    before = sent_by_redis(r)
    assert b"".join(api.get("/api/v1/events/stream/").streaming_content)  # starts after it
    assert sent_by_redis(r) - before < READ_BOUND


def test_a_giant_published_generation_is_not_read_whole(api, r, default_node) -> None:
    r.setrange(published_key(default_node.name), 8 << 20, b"1")
    before = sent_by_redis(r)
    nodes = api.get(NODES)
    assert nodes.status_code == 200, nodes.content
    assert sent_by_redis(r) - before < READ_BOUND


class _WriterRacesAfterFirstRoundTrip:
    """The web side's Redis client, with a hostile writer that acts right after the first
    pipeline it sends has been answered (where a writer toggling a field in a loop lands)."""

    def __init__(self, client, race) -> None:
        self._client, self._race = client, race

    def __getattr__(self, name):
        return getattr(self._client, name)

    def pipeline(self, *args, **kwargs):
        pipe = self._client.pipeline(*args, **kwargs)
        execute, race = pipe.execute, self

        def execute_then_race(*a, **k):
            replies = execute(*a, **k)
            if race._race is not None:
                race._race, writer = None, race._race
                writer()
            return replies

        pipe.execute = execute_then_race
        return pipe


def test_sessions_grown_between_the_size_check_and_the_read_are_not_read(
    api, r, default_node, monkeypatch
) -> None:
    name = default_node.name
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60)
    r.hset(sessions_key(name), "ea1", session_record(name, session("ea1", name)))
    real = workerstatus.redis_client()
    giant = lambda: r.hset(sessions_key(name), "b16", "x" * (32 << 20))  # noqa: E731
    monkeypatch.setattr(
        workerstatus, "redis_client", lambda: _WriterRacesAfterFirstRoundTrip(real, giant)
    )
    before = sent_by_redis(r)
    sessions = workerstatus.list_sessions([name])
    assert sent_by_redis(r) - before < READ_BOUND
    assert [s["id"] for s in sessions] == ["ea1"]


def test_a_worker_signing_non_finite_numbers_is_refused_not_a_500(api, r, default_node) -> None:
    """A compromised worker signs with its own key: NaN or Infinity in its records (Python's
    JSON reads and writes them) made every node and session list a 500 (strict JSON out)."""
    name = default_node.name
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "uptime": float("nan")}))
    infinite_reads = {**session("ea1", name), "reads": 1e999}
    r.hset(sessions_key(name), "ea1", session_record(name, infinite_reads))
    nodes = api.get(NODES)
    assert nodes.status_code == 200, nodes.content
    assert {n["name"]: n["status"]["status"] for n in nodes.json()["results"]} == {name: "offline"}
    # The same signature holds over 1e999, which reads as Infinity without being a constant.
    signed = heartbeat_record(name, {"node": name, "uptime": float("inf")})
    r.set(heartbeat_key(name), signed.replace("Infinity", "1e999"))
    assert api.get(NODES).status_code == 200
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60)
    sessions = api.get(SESSIONS)
    assert sessions.status_code == 200, sessions.content
    assert (sessions.json()["count"], sessions.json()["unknown_nodes"]) == (0, [])


def test_forged_events_are_not_listed(api, r, default_node, committed) -> None:
    with committed():
        events.emit("node.online", {"type": "workernode", "id": None, "name": "real"}, {})
    forged = {"kind": "node.online", "time": "2026-01-01T00:00:00Z", "object": {}, "data": {}}
    r.xadd(events.EVENT_STREAM, {"event": json.dumps(forged)})
    r.xadd(events.EVENT_STREAM, {"event": "x" * (1 << 20)})
    response = api.get("/api/v1/events/")
    assert response.status_code == 200
    listed = response.json()
    listed = listed["results"] if isinstance(listed, dict) else listed
    assert [e["object"].get("name") for e in listed] == ["real"]


def test_a_forged_observed_state_invents_no_ended_sessions(r, default_node, committed) -> None:
    name = default_node.name
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60)
    with committed():
        assert observer.observe_workers()
    fake = {name: {"online": True, "sessions": {"ghost": {"export": "disk"}}}}
    r.set(observer.OBSERVED_KEY, json.dumps(fake))
    with committed():
        assert observer.observe_workers()
    assert "session.ended" not in stream_kinds(r)


def test_one_run_emits_a_bounded_number_of_session_events_and_loses_none(
    r, default_node, committed, settings
) -> None:
    """Genuine sessions beyond one run's budget wait for the next run."""
    name = default_node.name
    total = observer.MAX_EVENTS_PER_RUN + 200
    r.set(heartbeat_key(name), heartbeat_record(name, {"node": name, "generation": 1}), ex=60)
    with committed():
        assert observer.observe_workers()
    r.hset(
        sessions_key(name),
        mapping={f"s{i}": session_record(name, session(f"s{i}", name)) for i in range(total)},
    )
    with committed():
        assert observer.observe_workers()
    assert stream_kinds(r).count("session.opened") == observer.MAX_EVENTS_PER_RUN
    with committed():
        assert observer.observe_workers()
    assert stream_kinds(r).count("session.opened") == total
    with committed():
        assert observer.observe_workers()
    assert stream_kinds(r).count("session.opened") == total
