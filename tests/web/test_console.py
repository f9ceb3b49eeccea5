"""The console's dashboard (/admin/) and its live sections: what each shows from the database
and from what the workers write to Redis (written here in the worker's format, to a private
Redis), who may see and do what, and the actions' effects. tests/e2e/test_console_browser.py
drives the same pages in a browser against a real worker."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from exports_app.choices import CertificateKind, ExportState, JobKind, JobState
from exports_app.console import overview
from exports_app.models import Certificate, Export, Job, PendingPublish, WorkerNode
from exports_app.services import ca
from nbdworker.contract.snapshot import heartbeat_key, kicks_key, published_key, sessions_key
from tests.support.workerrecords import heartbeat_record, session_record

DASHBOARD = "/admin/"


def section_url(name: str) -> str:
    return f"/admin/console/section/{name}/"


def text(response) -> str:
    """The page, with the no-break spaces of filesizeformat as plain spaces."""
    return response.content.decode().replace("\xa0", " ")


def heartbeat(node: str, generation: int = 5, **extra) -> str:
    return heartbeat_record(
        node,
        {
            "version": "0.1.0",
            "node": node,
            "generation": generation,
            "uptime": 3725.0,
            "sessions": 1,
            "time": timezone.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "storage": [
                {"root": "/srv/images", "total": 100 << 30, "used": 25 << 30, "free": 70 << 30}
            ],
            **extra,
        },
    )


def session(sid: str, node: str, export: str, bytes_read: int = 12288) -> str:
    return session_record(
        node,
        {
            "id": sid,
            "node": node,
            "client": "192.0.2.7:40000",
            "export": export,
            "tls": True,
            "client_identity": {
                "common_names": ["alice"],
                "serial": "1f",
                "fingerprint_sha256": "ab" * 32,
            },
            "reads": 3,
            "bytes_read": bytes_read,
            "writes": 1,
            "bytes_written": 4096,
            "requests": 4,
            "connected_since": "2026-01-01T00:00:00Z",
        },
    )


@pytest.fixture
def live(web_redis, default_node) -> WorkerNode:
    # The fixtures' changes count as published (this test's transaction never commits).
    PendingPublish.objects.all().delete()
    web_redis.set(heartbeat_key(default_node.name), heartbeat(default_node.name), ex=60)
    web_redis.set(published_key(default_node.name), 5)
    web_redis.hset(
        sessions_key(default_node.name), "aa01", session("aa01", default_node.name, "disk1")
    )
    return default_node


# -- the page and its permissions ------------------------------------------------------------------


def test_dashboard_needs_a_staff_login(client, db) -> None:
    response = client.get(DASHBOARD)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_superuser_sees_every_section_with_live_updates(staff, live) -> None:
    page = staff(superuser=True).get(DASHBOARD).content.decode()
    for name in ("nodes", "live-sessions", "jobs", "exports", "certificates"):
        assert f'data-testid="{name}"' in page
    assert 'hx-get="/admin/console/section/sessions/"' in page
    assert "django_htmx/htmx-2.min.js" in page  # served by the app, not a CDN
    assert "Recent actions" not in page


def test_sections_follow_the_api_permissions(staff, live) -> None:
    client = staff("exports_app.view_job")
    page = client.get(DASHBOARD).content.decode()
    assert 'data-testid="jobs"' in page
    assert 'data-testid="live-sessions"' not in page
    assert 'data-testid="nodes"' not in page
    assert client.get(section_url("sessions")).status_code == 403
    assert client.get(section_url("jobs")).status_code == 200
    assert client.get(section_url("nope")).status_code == 404


# -- nodes ----------------------------------------------------------------------------------------


def test_node_card_says_online_current_version_uptime_and_capacity(staff, live) -> None:
    html = text(staff("exports_app.view_workernode").get(section_url("nodes")))
    assert 'data-state="online"' in html
    assert "config current" in html
    assert "0.1.0, up 1 h 2 min" in html
    assert "/srv/images" in html
    assert "25.0 GB used of 100.0 GB, 70.0 GB free" in html
    assert "1 session open" in html


def test_node_behind_is_said_in_words_without_generation_numbers(staff, live, web_redis) -> None:
    published = int(timezone.now().timestamp() * 1000) - 90_000
    web_redis.set(published_key(live.name), published)
    html = text(staff("exports_app.view_workernode").get(section_url("nodes")))
    assert "config behind" in html
    assert "(1 min 30 s ago) is not applied yet" in html or "1 min 3" in html
    assert str(published) not in html


def test_offline_node_shows_when_it_was_last_seen(staff, live, web_redis) -> None:
    client = staff("exports_app.view_workernode")
    client.get(section_url("nodes"))  # seen online once
    web_redis.delete(heartbeat_key(live.name))
    html = client.get(section_url("nodes")).content.decode()
    assert 'data-state="offline"' in html
    assert "last seen" in html and "ago" in html


# -- sessions -------------------------------------------------------------------------------------


def test_sessions_show_export_client_tls_identity_and_bytes(staff, live) -> None:
    html = text(staff("exports_app.view_export").get(section_url("sessions")))
    assert 'data-testid="live-sessions"' in html
    assert 'data-export="disk1"' in html
    assert "192.0.2.7:40000" in html
    assert "TLS" in html and "alice (serial 1f)" in html
    assert "12.0 KB" in html and "4.0 KB" in html
    assert "End session" not in html  # viewing only


def test_session_throughput_comes_from_two_samples(staff, live, web_redis) -> None:
    client = staff("exports_app.view_export")
    client.get(section_url("sessions"))
    key = f"nbdweb:console:rate:{live.name}:aa01"
    (t0, *_), *_ = json.loads(web_redis.get(key))
    # The counters moved by 100 MiB twenty seconds after the first sample.
    web_redis.set(key, json.dumps([[t0 - 20, 12288, 4096]]))
    web_redis.hset(
        sessions_key(live.name), "aa01", session("aa01", live.name, "disk1", 12288 + (100 << 20))
    )
    html = text(client.get(section_url("sessions")))
    # 100 MiB over 20 s and however long the request took (the second sample is taken now, not
    # at t0): 5.2 MB/s, down to 4.0 MB/s for a request slowed by up to 6 s on a loaded machine.
    assert re.search(r"↓ [45]\.\d MB/s", html), html


def test_ending_a_session_needs_change_export(staff, live, web_redis) -> None:
    client = staff("exports_app.view_export")
    response = client.post(f"/admin/console/sessions/{live.name}/aa01/end/")
    assert response.status_code == 403
    assert web_redis.smembers(kicks_key(live.name)) == set()


def test_ending_a_session_asks_its_worker(staff, live, web_redis) -> None:
    client = staff("exports_app.view_export", "exports_app.change_export")
    assert "End session" in client.get(section_url("sessions")).content.decode()
    response = client.post(f"/admin/console/sessions/{live.name}/aa01/end/")
    assert response.status_code == 200
    assert "asked to end" in response.content.decode()
    assert web_redis.smembers(kicks_key(live.name)) == {"aa01"}
    assert client.get(f"/admin/console/sessions/{live.name}/aa01/end/").status_code == 405


def test_sessions_without_redis_say_so(staff, default_node, settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    html = text(staff("exports_app.view_export").get(section_url("sessions")))
    assert "Redis is unreachable" in html


# -- jobs, exports, certificates ------------------------------------------------------------------


def _export(node: WorkerNode, name: str, state: str = ExportState.READY, **kw) -> Export:
    export = Export.objects.create(node=node, name=name, size=1 << 30, **kw)
    Export.objects.filter(pk=export.pk).update(state=state)
    export.refresh_from_db()
    return export


def test_running_job_has_a_progress_bar_throughput_and_eta(staff, live) -> None:
    export = _export(live, "big", ExportState.PROVISIONING)
    job = Job.objects.create(kind=JobKind.CREATE, export=export, export_name=export.name, node=live)
    Job.objects.filter(pk=job.pk).update(
        state=JobState.RUNNING, progress=40, started=timezone.now() - timedelta(seconds=40)
    )
    failed = Job.objects.create(
        kind=JobKind.VERIFY, export=export, export_name=export.name, node=live
    )
    Job.objects.filter(pk=failed.pk).update(
        state=JobState.FAILED, error="read error at 4096", finished=timezone.now()
    )
    html = staff("exports_app.view_job").get(section_url("jobs")).content.decode()
    assert '<progress value="40" max="100" aria-valuenow="40"' in html
    assert "MB/s" in html  # 40% of 1 GiB in 40 s
    assert "<td>1 min" in html  # 60% left at that pace
    assert "Last failures" in html and "read error at 4096" in html


def test_exports_in_trouble_come_with_their_reasons(staff, live, web_redis) -> None:
    _export(live, "fine")
    _export(live, "broken", ExportState.FAILED, description="x")
    Export.objects.filter(name="broken").update(last_error="qemu-img: disk full")
    html = staff("exports_app.view_export").get(section_url("exports")).content.decode()
    assert "In trouble" in html
    assert "broken" in html and "qemu-img: disk full" in html
    web_redis.delete(heartbeat_key(live.name))
    html = staff("exports_app.view_export").get(section_url("exports")).content.decode()
    assert f"node {live.name} is offline" in html


@pytest.fixture
def expiring(authority) -> Certificate:
    return ca.issue_certificate(
        authority, CertificateKind.SERVER, "soon.example", name="soon", validity_days=10
    )


def test_expiring_certificates_are_listed_with_renew_for_those_allowed(
    staff, live, expiring, client_certificate
) -> None:
    viewer = staff("exports_app.view_certificate")
    html = viewer.get(section_url("certificates")).content.decode()
    assert "soon" in html and client_certificate.name not in html
    assert "Renew" not in html
    assert viewer.post(f"/admin/console/certificates/{expiring.pk}/renew/").status_code == 403


def test_renew_issues_a_successor_and_moves_the_policies_to_it(
    staff, live, expiring, authority
) -> None:
    policy = live.tls_policy
    policy.mode = "FORCEDTLS"
    policy.server_certificate = expiring
    policy.save()
    client = staff(superuser=True)
    response = client.post(f"/admin/console/certificates/{expiring.pk}/renew/")
    assert response.status_code == 200
    successor = Certificate.objects.exclude(pk=expiring.pk).get(common_name="soon.example")
    assert successor.not_after > expiring.not_after
    assert successor.dns_names == expiring.dns_names
    assert successor.authority == authority
    policy.refresh_from_db()
    assert policy.server_certificate == successor
    assert f"renewed as {successor.name}" in response.content.decode()


# -- what the console keeps in Redis, as anyone who can write to Redis leaves it -------------------


@pytest.mark.parametrize(
    "garbage",
    [b"not json", b"[1, 2]", b'[[1, 2, 3], "x"]', b"\xff\xfe", b"x" * (8 << 20)],
    ids=["not-json", "numbers", "bad-pairs", "not-utf8", "8MiB"],
)
def test_garbage_rate_samples_show_no_rate_not_a_500(staff, live, web_redis, garbage) -> None:
    web_redis.set(overview.RATE_KEY.format(node=live.name, session="aa01"), garbage)
    before = int(web_redis.info("stats")["total_net_output_bytes"])
    response = staff(superuser=True).get(section_url("sessions"))
    assert response.status_code == 200
    assert "aa01" in text(response)
    assert int(web_redis.info("stats")["total_net_output_bytes"]) - before < 256 << 10


@pytest.mark.parametrize("garbage", [b"\xff\xfe", b"x" * (8 << 20)], ids=["not-utf8", "8MiB"])
def test_a_garbage_last_seen_time_is_no_time_not_a_500(staff, default_node, web_redis, garbage):
    web_redis.set(overview.LAST_SEEN_KEY.format(node=default_node.name), garbage)
    before = int(web_redis.info("stats")["total_net_output_bytes"])
    response = staff(superuser=True).get(section_url("nodes"))
    assert response.status_code == 200
    assert int(web_redis.info("stats")["total_net_output_bytes"]) - before < 256 << 10


def test_a_published_generation_far_in_the_future_is_not_a_500(staff, live, web_redis) -> None:
    """Anyone who can write to Redis: 20 digits pass as a generation, not as a time."""
    web_redis.set(published_key(live.name), "9" * 20)
    response = staff(superuser=True).get(section_url("nodes"))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "fields",
    [
        {"storage": [{"root": "/", "total": "x", "used": 1}]},
        {"storage": [{"root": "/", "total": 10, "used": "x"}]},
        {"storage": 12},
        {"uptime": 1e300},
        {"sessions": "many"},
        {"time": "2026-13-45T99:99:99Z"},
        {"version": {"nested": ["x"]}},
    ],
    ids=["total", "used", "storage", "uptime", "sessions", "time", "version"],
)
def test_a_worker_signing_garbage_in_its_heartbeat_is_not_a_500(
    staff, live, web_redis, fields
) -> None:
    """A compromised worker signs with its own node key: what it says about itself is shown
    as far as it makes sense, never a 500 for the console's users."""
    web_redis.set(heartbeat_key(live.name), heartbeat(live.name, **fields), ex=60)
    response = staff(superuser=True).get(section_url("nodes"))
    assert response.status_code == 200
    assert staff(superuser=True).get(DASHBOARD).status_code == 200
