"""Jobs touch only images nbdweb created or explicitly imported (issue 15, item 4).

Each attack goes through the API and runs the requested job in-process (the same `run_job` a
node's Celery worker runs): a file placed in the storage root, a node whose storage root in the
database points elsewhere, a symbolic link in the image's path, a file swapped in after the
image was made. Then the explicit import: `POST /api/v1/exports/import/`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from django.db import connection

from exports_app.choices import ExportState, JobKind, JobState
from exports_app.models import Export, Job, WorkerNode
from exports_app.services import images
from exports_app.tasks import run_job

pytestmark = pytest.mark.django_db

EXPORTS = "/api/v1/exports/"
IMPORT = "/api/v1/exports/import/"
MiB = 1 << 20
VICTIM = b"\x42" * MiB


def run_jobs() -> list[Job]:
    """Run every queued job in order, as the node's Celery worker would."""
    ran = []
    for job in Job.objects.filter(state=JobState.QUEUED).order_by("pk"):
        run_job.apply(args=[job.pk], task_id=job.celery_task_id)
        job.refresh_from_db()
        ran.append(job)
    return ran


def export_named(name: str) -> Export | None:
    return Export.objects.filter(name=name).first()


@pytest.fixture
def elsewhere() -> Path:
    """A directory outside this host's storage roots (tests/conftest.py: the session tmp)."""
    path = Path(tempfile.mkdtemp(prefix="nbdweb-elsewhere-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- files nbdweb did not create -----------------------------------------------------------------


def test_create_naming_an_existing_file_fails_and_a_wiping_delete_leaves_the_file(
    api, default_node, storage_root
):
    victim = storage_root / "victim.img"
    victim.write_bytes(b"precious data")
    created = api.post(EXPORTS, {"name": "grab", "size": "1M", "image_path": "victim.img"})
    assert created.status_code == 201, created.content
    [job] = run_jobs()
    assert job.state == JobState.FAILED
    assert "did not create" in job.error
    assert export_named("grab").state == ExportState.FAILED
    assert export_named("grab").image_identity == ""

    deleted = api.delete(f"{EXPORTS}{created.json()['id']}/?wipe=true")
    assert deleted.status_code == 202
    [job] = run_jobs()
    assert job.state == JobState.SUCCEEDED
    assert export_named("grab") is None
    assert victim.read_bytes() == b"precious data"


def test_create_never_adopts_an_existing_file_of_exactly_the_right_size(
    api, default_node, storage_root
):
    (storage_root / "same.img").write_bytes(VICTIM)
    created = api.post(EXPORTS, {"name": "same", "size": MiB, "image_path": "same.img"})
    assert created.status_code == 201
    [job] = run_jobs()
    assert job.state == JobState.FAILED
    assert export_named("same").state == ExportState.FAILED
    api.delete(f"{EXPORTS}{created.json()['id']}/?wipe=true")
    run_jobs()
    assert (storage_root / "same.img").read_bytes() == VICTIM


def test_a_node_whose_storage_root_is_not_one_of_this_hosts_touches_nothing(
    api, default_node, elsewhere
):
    victim = elsewhere / "victim.img"
    victim.write_bytes(VICTIM)
    node = WorkerNode.objects.create(
        name="rogue",
        listen="127.0.0.1:10810",
        storage_root=str(elsewhere),
        tls_policy=default_node.tls_policy,
    )
    created = api.post(
        EXPORTS, {"name": "x", "size": MiB, "node": node.pk, "image_path": "new.img"}
    )
    assert created.status_code == 201, created.content
    [job] = run_jobs()
    assert job.state == JobState.FAILED
    assert "not among this host's storage roots" in job.error
    assert sorted(os.listdir(elsewhere)) == ["victim.img"]

    # The database is changed under an export that has an image: its jobs still stay home.
    own = api.post(EXPORTS, {"name": "own", "size": MiB})
    run_jobs()
    export = export_named("own")
    assert export.state == ExportState.READY
    victim_copy = elsewhere / export.image_path
    shutil.copyfile(victim, victim_copy)
    WorkerNode.objects.filter(pk=default_node.pk).update(storage_root=str(elsewhere))
    api.delete(f"{EXPORTS}{own.json()['id']}/?wipe=true")
    [job] = run_jobs()
    assert job.state == JobState.FAILED
    assert victim.read_bytes() == victim_copy.read_bytes() == VICTIM


def test_a_symbolic_link_placed_in_the_image_path_is_not_followed(
    api, default_node, storage_root, elsewhere
):
    created = api.post(EXPORTS, {"name": "sub", "size": MiB, "image_path": "sub/disk.img"})
    assert created.status_code == 201, created.content
    # Valid when asked; before the job runs, the directory becomes a link to elsewhere.
    (storage_root / "sub").symlink_to(elsewhere)
    [job] = run_jobs()
    assert job.state == JobState.FAILED
    assert "symbolic link" in job.error
    assert os.listdir(elsewhere) == []


def test_a_file_swapped_in_after_the_image_was_made_is_neither_wiped_nor_removed(
    api, default_node, storage_root
):
    created = api.post(EXPORTS, {"name": "swap", "size": MiB})
    run_jobs()
    path = storage_root / export_named("swap").image_path
    path.unlink()
    path.write_bytes(VICTIM)  # may reuse the freed inode number
    for action in ("resize", "verify"):
        body = {"size": "2M"} if action == "resize" else None
        api.post(f"{EXPORTS}{created.json()['id']}/{action}/", body)
        [job] = run_jobs()
        assert job.state == JobState.FAILED, action
        assert "Not the image nbdweb created" in job.error
    api.delete(f"{EXPORTS}{created.json()['id']}/?wipe=true")
    [job] = run_jobs()
    assert job.state == JobState.FAILED
    assert path.read_bytes() == VICTIM


def test_an_export_without_an_image_on_record_is_never_resized_hashed_or_cloned(
    api, default_node, storage_root
):
    # A row that claims an image (an edited database) with a file at its path.
    export = Export.objects.create(
        node=default_node, name="claim", size=MiB, state=ExportState.READY
    )
    (storage_root / export.image_path).write_bytes(VICTIM)
    api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "2M"})
    api.post(f"{EXPORTS}{export.pk}/verify/")
    api.post(EXPORTS, {"name": "copy", "clone_from": "claim"})
    jobs = run_jobs()
    assert [(j.kind, j.state) for j in jobs] == [
        (JobKind.RESIZE, JobState.FAILED),
        (JobKind.VERIFY, JobState.FAILED),
        (JobKind.CLONE, JobState.FAILED),
    ]
    assert all("no image on record" in j.error for j in jobs)
    assert (storage_root / export.image_path).read_bytes() == VICTIM
    assert not (storage_root / export_named("copy").image_path).exists()


