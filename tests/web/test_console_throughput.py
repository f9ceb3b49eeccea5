"""Throughput sampling (services.throughput) into bounded Redis ring buffers, and the charts:
the rates come from the growth of the sessions' byte counters between two samples."""

from __future__ import annotations

import json
import time

import pytest

from exports_app.services import throughput
from exports_app.templatetags.console import throughput_chart
from nbdworker.contract.snapshot import sessions_key
from tests.support.workerrecords import session_record

MiB = 1 << 20


def put_session(
    web_redis, node: str, sid: str, export: str, read: int, written: int, since: str
) -> None:
    session = {"id": sid, "export": export, "bytes_read": read, "bytes_written": written,
               "connected_since": since}  # fmt: skip
    web_redis.hset(sessions_key(node), sid, session_record(node, session))


def sample(web_redis, now: float) -> bool:
    web_redis.delete(throughput.LOCK_KEY)  # each call is a new interval
    return throughput.sample_once(["n1"], now=now, client=web_redis)


def test_rates_come_from_counter_growth_between_samples(web_redis) -> None:
    put_session(web_redis, "n1", "s1", "disk", 100 * MiB, 0, "2020-01-01T00:00:00Z")
    assert sample(web_redis, 1000.0)
    assert web_redis.llen(throughput.node_key("n1")) == 0  # one sample gives no rate yet
    put_session(web_redis, "n1", "s1", "disk", 200 * MiB, 10 * MiB, "2020-01-01T00:00:00Z")
    sample(web_redis, 1010.0)
    assert throughput.series(throughput.node_key("n1"), now=1010.0, client=web_redis) == [
        (1010.0, 10 * MiB, 1 * MiB)
    ]
    assert throughput.series(throughput.export_key("n1", "disk"), now=1010.0, client=web_redis) == [
        (1010.0, 10 * MiB, 1 * MiB)
    ]


def test_a_new_session_counts_from_zero_only_if_it_connected_since(web_redis) -> None:
    sample(web_redis, 1000.0)
    put_session(web_redis, "n1", "new", "a", 50 * MiB, 0, "1970-01-01T00:16:45Z")  # t=1005
    put_session(web_redis, "n1", "old", "b", 999 * MiB, 0, "1970-01-01T00:10:00Z")  # before t=1000
    sample(web_redis, 1010.0)
    assert throughput.series(throughput.export_key("n1", "a"), now=1010.0, client=web_redis) == [
        (1010.0, 5 * MiB, 0.0)
    ]
    assert throughput.series(throughput.export_key("n1", "b"), now=1010.0, client=web_redis) == [
        (1010.0, 0.0, 0.0)
    ]


def test_one_sample_per_interval_across_processes(web_redis) -> None:
    assert throughput.sample_once(["n1"], now=1000.0, client=web_redis)
    assert not throughput.sample_once(["n1"], now=1001.0, client=web_redis)


def test_ring_buffers_are_bounded(web_redis, monkeypatch) -> None:
    monkeypatch.setattr(throughput, "HISTORY", 5)
    for i in range(12):
        put_session(web_redis, "n1", "s1", "disk", i * MiB, 0, "2020-01-01T00:00:00Z")
        sample(web_redis, 1000.0 + 10 * i)
    assert web_redis.llen(throughput.node_key("n1")) == 5
    assert web_redis.ttl(throughput.node_key("n1")) > 0


def test_a_gap_gives_no_rate(web_redis) -> None:
    put_session(web_redis, "n1", "s1", "disk", 0, 0, "2020-01-01T00:00:00Z")
    sample(web_redis, 1000.0)
    put_session(web_redis, "n1", "s1", "disk", 500 * MiB, 0, "2020-01-01T00:00:00Z")
    sample(web_redis, 1000.0 + 10 * throughput.SAMPLE_SECONDS)
    assert web_redis.llen(throughput.node_key("n1")) == 0


def test_chart_is_inline_svg_with_a_summary() -> None:
    now = time.time()
    svg = str(throughput_chart([(now - 20, 1 * MiB, 0.0), (now - 10, 2 * MiB, 512.0)], "disk"))
    assert svg.startswith('<svg class="throughput-chart"')
    assert 'class="read"' in svg and 'class="written"' in svg
    assert "now 2.0\xa0MB/s read" in svg
    assert "No traffic" in str(throughput_chart([], "disk"))


