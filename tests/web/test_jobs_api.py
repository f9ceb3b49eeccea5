"""/api/v1/jobs/, the export actions that request jobs, their permissions and bad input, the
admin's jobs list and actions, and the job bookkeeping (progress, failure) without a worker.

Jobs are enqueued after commit; these tests capture the on_commit callbacks without running
them, so nothing reaches a Celery queue (tests/e2e/test_jobs.py runs real workers).
"""

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext

from exports_app.choices import ExportState, JobKind, JobState
from exports_app.models import Export, Job, WorkerNode
from exports_app.services import provisioning
from exports_app.tasks import ProgressRecorder, fail_job

pytestmark = pytest.mark.django_db

EXPORTS = "/api/v1/exports/"
JOBS = "/api/v1/jobs/"
MiB = 1 << 20


@pytest.fixture
def ready(default_node):
    def make(name: str = "disk", size: int = MiB, node: WorkerNode | None = None) -> Export:
        return Export.objects.create(
            node=node or default_node, name=name, size=size, state=ExportState.READY
        )

    return make


def job_of(response) -> Job:
    return Job.objects.get(pk=response.json()["job"])


# -- create and clone ----------------------------------------------------------------------------


def test_create_answers_201_provisioning_with_its_queued_job(
    api, superuser, default_node, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = api.post(EXPORTS, {"name": "disk1", "size": "1G"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == ExportState.PROVISIONING
    job = job_of(response)
    assert body["job_url"] == f"http://testserver{JOBS}{job.pk}/"
    assert (job.kind, job.state, job.progress) == (JobKind.CREATE, JobState.QUEUED, 0)
    assert job.params == {"size": 1 << 30}
    assert (job.export_id, job.export_name, job.node) == (body["id"], "disk1", default_node)
    assert job.requested_by == superuser
    assert job.celery_task_id
    # One message, to the node's queue, sent only once the transaction commits.
    sends = [c.args for c in callbacks if getattr(c, "func", None) is provisioning._send]
    assert sends == [(job.pk, job.celery_task_id, "node.default")]


def test_create_without_size_is_400_naming_the_field(api, default_node):
    response = api.post(EXPORTS, {"name": "nosize"})
    assert response.status_code == 400
    assert "size" in response.json()
    assert not Job.objects.exists()


def test_clone_by_name_or_id_defaults_to_the_source_size(api, ready):
    gold = ready("gold", 4 * MiB)
    by_name = api.post(EXPORTS, {"name": "c1", "clone_from": "gold"})
    assert by_name.status_code == 201, by_name.content
    assert by_name.json()["size"] == 4 * MiB
    job = job_of(by_name)
    assert job.kind == JobKind.CLONE
    assert job.params == {"size": 4 * MiB, "source_id": gold.pk, "source_name": "gold"}
    by_id = api.post(EXPORTS, {"name": "c2", "clone_from": str(gold.pk), "size": "8M"})
    assert by_id.status_code == 201, by_id.content
    assert job_of(by_id).params["size"] == 8 * MiB


@pytest.mark.parametrize(
    ("clone_from", "size", "field", "message"),
    [
        ("nope", None, "clone_from", "No export 'nope'"),
        ("99999999999999999999999", None, "clone_from", "No export"),
        ("gold", "1M", "size", "cannot be smaller"),
        ("busy", None, "clone_from", "must be ready"),
    ],
)
def test_bad_clone_requests_are_400_with_field_errors(
    api, ready, default_node, clone_from, size, field, message
):
    ready("gold", 4 * MiB)
    Export.objects.create(node=default_node, name="busy", size=MiB)  # still provisioning
    data = {"name": "c", "clone_from": clone_from}
    if size:
        data["size"] = size
    response = api.post(EXPORTS, data)
    assert response.status_code == 400
    assert message in " ".join(response.json()[field])
    assert not Export.objects.filter(name="c").exists()


def test_clone_from_another_node_is_refused(api, ready, default_node, tmp_path):
    other = WorkerNode.objects.create(
        name="other",
        listen="127.0.0.1:10810",
        storage_root=str(tmp_path),
        tls_policy=default_node.tls_policy,
    )
    source = ready("far", MiB, node=other)
    response = api.post(EXPORTS, {"name": "c", "clone_from": str(source.pk)})
    assert response.status_code == 400
    assert "clone on that node" in response.json()["clone_from"][0]


def test_clone_from_on_update_is_400(api, ready):
    export = ready()
    response = api.patch(f"{EXPORTS}{export.pk}/", {"clone_from": "disk"})
    assert response.status_code == 400
    assert "clone_from" in response.json()


# -- resize, verify, delete ----------------------------------------------------------------------


def test_resize_action_requests_a_resize_job(api, ready):
    export = ready(size=MiB)
    response = api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "2M"})
    assert response.status_code == 202, response.content
    # The answer tells the truth: resizing, at the old size, until the job has run.
    assert (response.json()["state"], response.json()["size"]) == ("resizing", MiB)
    job = job_of(response)
    assert (job.kind, job.params) == (
        JobKind.RESIZE,
        {"size": 2 * MiB, "old_size": MiB, "force": False},
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"size": "lots"}, "size"),
        ({}, "size"),
        ({"size": "1M"}, "size"),  # unchanged
        ({"size": 1000}, "size"),  # not a multiple of 512
        ({"size": "512K"}, "size"),  # a shrink without force
        ({"size": "2M", "force": "maybe"}, "force"),
    ],
)
def test_bad_resize_requests_are_400_with_field_errors(api, ready, data, field):
    export = ready(size=MiB)
    response = api.post(f"{EXPORTS}{export.pk}/resize/", data, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    export.refresh_from_db()
    assert export.size == MiB
    assert not Job.objects.exists()


def test_forced_shrink_is_accepted(api, ready):
    export = ready(size=2 * MiB)
    response = api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "1M", "force": True})
    assert response.status_code == 202, response.content
    assert job_of(response).params == {"size": MiB, "old_size": 2 * MiB, "force": True}


