"""The global change log (/admin/console/changes/) and the dashboard's recent activity: API and
admin changes with their user, revocations with their reason, jobs' state changes with the job
as the actor, session kicks and node TLS policy changes, each with a field-by-field diff."""

from __future__ import annotations

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME

from exports_app.choices import JobKind
from exports_app.models import Export, Job, TLSPolicy
from exports_app.tasks import fail_job
from nbdworker.contract.snapshot import heartbeat_key, kicks_key, sessions_key
from tests.support.workerrecords import heartbeat_record, session_record

pytestmark = pytest.mark.django_db

CHANGES = "/admin/console/changes/"


@pytest.fixture(autouse=True)
def _private_redis(web_redis):
    """Every test here talks to the module's private Redis."""


@pytest.fixture
def staff_client(client, superuser):
    superuser.is_staff = True
    superuser.save()
    client.force_login(superuser)
    return client


def rows(client, **params) -> str:
    response = client.get(CHANGES, params)
    assert response.status_code == 200
    html = response.content.decode()
    return html[html.index('data-testid="changelog"') :]


@pytest.fixture
def export(default_node) -> Export:
    return Export.objects.create(node=default_node, name="logged", size=1 << 20)


def test_an_api_change_shows_its_user_and_diff(api, superuser, staff_client, export) -> None:
    response = api.patch(f"/api/v1/exports/{export.pk}/", {"description": "for the CI"})
    assert response.status_code == 200, response.content
    html = rows(staff_client, q="logged")
    assert superuser.username in html
    assert "<strong>description</strong>: <del>-</del> → <ins>for the CI</ins>" in html


def test_a_revocation_shows_its_actor_and_reason(staff_client, superuser, client_certificate):
    response = staff_client.post(
        "/admin/exports_app/certificate/",
        {"action": "revoke_certificates", ACTION_CHECKBOX_NAME: [client_certificate.pk]},
    )
    assert response.status_code == 302
    html = rows(staff_client, model="certificate")
    entry = html[: html.index("</tr>", html.index("revocation reason"))]
    assert superuser.username in entry
    assert f"revoked by {superuser.username} in the admin" in entry
    assert "<strong>revoked at</strong>: <del>-</del>" in entry


def test_a_jobs_state_change_has_the_job_as_actor(staff_client, export) -> None:
    job = Job.objects.create(kind=JobKind.CREATE, export=export, export_name=export.name,
                             node=export.node)  # fmt: skip
    fail_job(job.pk, "qemu-img: no space left")
    html = rows(staff_client, user=f"job #{job.pk}")
    assert f"job #{job.pk} (create)" in html
    assert "<strong>state</strong>: <del>provisioning</del> → <ins>failed</ins>" in html
    assert "qemu-img: no space left" in html


def test_a_session_kick_is_an_event_with_its_user(api, superuser, staff_client, export, web_redis):
    node = export.node.name
    web_redis.set(
        heartbeat_key(node), heartbeat_record(node, {"node": node, "generation": 1}), ex=60
    )
    session = {"id": "ab01", "node": node, "client": "192.0.2.9:5000", "export": "logged"}
    web_redis.hset(sessions_key(node), "ab01", session_record(node, session))
    assert api.delete("/api/v1/sessions/ab01/").status_code == 202
    assert web_redis.smembers(kicks_key(node)) == {"ab01"}
    html = rows(staff_client)
    assert "Ended session ab01 of client 192.0.2.9:5000 on export &#x27;logged&#x27;" in html
    entry = html[: html.index("</tr>", html.index("Ended session"))]
    assert superuser.username in entry and 'data-action="event"' in html


def test_a_node_tls_policy_change_names_both_policies(staff_client, default_node) -> None:
    old = default_node.tls_policy
    new = TLSPolicy.objects.create(name="strict")
    default_node.tls_policy = new
    default_node.save()
    html = rows(staff_client, model="workernode")
    assert f"<del>{old}</del> → <ins>{new}</ins>" in html


def test_filters_narrow_the_log(staff_client, export, client_certificate) -> None:
    assert "logged" in rows(staff_client)
    assert "logged" not in rows(staff_client, model="certificate")
    assert client_certificate.name not in rows(staff_client, model="export")
    assert "logged" not in rows(staff_client, q="something-else")
    assert "No changes." in rows(staff_client, since="2999-01-01T00:00")
    assert "logged" in rows(staff_client, until="2999-01-01T00:00")


def test_the_log_follows_view_permissions(client, make_user, export) -> None:
    user = make_user("exports_app.view_job")
    user.is_staff = True
    user.save()
    client.force_login(user)
    assert "logged" not in rows(client)


def test_the_dashboard_shows_recent_activity(staff_client, export) -> None:
    html = staff_client.get("/admin/").content.decode()
    activity = html[html.index('data-testid="activity"') :]
    assert "logged" in activity and CHANGES in activity
