"""The admin through Django's test client: every page, the add forms and every action."""

import io
import tarfile

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.messages import get_messages

from exports_app.choices import ExportState, TLSMode
from exports_app.models import Certificate, CertificateAuthority, Export, TLSPolicy
from exports_app.services import provisioning
from tests.support.adminforms import export_add_form

pytestmark = pytest.mark.django_db

MODELS = ["workernode", "tlspolicy", "export", "certificateauthority", "certificate"]


@pytest.fixture
def objects(default_node, authority, client_certificate, server_certificate):
    export = Export.objects.create(
        node=default_node,
        name="disk",
        size=1 << 20,
        state=ExportState.FAILED,
        last_error="No space left on device",
    )
    return {
        "workernode": default_node,
        "tlspolicy": default_node.tls_policy,
        "export": export,
        "certificateauthority": authority,
        "certificate": client_certificate,
    }


@pytest.fixture
def hooks(monkeypatch):
    calls = []
    monkeypatch.setattr(
        provisioning, "request_create", lambda e, **kwargs: calls.append(("create", e.name))
    )
    monkeypatch.setattr(
        provisioning,
        "request_resize",
        # (old, new): the export keeps its stored size until the job has resized the image.
        lambda e, size, force=False, **kwargs: calls.append(("resize", e.name, e.size, size)),
    )
    return calls


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def _action(client, model: str, action: str, pks, **extra):
    data = {"action": action, ACTION_CHECKBOX_NAME: [str(pk) for pk in pks], **extra}
    return client.post(f"/admin/exports_app/{model}/", data)


@pytest.mark.parametrize("model", MODELS)
def test_every_admin_page_renders(admin_client, objects, model):
    pk = objects[model].pk
    for url in (
        f"/admin/exports_app/{model}/",
        f"/admin/exports_app/{model}/?q=a",
        f"/admin/exports_app/{model}/add/",
        f"/admin/exports_app/{model}/{pk}/change/",
        f"/admin/exports_app/{model}/{pk}/history/",
        f"/admin/exports_app/{model}/{pk}/delete/",
    ):
        assert admin_client.get(url).status_code == 200, url


def test_list_filters_render(admin_client, objects):
    for url in (
        "/admin/exports_app/export/?state__exact=failed",
        "/admin/exports_app/export/?enabled__exact=1",
        "/admin/exports_app/certificate/?revoked=yes",
        "/admin/exports_app/certificate/?kind__exact=client",
        "/admin/exports_app/tlspolicy/?mode__exact=NOTLS",
        "/admin/exports_app/certificateauthority/?is_imported__exact=0",
    ):
        assert admin_client.get(url).status_code == 200, url


def test_state_and_last_error_are_visible(admin_client, objects):
    listing = admin_client.get("/admin/exports_app/export/").content.decode()
    assert "No space left on device" in listing
    detail = admin_client.get(
        f"/admin/exports_app/export/{objects['export'].pk}/change/"
    ).content.decode()
    assert "No space left on device" in detail and "Failed" in detail


def test_admin_pages_need_staff_and_permission(client, make_user, objects):
    assert client.get("/admin/exports_app/export/").status_code == 302  # to the login page
    staff = make_user()
    staff.is_staff = True
    staff.save()
    client.force_login(staff)
    assert client.get("/admin/exports_app/export/").status_code == 403
    bundle = f"/admin/exports_app/certificate/{objects['certificate'].pk}/bundle/"
    assert client.get(bundle).status_code == 403