def test_verify_action_requests_a_verify_job(api, ready):
    export = ready()
    response = api.post(f"{EXPORTS}{export.pk}/verify/")
    assert response.status_code == 202
    assert job_of(response).kind == JobKind.VERIFY


def test_delete_answers_202_deleting_with_a_delete_job(api, ready):
    export = ready()
    response = api.delete(f"{EXPORTS}{export.pk}/?wipe=true")
    assert response.status_code == 202
    assert response.json()["state"] == ExportState.DELETING
    job = job_of(response)
    assert (job.kind, job.params) == (JobKind.DELETE, {"wipe": True})
    # A second DELETE while the job is queued requests nothing more.
    assert api.delete(f"{EXPORTS}{export.pk}/").status_code == 202
    assert Job.objects.filter(kind=JobKind.DELETE).count() == 1
    # And a deleting export takes no other job.
    assert api.post(f"{EXPORTS}{export.pk}/verify/").status_code == 409


def test_delete_with_a_bad_wipe_value_is_400_and_changes_nothing(api, ready):
    export = ready()
    response = api.delete(f"{EXPORTS}{export.pk}/?wipe=perhaps")
    assert response.status_code == 400
    assert response.json() == {"wipe": ["Must be true or false."]}
    export.refresh_from_db()
    assert export.state == ExportState.READY
    assert not Job.objects.exists()


# -- /api/v1/jobs/ -------------------------------------------------------------------------------


def test_jobs_list_filters_by_export_state_and_kind(api, ready):
    a, b = ready("a"), ready("b")
    create = provisioning.request_create(a)
    verify = provisioning.request_verify(b)
    fail_job(verify.pk, "boom")

    def ids(query: str) -> list[int]:
        response = api.get(f"{JOBS}?{query}")
        assert response.status_code == 200, response.content
        return [j["id"] for j in response.json()["results"]]

    assert ids("") == [verify.pk, create.pk]
    assert ids(f"export={a.pk}") == [create.pk]
    assert ids("state=failed") == [verify.pk]
    assert ids("kind=create") == [create.pk]
    assert ids("node=default") == [verify.pk, create.pk]
    detail = api.get(f"{JOBS}{verify.pk}/").json()
    assert (detail["state"], detail["progress"], detail["error"]) == ("failed", 0, "boom")
    assert detail["export_name"] == "b" and detail["node_name"] == "default"


