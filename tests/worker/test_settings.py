"""nbdworker.settings: listen addresses and the worker's own settings (command line and
environment)."""

from __future__ import annotations

import os

import pytest

from nbdworker.contract.config import ConfigError
from nbdworker.settings import WorkerSettings, parse_listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10809", ("tcp", "127.0.0.1", 10809, "")),
        ("[::1]:10809", ("tcp", "::1", 10809, "")),
        ("[::]:0", ("tcp", "::", 0, "")),
        (":10809", ("tcp", "0.0.0.0", 10809, "")),
        ("localhost:1", ("tcp", "localhost", 1, "")),
        ("unix:/run/nbd.sock", ("unix", "", 0, "/run/nbd.sock")),
    ],
)
def test_parse_listen(text, expected):
    a = parse_listen(text)
    assert (a.kind, a.host, a.port, a.path) == expected


@pytest.mark.parametrize(
    "text", ["nonsense", "1.2.3.4:x", "1.2.3.4:70000", "unix:", "[::1]10809", "::1:5"]
)
def test_parse_listen_rejects(text):
    with pytest.raises(ConfigError):
        parse_listen(text)


def test_settings_defaults(tmp_path):
    s = WorkerSettings.from_sources(environ={"NBDWEB_DATA_DIR": str(tmp_path)})
    assert s.storage_roots == (os.path.realpath(tmp_path / "images"),)
    assert [str(a) for a in s.listen] == ["127.0.0.1:10809"]
    assert s.node == "default"


def test_settings_from_environment(tmp_path):
    env = {
        "NBDWORKER_STORAGE_ROOTS": f"{tmp_path}/a:{tmp_path}/b",
        "NBD_LISTEN": "127.0.0.1:1, [::1]:2,unix:/tmp/x.sock",
        "NBDWORKER_NODE": "node-7",
    }
    s = WorkerSettings.from_sources(environ=env)
    assert s.storage_roots == (f"{tmp_path}/a", f"{tmp_path}/b")
    assert [str(a) for a in s.listen] == ["127.0.0.1:1", "[::1]:2", "unix:/tmp/x.sock"]
    assert s.node == "node-7"


def test_command_line_beats_environment(tmp_path):
    env = {"NBDWORKER_STORAGE_ROOTS": "/elsewhere", "NBD_LISTEN": "127.0.0.1:1"}
    s = WorkerSettings.from_sources([str(tmp_path)], ["127.0.0.1:2"], environ=env)
    assert s.storage_roots == (str(tmp_path),)
    assert [str(a) for a in s.listen] == ["127.0.0.1:2"]


def test_storage_roots_are_kept_as_given_and_resolved(tmp_path):
    """A root given through a symlink: exports may name it either way (nbdworker/imagefile.py
    walks from the real one)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    s = WorkerSettings.from_sources([str(tmp_path / "alias")], environ={})
    assert s.storage_roots == (str(real),)
    assert s.root_spellings == ((str(tmp_path / "alias"), str(real)),)
