"""`tls_required` is accepted only where the worker enforces it: SELECTIVETLS and FORCEDTLS.

NOTLS has no TLS and OPTIONALTLS never refuses a plaintext client, so the worker refuses to
serve a `tls_required` export under either (nbdworker.contract.config.tls_refusal). Every way of
reaching that combination is refused here with the fix named: an export created or changed through
the API or the admin, a policy switched to such a mode (API, admin form, admin action), and a node
given such a policy (API, admin).
"""

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.messages import get_messages

from exports_app.choices import TLSMode
from exports_app.models import Export, TLSPolicy, WorkerNode
from nbdworker.protocol.tlsmode import TLSMode as WorkerTLSMode
from nbdworker.protocol.tlsmode import export_needs_tls
from tests.support.adminforms import export_add_form

pytestmark = pytest.mark.django_db

EXPORTS = "/api/v1/exports/"
NODES = "/api/v1/nodes/"
POLICIES = "/api/v1/tls-policies/"

UNENFORCING = [TLSMode.NOTLS, TLSMode.OPTIONALTLS]
ENFORCING = [TLSMode.SELECTIVETLS, TLSMode.FORCEDTLS]


@pytest.fixture
def node_in(default_node, tls_node):
    """The default node under `mode` (NOTLS is the data migration's default policy)."""

    def switch(mode: str) -> WorkerNode:
        return default_node if mode == TLSMode.NOTLS else tls_node(mode)

    return switch


@pytest.fixture
def tls_only_node(tls_node) -> WorkerNode:
    """The default node under SELECTIVETLS with one export that requires TLS."""
    node = tls_node(TLSMode.SELECTIVETLS)
    Export.objects.create(node=node, name="secret", size=512, tls_required=True)
    return node


def policy_in(mode: str, server_certificate) -> TLSPolicy:
    cert = server_certificate if mode != TLSMode.NOTLS else None
    return TLSPolicy.objects.create(name=f"spare-{mode}", mode=mode, server_certificate=cert)


def names_the_fix(message: str) -> bool:
    return "SELECTIVETLS" in message and "FORCEDTLS" in message


# -- what the web side says the worker does -----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "tls_required", "needs_tls"),
    [
        (TLSMode.NOTLS, False, False),
        (TLSMode.NOTLS, True, False),
        (TLSMode.OPTIONALTLS, False, False),
        (TLSMode.OPTIONALTLS, True, False),
        (TLSMode.FORCEDTLS, False, True),
        (TLSMode.FORCEDTLS, True, True),
        (TLSMode.SELECTIVETLS, False, False),
        (TLSMode.SELECTIVETLS, True, True),
    ],
)
def test_export_needs_tls_is_what_the_worker_enforces(mode, tls_required, needs_tls):
    assert TLSPolicy(mode=mode).export_needs_tls(tls_required) is needs_tls
    # The worker's own answer for a client that has not started TLS.
    assert export_needs_tls(WorkerTLSMode[mode], tls_required, tls_active=False) is needs_tls


@pytest.mark.parametrize("mode", TLSMode.values)
def test_enforces_tls_required_only_in_selectivetls_and_forcedtls(mode):
    assert TLSPolicy(mode=mode).enforces_tls_required is (mode in ENFORCING)


# -- exports through the API --------------------------------------------------------------------


@pytest.mark.parametrize("mode", UNENFORCING)
def test_api_refuses_creating_a_tls_required_export(api, node_in, mode):
    node_in(mode)
    response = api.post(EXPORTS, {"name": "x", "size": 512, "tls_required": True})
    assert response.status_code == 400, response.content
    (message,) = response.json()["tls_required"]
    assert mode in message and names_the_fix(message), message
    assert not Export.objects.filter(name="x").exists()


@pytest.mark.parametrize("mode", UNENFORCING)
def test_api_refuses_setting_tls_required_on_an_export(api, node_in, mode):
    node = node_in(mode)
    export = Export.objects.create(node=node, name="x", size=512)
    response = api.patch(f"{EXPORTS}{export.pk}/", {"tls_required": True})
    assert response.status_code == 400, response.content
    (message,) = response.json()["tls_required"]
    assert names_the_fix(message), message
    export.refresh_from_db()
    assert export.tls_required is False


@pytest.mark.parametrize("mode", ENFORCING)
def test_api_accepts_tls_required_where_it_is_enforced(api, tls_node, mode):
    tls_node(mode)
    response = api.post(EXPORTS, {"name": "x", "size": 512, "tls_required": True})
    assert response.status_code == 201, response.content
    assert response.json()["uri"].startswith("nbds://")