@pytest.mark.parametrize("query", ["state=bogus", "kind=format", "export=abc"])
def test_jobs_list_bad_filters_are_400(api, query):
    response = api.get(f"{JOBS}?{query}")
    assert response.status_code == 400
    assert query.split("=")[0] in response.json()


def test_jobs_are_read_only(api, ready):
    job = provisioning.request_verify(ready())
    assert api.post(JOBS, {"kind": "create"}).status_code == 405
    assert api.patch(f"{JOBS}{job.pk}/", {"state": "succeeded"}).status_code == 405
    assert api.delete(f"{JOBS}{job.pk}/").status_code == 405


def test_retry_of_a_failed_create_requests_it_again(api, default_node):
    export = Export.objects.create(node=default_node, name="again", size=MiB)
    job = provisioning.request_create(export)
    fail_job(job.pk, "No space left on device")
    export.refresh_from_db()
    assert (export.state, export.last_error) == (ExportState.FAILED, "No space left on device")
    response = api.post(f"{JOBS}{job.pk}/retry/")
    assert response.status_code == 202, response.content
    assert response.json()["kind"] == "create" and response.json()["state"] == "queued"
    export.refresh_from_db()
    assert (export.state, export.last_error) == (ExportState.PROVISIONING, "")
    # Only the latest failed job can be retried, and only once it has failed: the job's state
    # forbids it, a 409 in the documented error shape.
    again = api.post(f"{JOBS}{job.pk}/retry/")
    assert again.status_code == 409
    assert again.json() == {"detail": "A newer job exists for this export; retry that one instead."}
    queued = api.post(f"{JOBS}{response.json()['id']}/retry/")
    assert queued.status_code == 409
    assert queued.json() == {"detail": "Only a failed job can be retried."}


def test_a_failed_resize_keeps_the_old_size_and_the_export_served(ready):
    export = ready(size=MiB)
    job = provisioning.request_resize(export, 2 * MiB)
    export.refresh_from_db()
    assert (export.size, export.state) == (MiB, ExportState.RESIZING)
    fail_job(job.pk, "Permission denied")
    export.refresh_from_db()
    assert (export.size, export.state, export.last_error) == (
        MiB,
        ExportState.READY,
        "Permission denied",
    )


# -- permissions ---------------------------------------------------------------------------------


def test_jobs_need_authentication_and_the_view_permission(
    anon_client, make_user, token_client, ready
):
    job = provisioning.request_verify(ready())
    assert anon_client.get(JOBS).status_code == 401
    nobody = token_client(make_user())
    assert nobody.get(JOBS).status_code == 403
    assert nobody.get(f"{JOBS}{job.pk}/").status_code == 403
    viewer = token_client(make_user("exports_app.view_job"))
    assert viewer.get(f"{JOBS}{job.pk}/").status_code == 200
    assert viewer.post(f"{JOBS}{job.pk}/retry/").status_code == 403


def test_retry_needs_the_retry_permission(make_user, token_client, ready):
    job = provisioning.request_verify(ready())
    fail_job(job.pk, "x")
    client = token_client(make_user("exports_app.view_job", "exports_app.retry_job"))
    assert client.post(f"{JOBS}{job.pk}/retry/").status_code == 202


@pytest.mark.parametrize("path", ["resize/", "verify/"])
def test_export_job_actions_need_the_change_permission(
    anon_client, make_user, token_client, ready, path
):
    export = ready()
    data = {"size": "2M"}
    assert anon_client.post(f"{EXPORTS}{export.pk}/{path}", data).status_code == 401
    viewer = token_client(make_user("exports_app.view_export", "exports_app.add_export"))
    assert viewer.post(f"{EXPORTS}{export.pk}/{path}", data).status_code == 403
    editor = token_client(make_user("exports_app.view_export", "exports_app.change_export"))
    assert editor.post(f"{EXPORTS}{export.pk}/{path}", data).status_code == 202
    assert Job.objects.count() == 1


