"""One rule, one answer: a size change refused through the API is refused the same way, with the
same message, by the admin's change form and its resize action (exports_app/services/exports.py),
and nothing is queued. Live sessions are what a worker writes to a private Redis.

Jobs are enqueued after commit; the tests capture nothing and run no Celery worker: a refusal
must leave no Job row at all.
"""

from __future__ import annotations

import json

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.messages import get_messages

from exports_app.choices import ExportState, JobKind, JobState
from exports_app.models import Export, Job
from exports_app.tasks import run_job
from nbdworker.contract.snapshot import heartbeat_key, sessions_key
from tests.support.adminforms import export_add_form
from tests.support.workerrecords import heartbeat_record, session_record

pytestmark = pytest.mark.django_db

EXPORTS = "/api/v1/exports/"
MiB = 1 << 20
NEEDS_FORCE = "Shrinking destroys the data past the new end; it needs force."
IN_USE = "1 live session(s) use the export; a shrink needs none."
BEING_DELETED = "The export is being deleted."


@pytest.fixture
def worker_redis(web_redis, settings):
    """The Redis the web side reads sessions from, with a live heartbeat of the default node."""
    node = settings.NBDWORKER_NODE
    web_redis.set(heartbeat_key(node), heartbeat_record(node, {"generation": 1}), ex=60)
    return web_redis


@pytest.fixture
def export(default_node, worker_redis) -> Export:
    return Export.objects.create(node=default_node, name="disk", size=MiB, state=ExportState.READY)


def connect_client(worker_redis, export: Export) -> None:
    """What nbdworker/status.py publishes for one session on `export`."""
    entry = {"id": "s1", "node": export.node.name, "export": export.name, "client": "127.0.0.1:1"}
    worker_redis.hset(sessions_key(export.node.name), "s1", session_record(export.node.name, entry))


# Each way of changing the size: (accepted, every message shown to the user).
Outcome = tuple[bool, list[str]]


def api_outcome(response, success: int) -> Outcome:
    """Bad input is a 400 naming fields; a conflict with the export's state a 409 `detail`."""
    assert response.status_code in (success, 400, 409), response.content
    body = response.json()
    if response.status_code == 409:
        return False, [body["detail"]]
    errors = [] if response.status_code == success else [m for ms in body.values() for m in ms]
    return response.status_code == success, errors


def api_patch(api, admin_client, export: Export, size: int, force: bool) -> Outcome:
    response = api.patch(f"{EXPORTS}{export.pk}/", {"size": size, "force": force}, format="json")
    return api_outcome(response, 200)


def api_resize(api, admin_client, export: Export, size: int, force: bool) -> Outcome:
    response = api.post(f"{EXPORTS}{export.pk}/resize/", {"size": size, "force": force})
    return api_outcome(response, 202)


def admin_change_form(api, admin_client, export: Export, size: int, force: bool) -> Outcome:
    data = export_add_form(export.node_id, name=export.name, size=str(size))
    del data["node"]  # read-only once the export exists
    if force:
        data["force"] = "on"
    response = admin_client.post(f"/admin/exports_app/export/{export.pk}/change/", data)
    if response.status_code == 302:
        return True, []
    assert response.status_code == 200
    form = response.context["adminform"].form
    return False, [m for ms in form.errors.values() for m in ms]


def admin_resize_action(api, admin_client, export: Export, size: int, force: bool) -> Outcome:
    data = {
        "action": "resize_exports",
        ACTION_CHECKBOX_NAME: [str(export.pk)],
        "apply": "1",
        "size": str(size),
    }
    if force:
        data["force"] = "on"
    response = admin_client.post("/admin/exports_app/export/", data)
    assert response.status_code == 302
    shown = [str(m) for m in get_messages(response.wsgi_request)]
    return any("requested" in m for m in shown), shown


PATHS = [api_patch, api_resize, admin_change_form, admin_resize_action]