@pytest.mark.django_db
def test_dashboard_charts_nodes_and_busiest_exports(web_redis, admin_client, default_node) -> None:
    key = throughput.export_key(default_node.name, "busy disk")
    web_redis.rpush(key, json.dumps([time.time() - 5, 3 * MiB, 0]))
    web_redis.rpush(
        throughput.node_key(default_node.name), json.dumps([time.time() - 5, 3 * MiB, 0])
    )
    html = admin_client.get("/admin/console/section/throughput/").content.decode()
    assert f"node {default_node.name}" in html
    assert "busy disk" in html and html.count("<svg") == 2


def sent_by_redis(web_redis) -> int:
    return int(web_redis.info("stats")["total_net_output_bytes"])


def test_sessions_no_worker_signed_count_for_nothing(web_redis) -> None:
    """Anyone who can write to Redis could draw any traffic on the charts with made-up sessions:
    the sampler believes only the records the node's worker signed."""
    forged = {"id": "f1", "export": "disk", "bytes_read": 0, "bytes_written": 0,
              "connected_since": "2020-01-01T00:00:00Z"}  # fmt: skip
    web_redis.hset(sessions_key("n1"), "f1", json.dumps(forged))
    sample(web_redis, 1000.0)
    web_redis.hset(sessions_key("n1"), "f1", json.dumps({**forged, "bytes_read": 500 * MiB}))
    sample(web_redis, 1010.0)
    export_series = throughput.series(throughput.export_key("n1", "disk"), 1010.0, web_redis)
    assert export_series == []
    assert throughput.series(throughput.node_key("n1"), now=1010.0, client=web_redis) == [
        (1010.0, 0.0, 0.0)
    ]


def test_100000_fake_sessions_and_garbage_state_are_not_read_by_the_sampler(web_redis) -> None:
    with web_redis.pipeline(transaction=False) as pipe:
        for start in range(0, 100_000, 10_000):
            pipe.hset(
                sessions_key("n1"),
                mapping={f"f{i}": json.dumps({"id": f"f{i}"}) for i in range(start, start + 10**4)},
            )
        pipe.execute()
    web_redis.hset(throughput.LAST_KEY, "n1 big", "x" * (32 << 20))
    web_redis.set(throughput.LAST_TIME_KEY, "not a time")
    before = sent_by_redis(web_redis)
    assert sample(web_redis, 1000.0)
    assert sent_by_redis(web_redis) - before < 256 << 10
    put_session(web_redis, "n1", "s1", "disk", 0, 0, "2020-01-01T00:00:00Z")
    web_redis.delete(sessions_key("n1"))
    put_session(web_redis, "n1", "s1", "disk", 0, 0, "2020-01-01T00:00:00Z")
    sample(web_redis, 1010.0)
    put_session(web_redis, "n1", "s1", "disk", 100 * MiB, 0, "2020-01-01T00:00:00Z")
    sample(web_redis, 1020.0)
    assert throughput.series(throughput.node_key("n1"), now=1020.0, client=web_redis)[-1] == (
        1020.0,
        10 * MiB,
        0.0,
    )


@pytest.mark.parametrize(
    "garbage",
    [b'["a", "b", "c"]', b"[1e999, 0, 0]", b'{"a": 1, "b": 2, "c": 3}', b"x" * (4 << 20)],
    ids=["strings", "infinite", "object", "4MiB"],
)
def test_garbage_chart_points_are_skipped_not_a_500(
    web_redis, admin_client, default_node, garbage
) -> None:
    key = throughput.node_key(default_node.name)
    web_redis.rpush(key, json.dumps([time.time() - 5, 3 * MiB, 0]))
    for _ in range(4):
        web_redis.rpush(key, garbage)
    before = sent_by_redis(web_redis)
    response = admin_client.get("/admin/console/section/throughput/")
    assert response.status_code == 200
    assert f"node {default_node.name}" in response.content.decode()
    assert sent_by_redis(web_redis) - before < 256 << 10