# -- progress ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_saved_at_most_once_a_second_and_only_when_the_percent_grows(ready):
    job = provisioning.request_verify(ready())
    clock = FakeClock()
    progress = ProgressRecorder(job.pk, clock)

    def saved() -> int:
        return Job.objects.get(pk=job.pk).progress

    progress(50, 100)
    assert saved() == 0  # under a second since the start
    clock.now = 1.0
    progress(50, 100)
    assert saved() == 50
    clock.now = 5.0
    progress(50, 100)  # no growth: no write
    progress(505, 1000)  # 50.5 %: still 50
    assert saved() == 50
    progress(100, 100)  # 100 only comes with the final state
    assert saved() == 99


# -- admin ---------------------------------------------------------------------------------------


def test_admin_jobs_list_shows_state_progress_and_error(admin_client, ready):
    job = provisioning.request_verify(ready("shown"))
    fail_job(job.pk, "Input/output error")
    response = admin_client.get("/admin/exports_app/job/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "shown" in page and "Failed" in page and "Input/output error" in page and "0%" in page
    assert admin_client.get(f"/admin/exports_app/job/{job.pk}/change/").status_code == 200
    assert admin_client.get("/admin/exports_app/job/add/").status_code == 403


def test_admin_export_actions_request_jobs(admin_client, ready):
    export = ready("acted")
    response = admin_client.post(
        "/admin/exports_app/export/",
        {"action": "verify_exports", "_selected_action": [export.pk]},
    )
    assert response.status_code == 302
    assert Job.objects.get().kind == JobKind.VERIFY
    response = admin_client.post(
        "/admin/exports_app/export/",
        {"action": "wipe_and_delete_exports", "_selected_action": [export.pk]},
    )
    assert response.status_code == 302
    delete = Job.objects.filter(kind=JobKind.DELETE).get()
    assert delete.params == {"wipe": True}
    export.refresh_from_db()
    assert export.state == ExportState.DELETING


def test_admin_retry_action(admin_client, default_node):
    export = Export.objects.create(node=default_node, name="r", size=MiB)
    job = provisioning.request_create(export)
    fail_job(job.pk, "Permission denied")
    response = admin_client.post(
        "/admin/exports_app/job/", {"action": "retry_jobs", "_selected_action": [job.pk]}
    )
    assert response.status_code == 302
    messages = [str(m) for m in get_messages(response.wsgi_request)]
    assert any("retried as job" in m for m in messages), messages
    assert Job.objects.filter(kind=JobKind.CREATE).count() == 2


def test_patching_the_size_answers_with_the_new_resize_job(api, ready):
    export = ready(size=MiB)
    provisioning.request_verify(export)
    response = api.patch(f"{EXPORTS}{export.pk}/", {"size": "2M"})
    assert response.status_code == 200, response.content
    assert job_of(response).kind == JobKind.RESIZE


def test_listing_exports_and_jobs_costs_the_same_queries_for_one_or_many(api, ready):
    def count(url: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            assert api.get(url).status_code == 200
        return len(queries)

    provisioning.request_verify(ready("first"))
    one = (count(EXPORTS), count(JOBS))
    for i in range(10):
        provisioning.request_verify(ready(f"more{i}"))
    assert (count(EXPORTS), count(JOBS)) == one


def test_cloning_needs_the_view_permission_as_well_as_add(make_user, token_client, ready):
    ready("gold")
    adder = token_client(make_user("exports_app.add_export"))
    response = adder.post(EXPORTS, {"name": "copy", "clone_from": "gold"})
    assert response.status_code == 403
    assert not Export.objects.filter(name="copy").exists()
    both = token_client(make_user("exports_app.add_export", "exports_app.view_export"))
    assert both.post(EXPORTS, {"name": "copy", "clone_from": "gold"}).status_code == 201
