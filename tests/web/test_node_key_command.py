"""`manage.py node_key NODE`: the key a node's worker is given instead of the master secret."""

from __future__ import annotations

import io
import stat

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from nbdworker.contract.nodekey import derive_node_key, load_node_key

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("node_key", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_prints_the_node_key_on_its_last_line() -> None:
    printed = run("edge-1").splitlines()[-1]
    assert printed == derive_node_key(settings.NBDWEB_CONFIG_SECRET, "edge-1")
    assert printed != run("edge-2").splitlines()[-1]
    assert settings.NBDWEB_CONFIG_SECRET not in printed


def test_write_makes_a_0600_file_the_worker_reads(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NBDWEB_DATA_DIR", str(tmp_path))
    run("edge-1", "--write")
    path = tmp_path / "node_keys" / "edge-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = load_node_key("edge-1", {"NBDWEB_DATA_DIR": str(tmp_path)})
    assert key == derive_node_key(settings.NBDWEB_CONFIG_SECRET, "edge-1")
    assert not key.from_master


def test_write_keeps_the_key_private_in_a_directory_made_loose_beforehand(
    tmp_path, monkeypatch
) -> None:
    """A node_keys dir made by hand (0777) where someone left a world-readable (and writable)
    file at the temporary name: the key neither lands in that file nor stays readable."""
    monkeypatch.setenv("NBDWEB_DATA_DIR", str(tmp_path))
    keys = tmp_path / "node_keys"
    keys.mkdir()
    keys.chmod(0o777)
    planted = keys / ".edge-1.tmp"
    planted.write_text("")
    planted.chmod(0o666)
    reader = planted.open()  # a reader holding it open sees what is written into it
    run("edge-1", "--write")
    path = keys / "edge-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert reader.read() == ""
    assert load_node_key("edge-1", {"NBDWEB_DATA_DIR": str(tmp_path)}) == derive_node_key(
        settings.NBDWEB_CONFIG_SECRET, "edge-1"
    )


def test_a_name_that_is_no_node_name_is_refused() -> None:
    with pytest.raises(CommandError, match="node name"):
        run("../etc")
