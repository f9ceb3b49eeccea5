"""The console's forms and the export page: structured editors for who may connect, the add
form's defaults and layout, the number box and help texts, and the panel above the change
form (URI, client commands, who may connect, size, live sessions and jobs)."""

from __future__ import annotations

import pytest
from django.http import QueryDict

from exports_app.choices import ExportState, TLSMode
from exports_app.console.forms import ClientRulesField, ClientRulesWidget, NetworksField
from exports_app.models import Export, WorkerNode
from exports_app.services import provisioning
from tests.support.adminforms import export_add_form

pytestmark = pytest.mark.django_db

ADD = "/admin/exports_app/export/add/"


@pytest.fixture
def no_jobs(monkeypatch):
    monkeypatch.setattr(provisioning, "request_create", lambda export, **kw: None)


def _change_url(export: Export) -> str:
    return f"/admin/exports_app/export/{export.pk}/change/"


# -- the editors ----------------------------------------------------------------------------------


def test_client_rows_become_the_stored_rules() -> None:
    data = QueryDict(mutable=True)
    data.setlist("c_kind", ["common_name", "", "fingerprint_sha256"])
    data.setlist("c_value", ["alice", "", "AB:" * 31 + "AB"])
    rows = ClientRulesWidget().value_from_datadict(data, {}, "c")
    assert ClientRulesField().clean(rows) == [
        {"common_name": "alice"},
        {"fingerprint_sha256": "ab" * 32},
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"kind": "common_name", "value": ""}, "Row 1: choose a kind and give a value."),
        ({"kind": "", "value": "alice"}, "Row 1: choose a kind and give a value."),
        ({"kind": "fingerprint_sha256", "value": "xyz"}, "64 hex digits"),
        ({"kind": "uid", "value": "alice"}, "unknown key"),
    ],
)
def test_a_bad_client_row_is_named(row, message) -> None:
    with pytest.raises(Exception) as info:
        ClientRulesField().clean([row])
    assert message in " ".join(info.value.messages)


def test_networks_one_per_line_are_checked_line_by_line() -> None:
    field = NetworksField()
    assert field.clean("10.1.2.3/8\n\n  2001:db8::/32 \n") == ["10.0.0.0/8", "2001:db8::/32"]
    assert field.clean("") == []
    with pytest.raises(Exception) as info:
        field.clean("10.0.0.0/8\nnot-a-net\n300.1.1.1/32")
    messages = info.value.messages
    assert len(messages) == 2
    assert messages[0].startswith("Line 2 ('not-a-net')")
    assert messages[1].startswith("Line 3 ('300.1.1.1/32')")


# -- the add form ---------------------------------------------------------------------------------


def test_add_form_asks_only_what_a_person_decides(admin_client, default_node) -> None:
    html = admin_client.get(ADD).content.decode()
    # The only node is chosen already.
    assert f'<option value="{default_node.pk}" selected>' in html
    for absent in ("Allow shrinking", "Uri:", ">State:<", "Last error", "Content sha256"):
        assert absent not in html
    assert 'data-testid="client-rules"' in html
    assert "[{&quot;common_name" not in html and '[{"common_name' not in html  # no raw JSON


def test_node_is_not_preselected_among_several(admin_client, default_node) -> None:
    WorkerNode.objects.create(
        name="second",
        listen="127.0.0.1:10899",
        storage_root=default_node.storage_root,
        tls_policy=default_node.tls_policy,
    )
    html = admin_client.get(ADD).content.decode()
    assert f'<option value="{default_node.pk}" selected>' not in html


def test_help_text_keeps_angle_brackets(admin_client, default_node) -> None:
    html = admin_client.get(ADD).content.decode()
    assert "default &lt;name&gt;.img" in html
    html = admin_client.get("/admin/exports_app/certificate/add/").content.decode()
    assert "Default: &lt;kind&gt;-&lt;common name&gt;-&lt;serial&gt;." in html


def test_block_size_box_is_wide_enough(admin_client, default_node) -> None:
    export = Export.objects.create(node=default_node, name="d", size=1 << 20)
    html = admin_client.get(_change_url(export)).content.decode()
    assert 'class="console-number"' in html
    assert 'name="max_block_size" value="33554432"' in html


def test_structured_editors_save_through_the_admin(admin_client, default_node, no_jobs) -> None:
    data = export_add_form(
        default_node.pk,
        name="acl-disk",
        allowed_clients_kind=["common_name", "san"],
        allowed_clients_value=["alice", "host.example"],
        allowed_networks="192.0.2.0/24\n2001:db8::/48",
    )
    response = admin_client.post(ADD, data)
    assert response.status_code == 302, response.content.decode()[-3000:]
    export = Export.objects.get(name="acl-disk")
    assert export.allowed_clients == [{"common_name": "alice"}, {"san": "host.example"}]
    assert export.allowed_networks == ["192.0.2.0/24", "2001:db8::/48"]
    html = admin_client.get(_change_url(export)).content.decode()
    assert 'value="alice"' in html and "192.0.2.0/24\n2001:db8::/48" in html


def test_a_bad_network_line_is_a_form_error_not_a_500(admin_client, default_node, no_jobs) -> None:
    data = export_add_form(default_node.pk, name="bad-net", allowed_networks="10.0.0.0/33")
    response = admin_client.post(ADD, data)
    assert response.status_code == 200
    assert "Line 1 (&#x27;10.0.0.0/33&#x27;)" in response.content.decode()
    assert not Export.objects.filter(name="bad-net").exists()


# -- the export page ------------------------------------------------------------------------------


def test_export_page_shows_uri_commands_access_and_size(admin_client, default_node) -> None:
    export = Export.objects.create(
        node=default_node,
        name="web disk",
        size=1 << 30,
        allowed_networks=["10.0.0.0/8"],
        state=ExportState.READY,
    )
    with open(export.absolute_image_path, "wb") as image:
        image.truncate(export.size)
        image.write(b"x" * 8192)
    html = admin_client.get(_change_url(export)).content.decode()
    assert f'id="export-uri" class="console-code">{export.uri}<' in html
    assert "nbdinfo nbd://127.0.0.1:10809/web%20disk<" in html
    assert "nbd-client -N &#x27;web disk&#x27; 127.0.0.1 10809 /dev/nbd0" in html
    assert "plaintext allowed" in html and "<code>10.0.0.0/8</code>" in html
    assert "1.0\xa0GB virtual, 8.0\xa0KB allocated on disk" in html
    assert 'data-testid="export-live"' in html
    assert f"/admin/exports_app/export/{export.pk}/history/" in html


def test_tls_export_page_gives_the_bundle_commands(admin_client, tls_node) -> None:
    node = tls_node(TLSMode.FORCEDTLS)
    export = Export.objects.create(node=node, name="secure", size=1 << 20)
    html = admin_client.get(_change_url(export)).content.decode()
    assert "TLS required" in html
    assert "nbds://127.0.0.1:10809/secure?tls-certificates=$PWD/nbd-tls" in html
    assert "--cacertfile $PWD/nbd-tls/ca-cert.pem" in html


def test_lists_show_states_as_badges(admin_client, default_node) -> None:
    Export.objects.create(node=default_node, name="f", size=1 << 20, state=ExportState.FAILED)
    html = admin_client.get("/admin/exports_app/export/").content.decode()
    assert 'class="badge badge-bad" data-state="failed">Failed<' in html
    assert admin_client.get("/admin/exports_app/job/").status_code == 200