# -- import --------------------------------------------------------------------------------------


def test_import_takes_over_a_file_and_a_plain_delete_leaves_it(api, default_node, storage_root):
    (storage_root / "vms").mkdir()
    image = storage_root / "vms" / "old.img"
    image.write_bytes(VICTIM)
    response = api.post(IMPORT, {"name": "old", "image_path": "vms/old.img", "size": "1M"})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["state"] == ExportState.PROVISIONING
    [job] = run_jobs()
    assert (job.kind, job.state) == (JobKind.IMPORT, JobState.SUCCEEDED), job.error
    export = export_named("old")
    assert export.state == ExportState.READY
    assert export.image_imported and export.image_identity
    # It is the export's image now: jobs may change it.
    api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "2M"})
    assert run_jobs()[0].state == JobState.SUCCEEDED
    assert image.stat().st_size == 2 * MiB

    assert api.delete(f"{EXPORTS}{export.pk}/").status_code == 202
    assert run_jobs()[0].state == JobState.SUCCEEDED
    assert export_named("old") is None
    assert image.read_bytes()[:MiB] == VICTIM


def test_an_imported_image_deleted_with_wipe_is_zeroed_and_removed(api, default_node, storage_root):
    image = storage_root / "old.img"
    image.write_bytes(VICTIM)
    api.post(IMPORT, {"name": "old", "image_path": "old.img", "size": MiB})
    run_jobs()
    with open(image, "rb") as held:  # still open: see what the wipe wrote before the unlink
        api.delete(f"{EXPORTS}{export_named('old').pk}/?wipe=true")
        assert run_jobs()[0].state == JobState.SUCCEEDED
        assert held.read() == bytes(MiB)
    assert not image.exists()


def refused_with(response, field: str, text: str) -> None:
    """An import refused when asked: 400 naming the field, and neither export nor job."""
    assert response.status_code == 400, response.content
    assert text in " ".join(response.json().get(field, [])), response.json()
    assert not Export.objects.exists() or export_named("t") is None
    assert not Job.objects.filter(kind=JobKind.IMPORT).exists()


