"""The shared validators, limits tested at the limit and one over."""

import os

import pytest
from django.core.exceptions import ValidationError

from exports_app.constants import MAX_EXPORT_SIZE, MAX_NAME_BYTES
from exports_app.validators import (
    normalize_client_rules,
    normalize_networks,
    parse_listen_address,
    parse_size,
    resolve_image_path,
    validate_nbd_name,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (512, 512),
        ("512", 512),
        ("10G", 10 << 30),
        ("512M", 512 << 20),
        ("1T", 1 << 40),
        ("4k", 4096),
        ("2GiB", 2 << 30),
        (" 1 G ", 1 << 30),
        (1024.0, 1024),
        (MAX_EXPORT_SIZE, MAX_EXPORT_SIZE),
    ],
)
def test_parse_size_accepts_bytes_and_binary_units(given, expected):
    assert parse_size(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        0,
        -512,
        511,
        513,
        "0",
        "1",
        "-1G",
        "10X",
        "G",
        "",
        "1.5G",
        1.5,
        True,
        None,
        [],
        {},
        MAX_EXPORT_SIZE + 512,
        "99999999999999999999999999999999999T",
    ],
)
def test_parse_size_rejects(given):
    with pytest.raises(ValidationError):
        parse_size(given)


def test_name_at_limit_passes_and_one_over_fails():
    validate_nbd_name("a" * MAX_NAME_BYTES)
    with pytest.raises(ValidationError):
        validate_nbd_name("a" * (MAX_NAME_BYTES + 1))
    # Bytes, not characters: 2048 two-byte characters are exactly 4096 bytes.
    validate_nbd_name("é" * (MAX_NAME_BYTES // 2))
    with pytest.raises(ValidationError):
        validate_nbd_name("é" * (MAX_NAME_BYTES // 2) + "a")


@pytest.mark.parametrize("name", ["", "a\0b", "tab\there", "new\nline", "del\x7f", "c1\x85"])
def test_name_rejects_empty_and_control_characters(name):
    with pytest.raises(ValidationError):
        validate_nbd_name(name)


@pytest.mark.parametrize("name", ["disk", "with space", "ünïcødé", "a/b", "日本語"])
def test_name_accepts_ordinary_strings(name):
    validate_nbd_name(name)


@pytest.mark.parametrize(
    "rel", ["../x.img", "a/../../x.img", "/etc/passwd", "", ".", "dir/", "a\0b", "x" * 1025]
)
def test_image_path_refuses_escapes(tmp_path, rel):
    with pytest.raises(ValidationError):
        resolve_image_path(str(tmp_path), rel)


def test_image_path_refuses_symlink_out_of_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    os.symlink("/etc/passwd", root / "passwd.img")
    with pytest.raises(ValidationError):
        resolve_image_path(str(root), "link/disk.img")
    with pytest.raises(ValidationError):
        resolve_image_path(str(root), "passwd.img")


def test_image_path_inside_root(tmp_path):
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "sub", tmp_path / "inner")  # a link that stays inside is fine
    assert resolve_image_path(str(tmp_path), "inner/d.img") == str(tmp_path / "inner" / "d.img")
    assert resolve_image_path(str(tmp_path), "d.img") == str(tmp_path / "d.img")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        ("[::1]:1", ("::1", 1)),
        ("nbd.example:65535", ("nbd.example", 65535)),
    ],
)
def test_listen_address(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "host", ":10809", "host:0", "host:65536", "::1:10809", "[zz]:1", "h:x"]
)
def test_listen_address_rejects(text):
    with pytest.raises(ValidationError):
        parse_listen_address(text)


def test_client_rules_normalise_fingerprints():
    fp = "AB:" * 31 + "AB"
    assert normalize_client_rules([{"fingerprint_sha256": fp}, {"common_name": "alice"}]) == [
        {"fingerprint_sha256": "ab" * 32},
        {"common_name": "alice"},
    ]


@pytest.mark.parametrize(
    "rules",
    [
        "alice",
        [{"common_name": ""}],
        [{"cn": "x"}],
        [{"common_name": "a", "san": "b"}],
        [{"fingerprint_sha256": "abc"}],
        [["common_name", "a"]],
    ],
)
def test_client_rules_reject(rules):
    with pytest.raises(ValidationError):
        normalize_client_rules(rules)


def test_networks():
    assert normalize_networks(["10.1.2.3/8", "::1"]) == ["10.0.0.0/8", "::1/128"]
    for bad in (["10.0.0.0/33"], ["nope"], "10.0.0.0/8", [1]):
        with pytest.raises(ValidationError):
            normalize_networks(bad)
