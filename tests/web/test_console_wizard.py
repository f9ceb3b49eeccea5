"""The export wizard: one short form, the API's create service, then a page that follows the
create job (its htmx part reloads until the export is ready)."""

from __future__ import annotations

import pytest

from exports_app.choices import ExportState, JobState
from exports_app.models import Export, Job

pytestmark = pytest.mark.django_db

WIZARD = "/admin/console/exports/new/"


def test_the_wizard_needs_add_export(staff, default_node) -> None:
    client = staff("exports_app.view_export")
    assert client.get(WIZARD).status_code == 403
    assert client.post(WIZARD, {"name": "x", "size": "1G"}).status_code == 403
    assert not Export.objects.exists()


def test_the_wizard_asks_four_things_with_the_only_node_chosen(staff, default_node) -> None:
    html = staff("exports_app.add_export").get(WIZARD).content.decode()
    for name in ("name", "size", "node", "tls_required"):
        assert f'name="{name}"' in html
    assert f'<option value="{default_node.pk}" selected>' in html
    assert 'name="allowed_clients' not in html


def test_the_wizard_creates_the_export_and_its_job(staff, default_node, monkeypatch) -> None:
    client = staff("exports_app.add_export")
    response = client.post(
        WIZARD, {"name": "wiz", "size": "512M", "node": default_node.pk}, follow=False
    )
    export = Export.objects.get(name="wiz")
    assert response.status_code == 302
    assert response["Location"] == f"/admin/console/exports/new/{export.pk}/"
    assert export.size == 512 << 20 and export.state == ExportState.PROVISIONING
    job = Job.objects.get(export=export)
    assert job.kind == "create"
    page = client.get(response["Location"]).content.decode()
    assert 'hx-trigger="every 1s"' in page and 'aria-valuenow="0"' in page
    Job.objects.filter(pk=job.pk).update(state=JobState.SUCCEEDED, progress=100)
    Export.objects.filter(pk=export.pk).update(state=ExportState.READY)
    part = client.get(response["Location"], HTTP_HX_REQUEST="true").content.decode()
    assert part.lstrip().startswith('<div class="console-card wizard" id="wizard-progress"')
    assert 'data-state="ready"' in part and "hx-trigger" not in part
    assert 'aria-valuenow="100"' in part and export.uri in part


def test_bad_input_is_a_form_error(staff, default_node) -> None:
    client = staff("exports_app.add_export")
    response = client.post(WIZARD, {"name": "bad", "size": "12Q", "node": default_node.pk})
    assert response.status_code == 200
    assert 'class="errorlist' in response.content.decode()
    response = client.post(WIZARD, {"name": "", "size": "1G", "node": default_node.pk})
    assert response.status_code == 200
    assert not Export.objects.exists()