@pytest.mark.parametrize(
    ("kind", "field", "text"),
    [
        ("symlink", "image_path", "outside the node's storage root"),
        ("fifo", "image_path", "Not a regular file"),
        ("directory", "image_path", "Not a regular file"),
        ("missing", "image_path", "No file to import"),
        ("wrong-size", "size", "has 1048576 bytes, not the 2097152"),
    ],
)
def test_import_refuses_anything_but_a_regular_file_of_the_named_size(
    api, default_node, storage_root, elsewhere, kind, field, text
):
    """Refused when asked (400 with the field's error), not accepted and then failed by the
    job: the job checks again, but only what changed in between fails there."""
    path = storage_root / "thing.img"
    if kind == "symlink":
        (elsewhere / "target.img").write_bytes(VICTIM)
        path.symlink_to(elsewhere / "target.img")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "wrong-size":
        path.write_bytes(VICTIM)
    response = api.post(IMPORT, {"name": "t", "image_path": "thing.img", "size": "2M"})
    refused_with(response, field, text)
    if kind == "symlink":
        assert (elsewhere / "target.img").read_bytes() == VICTIM


def test_a_file_that_changes_after_the_request_is_refused_by_the_job(
    api, default_node, storage_root
):
    path = storage_root / "thing.img"
    path.write_bytes(VICTIM)
    response = api.post(IMPORT, {"name": "t", "image_path": "thing.img", "size": MiB})
    assert response.status_code == 202, response.content
    path.write_bytes(VICTIM + VICTIM)
    [job] = run_jobs()
    assert job.state == JobState.FAILED
    assert "not the 1048576 the import named" in job.error
    assert export_named("t").state == ExportState.FAILED
    assert export_named("t").image_identity == ""


def test_import_refuses_the_image_of_another_export_by_a_second_name(
    api, default_node, storage_root
):
    api.post(EXPORTS, {"name": "mine", "size": MiB})
    run_jobs()
    os.link(storage_root / export_named("mine").image_path, storage_root / "alias.img")
    response = api.post(IMPORT, {"name": "t", "image_path": "alias.img", "size": MiB})
    refused_with(response, "image_path", "image of export 'mine'")


def test_import_of_a_path_outside_the_root_is_400(api, default_node):
    response = api.post(IMPORT, {"name": "t", "image_path": "../etc/passwd", "size": MiB})
    assert response.status_code == 400
    assert "image_path" in response.json()
    assert not Job.objects.exists()


def test_import_needs_its_own_permission(make_user, token_client, default_node, storage_root):
    (storage_root / "old.img").write_bytes(VICTIM)
    creator = token_client(make_user("exports_app.view_export", "exports_app.add_export"))
    body = {"name": "old", "image_path": "old.img", "size": MiB}
    assert creator.post(IMPORT, body).status_code == 403
    importer = token_client(
        make_user("exports_app.view_export", "exports_app.add_export", "exports_app.import_export")
    )
    assert importer.post(IMPORT, body).status_code == 202