@pytest.mark.parametrize("change", PATHS, ids=lambda f: f.__name__)
def test_a_shrink_without_force_is_refused_with_one_message(api, admin_client, export, change):
    accepted, shown = change(api, admin_client, export, MiB // 2, False)
    assert not accepted
    assert any(NEEDS_FORCE in m for m in shown), shown
    export.refresh_from_db()
    assert export.size == MiB
    assert not Job.objects.exists()


@pytest.mark.parametrize("change", PATHS, ids=lambda f: f.__name__)
def test_a_shrink_of_an_export_in_use_is_refused_before_any_job(
    api, admin_client, export, worker_redis, change
):
    # The admin used to accept this and queue a job that then failed.
    connect_client(worker_redis, export)
    accepted, shown = change(api, admin_client, export, MiB // 2, True)
    assert not accepted
    assert any(IN_USE in m for m in shown), shown
    export.refresh_from_db()
    assert export.size == MiB
    assert not Job.objects.exists()


@pytest.mark.parametrize("change", PATHS, ids=lambda f: f.__name__)
def test_a_forced_shrink_of_an_idle_export_requests_one_resize_job(
    api, admin_client, export, change
):
    accepted, shown = change(api, admin_client, export, MiB // 2, True)
    assert accepted, shown
    export.refresh_from_db()
    # The new size is stored when the job has resized the image.
    assert (export.size, export.state) == (MiB, ExportState.RESIZING)
    job = Job.objects.get()
    assert (job.kind, job.params) == (
        JobKind.RESIZE,
        {"size": MiB // 2, "old_size": MiB, "force": True},
    )


@pytest.mark.parametrize("change", PATHS, ids=lambda f: f.__name__)
def test_an_export_being_deleted_takes_no_resize(api, admin_client, export, change):
    Export.objects.filter(pk=export.pk).update(state=ExportState.DELETING)
    export.refresh_from_db()
    accepted, shown = change(api, admin_client, export, 2 * MiB, False)
    assert not accepted
    assert any(BEING_DELETED in m for m in shown), shown
    export.refresh_from_db()
    assert export.size == MiB
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("patch", "{id}/", {"description": "late"}),
        ("post", "{id}/resize/", {"size": "2M"}),
        ("post", "{id}/verify/", None),
    ],
)
def test_a_change_to_an_export_being_deleted_is_a_409_conflict(api, export, method, path, body):
    Export.objects.filter(pk=export.pk).update(state=ExportState.DELETING)
    response = getattr(api, method)(f"{EXPORTS}{path.format(id=export.pk)}", body, format="json")
    assert response.status_code == 409, response.content
    # The documented error shape of a 409 (exports_app/api/schema.py's Error).
    assert response.json() == {"detail": BEING_DELETED}
    assert not Job.objects.exists()


def test_a_client_that_connects_after_the_request_fails_the_shrink_job(api, export, worker_redis):
    assert api_resize(api, None, export, MiB // 2, True) == (True, [])
    job = Job.objects.get()
    connect_client(worker_redis, export)
    run_job.apply(args=[job.pk])
    job.refresh_from_db()
    assert (job.state, job.error) == (JobState.FAILED, IN_USE)
    export.refresh_from_db()
    # A refused resize puts the old size back; the export stays served.
    assert (export.size, export.state, export.last_error) == (MiB, ExportState.READY, IN_USE)


def test_sessions_no_worker_signed_neither_block_a_shrink_nor_are_read_whole(
    api, admin_client, export, worker_redis
):
    """Anyone who can write to Redis could block every shrink with one made-up session, and
    make each check read 100,000 of them."""
    node = export.node.name
    with worker_redis.pipeline(transaction=False) as pipe:
        for start in range(0, 100_000, 10_000):
            fakes = {f"f{i}": json.dumps({"id": f"f{i}", "export": export.name})
                     for i in range(start, start + 10_000)}  # fmt: skip
            pipe.hset(sessions_key(node), mapping=fakes)
        pipe.execute()
    before = int(worker_redis.info("stats")["total_net_output_bytes"])
    accepted, shown = api_resize(api, admin_client, export, MiB // 2, True)
    assert int(worker_redis.info("stats")["total_net_output_bytes"]) - before < 256 << 10
    assert accepted, shown
