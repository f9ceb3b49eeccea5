"""NBD_PUBLIC_ADDRESS (docker compose, make run) sets the default node's public address, so
export URIs name an address remote clients reach; NBD_LISTEN sets where it listens."""

import pytest
from django.core.management import CommandError, call_command

from exports_app.models import Export


def test_public_address_from_the_environment_goes_into_uris(api, default_node, monkeypatch):
    export = Export.objects.create(node=default_node, name="disk", size=1 << 20, state="ready")
    monkeypatch.setenv("NBD_PUBLIC_ADDRESS", "nbd.example.net:10809")
    call_command("set_public_address")
    default_node.refresh_from_db()
    assert default_node.public_address == "nbd.example.net:10809"
    uri = api.get(f"/api/v1/exports/{export.pk}/").json()["uri"]
    assert uri == "nbd://nbd.example.net:10809/disk"


def test_unset_changes_nothing_and_a_bad_one_is_refused(default_node, monkeypatch):
    monkeypatch.delenv("NBD_PUBLIC_ADDRESS", raising=False)
    call_command("set_public_address")
    default_node.refresh_from_db()
    assert default_node.public_address == ""
    monkeypatch.setenv("NBD_PUBLIC_ADDRESS", "not an address")
    with pytest.raises(CommandError, match="NBD_PUBLIC_ADDRESS"):
        call_command("set_public_address")


def test_a_stack_started_again_on_another_port_gives_uris_with_that_port(
    api, default_node, settings
):
    # make run on 10888, then again with NBD_LISTEN=...:10887: the worker listened on 10887
    # while every export URI still named 10888.
    export = Export.objects.create(node=default_node, name="disk", size=1 << 20, state="ready")
    settings.NBD_LISTEN = "127.0.0.1:10887"
    call_command("sync_node_listen")
    uri = api.get(f"/api/v1/exports/{export.pk}/").json()["uri"]
    assert uri == "nbd://127.0.0.1:10887/disk"


def test_a_bad_nbd_listen_is_refused_naming_it(default_node, settings):
    before = default_node.listen
    settings.NBD_LISTEN = "not an address"
    with pytest.raises(CommandError, match="NBD_LISTEN"):
        call_command("sync_node_listen")
    default_node.refresh_from_db()
    assert default_node.listen == before