def test_admin_import_makes_the_same_import_job(admin_client, default_node, storage_root):
    (storage_root / "old.img").write_bytes(VICTIM)
    listing = admin_client.get("/admin/exports_app/export/").content.decode()
    assert "/admin/exports_app/export/import/" in listing
    assert admin_client.get("/admin/exports_app/export/import/").status_code == 200
    response = admin_client.post(
        "/admin/exports_app/export/import/",
        {
            "node": default_node.pk,
            "name": "old",
            "image_path": "old.img",
            "size": "1M",
            "enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()[-2000:]
    [job] = run_jobs()
    assert (job.kind, job.state) == (JobKind.IMPORT, JobState.SUCCEEDED), job.error
    assert export_named("old").image_imported


@pytest.mark.parametrize(
    ("setup", "field", "text"),
    [("missing", "image_path", "No file to import"), ("wrong-size", "size", "not the 2097152")],
)
def test_admin_import_refusals_are_form_errors_not_failed_jobs(
    admin_client, default_node, storage_root, setup, field, text
):
    if setup == "wrong-size":
        (storage_root / "old.img").write_bytes(VICTIM)
    response = admin_client.post(
        "/admin/exports_app/export/import/",
        {"node": default_node.pk, "name": "t", "image_path": "old.img", "size": "2M"},
    )
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert text in " ".join(errors.get(field, [])), errors
    assert not Export.objects.exists()
    assert not Job.objects.exists()


def test_admin_import_needs_the_import_permission(client, make_user, default_node):
    staff = make_user("exports_app.view_export", "exports_app.add_export")
    staff.is_staff = True
    staff.save()
    client.force_login(staff)
    assert "export/import/" not in client.get("/admin/exports_app/export/").content.decode()
    assert client.get("/admin/exports_app/export/import/").status_code == 403
    response = client.post(
        "/admin/exports_app/export/import/",
        {"node": default_node.pk, "name": "x", "image_path": "x.img", "size": "1M"},
    )
    assert response.status_code == 403
    assert not Export.objects.exists()


# Security review: a file with other names, another user's file, a file anyone may write, and
# the same file reached through two nodes.


def test_import_refuses_a_file_with_another_name(api, default_node, storage_root, elsewhere):
    image = storage_root / "linked.img"
    image.write_bytes(VICTIM)
    os.link(image, storage_root / "second-name.img")
    response = api.post(IMPORT, {"name": "t", "image_path": "linked.img", "size": MiB})
    refused_with(response, "image_path", "hard links")


def test_import_refuses_another_users_file(api, default_node, storage_root):
    image = storage_root / "theirs.img"
    image.write_bytes(VICTIM)
    os.chown(image, os.geteuid() + 4242, -1)
    response = api.post(IMPORT, {"name": "t", "image_path": "theirs.img", "size": MiB})
    refused_with(response, "image_path", f"uid {os.geteuid() + 4242}")
    assert image.stat().st_uid == os.geteuid() + 4242


def test_an_imported_file_is_made_private(api, default_node, storage_root):
    image = storage_root / "open.img"
    image.write_bytes(VICTIM)
    image.chmod(0o666)
    api.post(IMPORT, {"name": "open", "image_path": "open.img", "size": MiB})
    [job] = run_jobs()
    assert job.state == JobState.SUCCEEDED, job.error
    assert image.stat().st_mode & 0o777 == 0o600


def test_import_refuses_an_image_of_another_node_sharing_the_directory(
    api, default_node, storage_root
):
    api.post(EXPORTS, {"name": "mine", "size": MiB})
    run_jobs()
    (storage_root / "sub").mkdir()
    # Another node whose root is inside the first one's: the same file by another path.
    other = WorkerNode.objects.create(
        name="inner",
        listen="127.0.0.1:10810",
        storage_root=str(storage_root / "sub"),
        tls_policy=default_node.tls_policy,
    )
    # Renamed: the same file (device and inode), with one name.
    os.rename(storage_root / export_named("mine").image_path, storage_root / "sub" / "moved.img")
    response = api.post(
        IMPORT, {"name": "t", "image_path": "moved.img", "size": MiB, "node": other.pk}
    )
    refused_with(response, "image_path", "image of export 'mine'")


def test_two_concurrent_imports_of_one_file_cannot_both_win(
    transactional_db, django_db_serialized_rollback, api, default_node, storage_root, monkeypatch
):
    # serialized_rollback: a live-server test before it (test_api_schema.py) leaves the
    # database flushed, without the default node the migrations made.
    (storage_root / "sub").mkdir()
    (storage_root / "sub" / "shared.img").write_bytes(VICTIM)
    inner = WorkerNode.objects.create(
        name="inner",
        listen="127.0.0.1:10810",
        storage_root=str(storage_root / "sub"),
        tls_policy=default_node.tls_policy,
    )
    for name, path, node in (
        ("outer", "sub/shared.img", default_node),
        ("inner", "shared.img", inner),
    ):
        response = api.post(
            IMPORT, {"name": name, "image_path": path, "size": MiB, "node": node.pk}
        )
        assert response.status_code == 202, response.content
    # Both imports meet after their check, unless one waits for the other's commit (then the
    # meeting is given up after a bound and the first goes on alone).
    meeting = threading.Barrier(2)
    take_over = images.take_over

    def take_over_after_meeting(place, check):
        def checked_then_meet(device_inode, size):
            check(device_inode, size)
            with contextlib.suppress(threading.BrokenBarrierError):
                meeting.wait(timeout=5)

        return take_over(place, checked_then_meet)

    monkeypatch.setattr(images, "take_over", take_over_after_meeting)
    jobs = list(Job.objects.filter(state=JobState.QUEUED).order_by("pk"))

    def run(job):
        try:
            run_job.apply(args=[job.pk], task_id=job.celery_task_id)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    states = sorted(Job.objects.get(pk=j.pk).state for j in jobs)
    assert states == sorted([JobState.SUCCEEDED, JobState.FAILED])
    assert Export.objects.exclude(image_identity="").count() == 1