def test_add_export_through_the_admin(admin_client, default_node, hooks):
    data = export_add_form(default_node.pk)
    response = admin_client.post("/admin/exports_app/export/add/", data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    export = Export.objects.get(name="admin-disk")
    assert (export.size, export.image_path, export.state) == (
        1 << 30,
        "admin-disk.img",
        "provisioning",
    )
    assert hooks == [("create", "admin-disk")]

    bad = {
        **data,
        "name": "other",
        "image_path": "../escape.img",
        "tls_required": "on",
        "size": "1000",
    }
    response = admin_client.post("/admin/exports_app/export/add/", bad)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert {"image_path", "tls_required", "size"} <= set(errors)

    # Change a field through the change form: the size change goes through the resize hook.
    change = {**data, "size": "2G"}
    del change["node"]
    response = admin_client.post(f"/admin/exports_app/export/{export.pk}/change/", change)
    assert response.status_code == 302, response.context["adminform"].form.errors
    assert hooks[-1] == ("resize", "admin-disk", 1 << 30, 2 << 30)
    shrink = {**change, "size": "1M"}
    response = admin_client.post(f"/admin/exports_app/export/{export.pk}/change/", shrink)
    assert response.status_code == 200
    assert "size" in response.context["adminform"].form.errors
    response = admin_client.post(
        f"/admin/exports_app/export/{export.pk}/change/", {**shrink, "force": "on"}
    )
    assert response.status_code == 302
    # The stubbed job never ran: the stored size is still the first one.
    assert hooks[-1] == ("resize", "admin-disk", 1 << 30, 1 << 20)


def test_node_rules_hold_in_the_admin(admin_client, default_node, tmp_path):
    Export.objects.create(node=default_node, name="x", size=512)
    data = {
        "name": default_node.name,
        "description": "",
        "listen": default_node.listen,
        "public_address": "",
        "storage_root": str(tmp_path / "elsewhere"),
        "tls_policy": default_node.tls_policy_id,
    }
    response = admin_client.post(f"/admin/exports_app/workernode/{default_node.pk}/change/", data)
    assert response.status_code == 200
    assert "storage_root" in response.context["adminform"].form.errors


def test_enable_and_disable_actions(admin_client, objects):
    export = objects["export"]
    _action(admin_client, "export", "disable_exports", [export.pk])
    export.refresh_from_db()
    assert export.enabled is False
    _action(admin_client, "export", "enable_exports", [export.pk])
    export.refresh_from_db()
    assert export.enabled is True
    assert export.history.count() == 3


def test_resize_action(admin_client, objects, hooks):
    export = objects["export"]
    page = _action(admin_client, "export", "resize_exports", [export.pk])
    assert page.status_code == 200 and b"New size" in page.content
    response = _action(admin_client, "export", "resize_exports", [export.pk], apply="1", size="4M")
    assert response.status_code == 302
    export.refresh_from_db()
    # The size is stored when the (stubbed) job has run.
    assert export.size == 1 << 20
    assert hooks == [("resize", "disk", 1 << 20, 4 << 20)]
    response = _action(
        admin_client, "export", "resize_exports", [export.pk], apply="1", size="512K"
    )
    assert any("force" in m for m in _messages(response))  # shrinking needs force
    assert len(hooks) == 1
    _action(
        admin_client, "export", "resize_exports", [export.pk], apply="1", size="512K", force="on"
    )
    assert hooks[-1] == ("resize", "disk", 1 << 20, 512 << 10)
    page = _action(admin_client, "export", "resize_exports", [export.pk], apply="1", size="-1")
    assert page.status_code == 200 and page.context["form"].errors


def test_switch_tls_mode_action(admin_client, objects, server_certificate):
    policy = objects["tlspolicy"]
    assert _action(admin_client, "tlspolicy", "switch_tls_mode", [policy.pk]).status_code == 200
    response = _action(
        admin_client, "tlspolicy", "switch_tls_mode", [policy.pk], apply="1", mode="FORCEDTLS"
    )
    policy.refresh_from_db()
    assert policy.mode == TLSMode.NOTLS
    assert any("server certificate" in m for m in _messages(response))
    policy.server_certificate = server_certificate
    policy.save()
    response = _action(
        admin_client, "tlspolicy", "switch_tls_mode", [policy.pk], apply="1", mode="OPTIONALTLS"
    )
    policy.refresh_from_db()
    assert policy.mode == TLSMode.OPTIONALTLS
    assert any("STARTTLS" in m for m in _messages(response))


def test_policy_change_form_warns_about_optionaltls(admin_client, objects, server_certificate):
    policy = objects["tlspolicy"]
    data = {
        "name": policy.name,
        "description": "",
        "mode": "OPTIONALTLS",
        "server_certificate": server_certificate.pk,
        "client_verification": "none",
        "min_tls_version": "1.2",
    }
    response = admin_client.post(
        f"/admin/exports_app/tlspolicy/{policy.pk}/change/", data, follow=True
    )
    assert any("STARTTLS" in m for m in _messages(response)) or b"STARTTLS" in response.content
    policy.refresh_from_db()
    assert policy.mode == TLSMode.OPTIONALTLS
    bad = {**data, "mode": "FORCEDTLS", "server_certificate": "", "client_verification": "required"}
    response = admin_client.post(f"/admin/exports_app/tlspolicy/{policy.pk}/change/", bad)
    assert response.status_code == 200
    assert response.context["adminform"].form.errors


def test_create_and_import_authority_in_the_admin(admin_client, db):
    response = admin_client.post(
        "/admin/exports_app/certificateauthority/add/",
        {"name": "admin-ca", "common_name": "Admin CA", "key_algorithm": "ec-p256"},
    )
    assert response.status_code == 302
    created = CertificateAuthority.objects.get(name="admin-ca")
    assert created.has_private_key
    response = admin_client.post(
        "/admin/exports_app/certificateauthority/add/",
        {
            "name": "copy",
            "certificate_pem": created.certificate_pem.replace("A", "B", 3),
            "key_algorithm": "ec-p256",
        },
    )
    assert response.status_code == 200
    assert "certificate_pem" in response.context["adminform"].form.errors


def test_issue_client_certificate_action_and_bundle(admin_client, objects):
    authority = objects["certificateauthority"]
    page = _action(admin_client, "certificateauthority", "issue_client_certificate", [authority.pk])
    assert page.status_code == 200
    response = _action(
        admin_client,
        "certificateauthority",
        "issue_client_certificate",
        [authority.pk],
        apply="1",
        common_name="bob",
    )
    assert response.status_code == 302
    issued = Certificate.objects.get(common_name="bob")
    assert any("Download its bundle" in m for m in _messages(response))

    response = _action(admin_client, "certificate", "download_bundle", [issued.pk])
    assert response["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        assert {"ca-cert.pem", "client-cert.pem", "client-key.pem", "README.txt"} == set(
            archive.getnames()
        )
    response = admin_client.get(f"/admin/exports_app/certificate/{issued.pk}/bundle/")
    assert response.status_code == 200 and response["Content-Type"] == "application/gzip"
    # It holds the private key: no browser or proxy cache may keep it.
    assert "no-store" in response["Cache-Control"].split(", ")
    # Two at once is refused with a message, not an error page.
    response = _action(
        admin_client, "certificate", "download_bundle", [issued.pk, objects["certificate"].pk]
    )
    assert response.status_code == 302


def test_issue_certificate_through_add_form(admin_client, authority):
    response = admin_client.post(
        "/admin/exports_app/certificate/add/",
        {
            "name": "",
            "kind": "server",
            "authority": authority.pk,
            "common_name": "nbd.example",
            "dns_names": "nbd.example, localhost",
            "ip_addresses": "127.0.0.1",
        },
    )
    assert response.status_code == 302
    cert = Certificate.objects.get(common_name="nbd.example")
    assert cert.dns_names == ["nbd.example", "localhost"] and cert.ip_addresses == ["127.0.0.1"]
    response = admin_client.post(
        "/admin/exports_app/certificate/add/",
        {"kind": "client", "authority": authority.pk, "ip_addresses": "x"},
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors


def test_revoke_action(admin_client, objects):
    certificate = objects["certificate"]
    _action(admin_client, "certificate", "revoke_certificates", [certificate.pk])
    certificate.refresh_from_db()
    assert certificate.is_revoked
    response = admin_client.get(f"/admin/exports_app/certificate/{certificate.pk}/bundle/")
    assert response.status_code == 302  # back to the change page with a message


def test_delete_export_in_the_admin_uses_the_hook(admin_client, objects, monkeypatch):
    calls = []
    monkeypatch.setattr(
        provisioning, "request_delete", lambda e, **kwargs: calls.append(e.name) or True
    )
    export = objects["export"]
    response = admin_client.post(f"/admin/exports_app/export/{export.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert calls == ["disk"]


def test_history_shows_who_changed_what(admin_client, admin_user, objects):
    policy = objects["tlspolicy"]
    data = {
        "name": policy.name,
        "description": "changed",
        "mode": "NOTLS",
        "client_verification": "none",
        "min_tls_version": "1.2",
    }
    admin_client.post(f"/admin/exports_app/tlspolicy/{policy.pk}/change/", data)
    record = TLSPolicy.history.filter(id=policy.pk).first()
    assert record.history_user == admin_user
    page = admin_client.get(f"/admin/exports_app/tlspolicy/{policy.pk}/history/").content.decode()
    assert admin_user.username in page
