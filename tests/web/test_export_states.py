"""States tell the truth: an export being resized, cloned or verified shows it, its size
changes only when the resize job has run, it stays served meanwhile, and every change is
one `export.state_changed` event (exports_app/event_signals.py, the only source). The jobs run
in-process here (`run_job.apply`); tests/e2e/ runs them on a real Celery worker."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from exports_app.choices import ExportState, JobState
from exports_app.models import Export, Job
from exports_app.services import events, provisioning
from exports_app.services.publishing import build_config
from exports_app.tasks import run_job

pytestmark = pytest.mark.django_db

EXPORTS = "/api/v1/exports/"
MiB = 1 << 20


@pytest.fixture
def ready(default_node):
    def make(name: str = "disk", size: int = MiB) -> Export:
        # Made by its create job, so the image is one nbdweb owns.
        export = Export.objects.create(node=default_node, name=name, size=size)
        assert run(provisioning.request_create(export).pk).state == JobState.SUCCEEDED
        export.refresh_from_db()
        assert export.state == ExportState.READY
        return export

    return make


@pytest.fixture
def changes(web_redis) -> Callable[[], list[tuple[str | None, str | None]]]:
    """The (old, new) states of the `export.state_changed` events recorded so far (in the
    Redis stream webhooks and the event stream read), of the callbacks a test ran."""

    def recorded() -> list[tuple[str | None, str | None]]:
        return [
            (event.data["old"], event.data["new"])
            for event in events.read_after("0-0", 1000)
            if event.kind == "export.state_changed"
        ]

    return recorded


def run(job_id: int) -> Job:
    run_job.apply(args=[job_id])
    return Job.objects.get(pk=job_id)


def state_and_size(export: Export) -> tuple[str, int]:
    export.refresh_from_db()
    return export.state, export.size


def test_a_resize_shows_resizing_at_the_old_size_until_its_job_has_run(
    api, ready, django_capture_on_commit_callbacks, changes
):
    export = ready()
    with django_capture_on_commit_callbacks(execute=True):
        response = api.patch(f"{EXPORTS}{export.pk}/", {"size": "2M"}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["state"], body["size"]) == ("resizing", MiB)
    assert body["job_url"].endswith(f"/api/v1/jobs/{body['job']}/")
    assert state_and_size(export) == (ExportState.RESIZING, MiB)
    # Still served while the job runs.
    assert [e.name for e in build_config(export.node).exports] == ["disk"]
    with django_capture_on_commit_callbacks(execute=True):
        assert run(body["job"]).state == JobState.SUCCEEDED
    assert state_and_size(export) == (ExportState.READY, 2 * MiB)
    assert changes() == [("ready", "resizing"), ("resizing", "ready")]


def test_verify_shows_verifying_and_jobs_in_a_row_show_the_next_ones_state(
    api, ready, django_capture_on_commit_callbacks
):
    export = ready()
    resize = api.post(f"{EXPORTS}{export.pk}/resize/", {"size": "2M"}, format="json").json()
    verify = api.post(f"{EXPORTS}{export.pk}/verify/").json()
    # The export shows the job that works on it now, not the one waiting behind it.
    assert (resize["state"], verify["state"]) == ("resizing", "resizing")
    assert run(resize["job"]).state == JobState.SUCCEEDED
    assert state_and_size(export) == (ExportState.VERIFYING, 2 * MiB)
    assert run(verify["job"]).state == JobState.SUCCEEDED
    export.refresh_from_db()
    assert (export.state, len(export.content_sha256)) == (ExportState.READY, 64)


def test_a_clone_shows_cloning_until_its_copy_is_made(api, ready):
    ready("gold")
    response = api.post(EXPORTS, {"name": "copy", "clone_from": "gold"}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["state"] == "cloning"
    copy = Export.objects.get(name="copy")
    assert copy.name not in [e.name for e in build_config(copy.node).exports]
    assert run(response.json()["job"]).state == JobState.SUCCEEDED
    assert state_and_size(copy) == (ExportState.READY, MiB)


def test_a_failed_resize_goes_back_to_ready_at_the_old_size(ready, changes):
    export = ready()
    os.remove(export.absolute_image_path)
    job = provisioning.request_resize(export, 2 * MiB)
    assert run(job.pk).state == JobState.FAILED
    export.refresh_from_db()
    assert (export.state, export.size) == (ExportState.READY, MiB)
    assert export.last_error