def test_export_saved_before_the_rule_is_flagged_and_not_called_tls(api, tls_node):
    # What an older version let an admin create: the worker refuses it, the API says so.
    node = tls_node(TLSMode.OPTIONALTLS)
    export = Export.objects.create(node=node, name="legacy", size=512, tls_required=True)
    body = api.get(f"{EXPORTS}{export.pk}/").json()
    assert body["uri"].startswith("nbd://")
    assert any("worker refuses to serve" in w and names_the_fix(w) for w in body["warnings"])
    # Clearing the flag is the way out that needs no policy change.
    response = api.patch(f"{EXPORTS}{export.pk}/", {"tls_required": False})
    assert response.status_code == 200, response.content
    assert not any("refuses" in w for w in response.json()["warnings"])


# -- policies and nodes through the API ---------------------------------------------------------


@pytest.mark.parametrize("mode", UNENFORCING)
def test_api_refuses_switching_a_policy_with_tls_only_exports(api, tls_only_node, mode):
    url = f"{POLICIES}{tls_only_node.tls_policy_id}/"
    response = api.patch(url, {"mode": mode})
    assert response.status_code == 400, response.content
    (message,) = response.json()["mode"]
    assert "'secret'" in message and names_the_fix(message), message
    assert TLSPolicy.objects.get(pk=tls_only_node.tls_policy_id).mode == TLSMode.SELECTIVETLS


def test_api_allows_switching_to_forcedtls_with_tls_only_exports(api, tls_only_node):
    url = f"{POLICIES}{tls_only_node.tls_policy_id}/"
    assert api.patch(url, {"mode": TLSMode.FORCEDTLS}).status_code == 200


@pytest.mark.parametrize("mode", UNENFORCING)
def test_api_refuses_giving_a_node_with_tls_only_exports_such_a_policy(
    api, tls_only_node, server_certificate, mode
):
    policy = policy_in(mode, server_certificate)
    response = api.patch(f"{NODES}{tls_only_node.pk}/", {"tls_policy": policy.pk})
    assert response.status_code == 400, response.content
    (message,) = response.json()["tls_policy"]
    assert mode in message and names_the_fix(message), message
    assert WorkerNode.objects.get(pk=tls_only_node.pk).tls_policy.mode == TLSMode.SELECTIVETLS


# -- the admin ----------------------------------------------------------------------------------


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.mark.parametrize("mode", UNENFORCING)
def test_admin_export_form_refuses_tls_required(admin_client, node_in, mode):
    node = node_in(mode)
    data = export_add_form(node.pk, size="1M", tls_required="on")
    response = admin_client.post("/admin/exports_app/export/add/", data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"tls_required"}, errors
    assert names_the_fix(errors["tls_required"][0])
    assert not Export.objects.filter(name="admin-disk").exists()


@pytest.mark.parametrize("mode", UNENFORCING)
def test_admin_policy_form_refuses_the_mode(admin_client, tls_only_node, server_certificate, mode):
    policy = tls_only_node.tls_policy
    data = {
        "name": policy.name,
        "description": "",
        "mode": mode,
        "server_certificate": server_certificate.pk,
        "client_verification": "none",
        "min_tls_version": "1.2",
    }
    response = admin_client.post(f"/admin/exports_app/tlspolicy/{policy.pk}/change/", data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "mode" in errors and names_the_fix(errors["mode"][0]), errors
    policy.refresh_from_db()
    assert policy.mode == TLSMode.SELECTIVETLS


@pytest.mark.parametrize("mode", UNENFORCING)
def test_admin_switch_mode_action_refuses_the_mode(admin_client, tls_only_node, mode):
    policy = tls_only_node.tls_policy
    data = {
        "action": "switch_tls_mode",
        ACTION_CHECKBOX_NAME: [str(policy.pk)],
        "apply": "1",
        "mode": mode,
    }
    response = admin_client.post("/admin/exports_app/tlspolicy/", data)
    assert any("'secret'" in m and names_the_fix(m) for m in _messages(response))
    policy.refresh_from_db()
    assert policy.mode == TLSMode.SELECTIVETLS


@pytest.mark.parametrize("mode", UNENFORCING)
def test_admin_node_form_refuses_the_policy(admin_client, tls_only_node, server_certificate, mode):
    policy = policy_in(mode, server_certificate)
    data = {
        "name": tls_only_node.name,
        "description": "",
        "listen": tls_only_node.listen,
        "public_address": "",
        "storage_root": tls_only_node.storage_root,
        "tls_policy": policy.pk,
    }
    response = admin_client.post(f"/admin/exports_app/workernode/{tls_only_node.pk}/change/", data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "tls_policy" in errors and names_the_fix(errors["tls_policy"][0]), errors
    assert WorkerNode.objects.get(pk=tls_only_node.pk).tls_policy_id != policy.pk
