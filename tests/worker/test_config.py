"""nbdworker.contract.config: the versioned, validated configuration contract."""

from __future__ import annotations

import json

import pytest

from nbdworker.contract.config import (
    SCHEMA_VERSION,
    ConfigError,
    ExportConfig,
    Limits,
    TLSConfig,
    WorkerConfig,
    tls_refusal,
)

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


def base(**top) -> dict:
    d = {
        "version": 1,
        "generation": 7,
        "node": "n1",
        "exports": [
            {"name": "disk", "backend": "file", "path": "/srv/images/disk.img"},
            {"name": "ram", "backend": "memory", "size": 1 << 20},
        ],
    }
    d.update(top)
    return d


def with_export(**fields) -> dict:
    export = {"name": "x", "backend": "memory", "size": 1 << 20, **fields}
    return base(exports=[export])


def test_minimal_config_defaults():
    cfg = WorkerConfig.from_dict({"version": SCHEMA_VERSION})
    assert cfg.exports == ()
    assert cfg.tls.mode == "NOTLS"
    assert cfg.limits == Limits()
    assert cfg.default_export is None


def test_export_defaults():
    e = WorkerConfig.from_dict(base()).exports[0]
    assert (e.flush, e.fua, e.trim, e.write_zeroes, e.fast_zero, e.cache, e.multi_conn) == (
        True,
    ) * 7
    assert (e.read_only, e.tls_required, e.enabled) == (False, False, True)
    assert (e.min_block_size, e.preferred_block_size, e.max_block_size) == (1, 4096, 32 << 20)
    assert e.max_connections == 0


def full_config() -> dict:
    return base(
        default_export="disk",
        exports=[
            {
                "name": "disk",
                "backend": "file",
                "path": "/srv/images/disk.img",
                "description": "the disk",
                "read_only": True,
                "tls_required": True,
                "fast_zero": False,
                "min_block_size": 512,
                "preferred_block_size": 65536,
                "max_block_size": 1 << 20,
                "max_connections": 3,
                "allowed_clients": [
                    {"fingerprint_sha256": "AB:" * 31 + "CD"},
                    {"common_name": "client1"},
                    {"san": "DNS:host.example"},
                ],
                "allowed_networks": ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"],
            },
            {"name": "ünïcode ram", "backend": "memory", "size": 4096, "enabled": False},
        ],
        tls={
            "mode": "SELECTIVETLS",
            "certificate_pem": PEM_CERT,
            "key_pem": PEM_KEY,
            "ca_pem": PEM_CERT,
            "client_verification": "required",
            "min_version": "1.3",
            "revoked_serials": ["0A:bc", "123"],
        },
        limits={"handshake_timeout": 2.5, "max_connections": 10, "max_inflight_per_connection": 8},
    )


def test_round_trip_through_json():
    cfg = WorkerConfig.from_dict(full_config())
    text = json.dumps(cfg.to_dict())
    again = WorkerConfig.from_dict(json.loads(text))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_values_are_normalised():
    cfg = WorkerConfig.from_dict(full_config())
    disk = cfg.exports[0]
    assert disk.allowed_clients[0].fingerprint_sha256 == "ab" * 31 + "cd"
    assert disk.allowed_networks == ("10.0.0.0/8", "2001:db8::/32", "192.168.1.7/32")
    assert cfg.tls.revoked_serials == ("abc", "123")


def test_lookup_default_export():
    cfg = WorkerConfig.from_dict(base(default_export="ram"))
    assert cfg.export("").name == "ram"
    assert cfg.export("disk").name == "disk"
    assert cfg.export("nope") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "version: is required"),
        ({"version": 2}, "version: unsupported schema version 2"),
        ({"version": "1"}, "version: must be an integer"),
        (base(extra=1), "extra: unknown field"),
        (base(generation=-1), "generation: must be >= 0"),
        (base(generation=True), "generation: must be an integer"),
        (base(exports={}), "exports: must be a list"),
        (base(default_export="nope"), "default_export: names no export"),
        (base(node=""), "node: must not be empty"),
        (with_export(name=""), "exports[0].name: must not be empty"),
        (with_export(name="a\0b"), "exports[0].name: must not contain control characters"),
        (with_export(name="a\nb"), "exports[0].name: must not contain control characters"),
        (with_export(name="é" * 2049), "exports[0].name: must be at most 4096 bytes"),
        (with_export(name=5), "exports[0].name: must be a string"),
        (with_export(backend="nfs"), "exports[0].backend: must be one of file, memory"),
        (with_export(size=None), "exports[0].size: is required for the memory backend"),
        (with_export(path="/x"), "exports[0].path: must not be set for the memory backend"),
        (with_export(size=-1), "exports[0].size: must be >= 0"),
        (with_export(read_only="yes"), "exports[0].read_only: must be true or false"),
        (with_export(min_block_size=3), "exports[0].min_block_size: must be a power of 2"),
        (with_export(min_block_size=131072), "exports[0].min_block_size: must be a power of 2"),
        (with_export(preferred_block_size=256), "exports[0].preferred_block_size: must be >="),
        (
            with_export(preferred_block_size=5000),
            "exports[0].preferred_block_size: must be a power",
        ),
        (with_export(max_block_size=1024), "exports[0].max_block_size: must be >= preferred"),
        (with_export(max_block_size=(32 << 20) + 4096), "exports[0].max_block_size: must be <="),
        (with_export(size=1000, min_block_size=512), "exports[0].size: must be a multiple"),
        (with_export(write_zeroes=False), "exports[0].fast_zero: requires write_zeroes"),
        (with_export(max_connections=-1), "exports[0].max_connections: must be >= 0"),
        (with_export(allowed_networks=["10.0.0.0/33"]), "exports[0].allowed_networks[0]:"),
        (with_export(allowed_networks="10.0.0.0/8"), "exports[0].allowed_networks: must be a list"),
        (with_export(allowed_clients=[{}]), "exports[0].allowed_clients[0]: must set exactly one"),
        (
            with_export(allowed_clients=[{"common_name": "a", "san": "b"}]),
            "exports[0].allowed_clients[0]: must set exactly one",
        ),
        (
            with_export(allowed_clients=[{"fingerprint_sha256": "abc"}]),
            "exports[0].allowed_clients[0].fingerprint_sha256: must be 64 hex digits",
        ),
        (with_export(colour="red"), "exports[0].colour: unknown field"),
        (
            base(exports=[{"name": "d", "backend": "file", "path": "rel/x.img"}]),
            "exports[0].path: must be an absolute path",
        ),
        (base(exports=[{"name": "d", "backend": "file"}]), "exports[0].path: is required"),
        (
            base(exports=[{"name": "d", "backend": "file", "path": "/a", "size": 5}]),
            "exports[0].size: must not be set for the file backend",
        ),
        (
            base(exports=[{"name": "a", "backend": "memory", "size": 1}] * 3),
            "exports[1].name: duplicate of exports[0].name",
        ),
        (base(tls={"mode": "TLS"}), "tls.mode: must be one of"),
        (base(tls={"mode": "FORCEDTLS"}), "tls.certificate_pem: must be a PEM certificate"),
        (
            base(tls={"mode": "FORCEDTLS", "certificate_pem": PEM_CERT}),
            "tls.key_pem: must be a PEM private key",
        ),
        (
            base(
                tls={
                    "mode": "FORCEDTLS",
                    "certificate_pem": PEM_CERT,
                    "key_pem": PEM_KEY,
                    "client_verification": "required",
                }
            ),
            "tls.ca_pem: must be a PEM CA bundle",
        ),
        (base(tls={"min_version": "1.1"}), "tls.min_version: must be one of 1.2, 1.3"),
        (base(tls={"revoked_serials": ["xyz"]}), "tls.revoked_serials[0]: must be a hexadecimal"),
        (base(limits={"handshake_timeout": 0}), "limits.handshake_timeout: must be a positive"),
        (base(limits={"handshake_timeout": "5"}), "limits.handshake_timeout: must be a number"),
        (base(limits={"max_connections": 0}), "limits.max_connections: must be >= 1"),
        (
            base(limits={"max_inflight_per_connection": 0}),
            "limits.max_inflight_per_connection: must be >= 1",
        ),
        (base(limits={"speed": 1}), "limits.speed: unknown field"),
        (base(exports=[5]), "exports[0]: must be an object"),
    ],
)
def test_invalid_configs_name_the_field(data, message):
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_dict(data)
    assert message in str(info.value)


def test_second_export_error_names_its_index():
    data = base()
    data["exports"].append({"name": "z", "backend": "memory", "size": 4096, "min_block_size": 6})
    with pytest.raises(ConfigError, match=r"^exports\[2\]\.min_block_size: must be a power of 2"):
        WorkerConfig.from_dict(data)


TLS_POLICY = {"certificate_pem": PEM_CERT, "key_pem": PEM_KEY}


@pytest.mark.parametrize("mode", ["NOTLS", "OPTIONALTLS"])
def test_tls_required_under_a_mode_that_cannot_enforce_it_is_valid_config(mode):
    # The export alone is refused, by the worker (tls_refusal); the rest of the config applies.
    tls = {"mode": mode, **(TLS_POLICY if mode != "NOTLS" else {})}
    data = base(tls=tls)
    data["exports"].append(
        {"name": "secret", "backend": "memory", "size": 4096, "tls_required": True}
    )
    cfg = WorkerConfig.from_dict(data)
    assert [e.name for e in cfg.exports] == ["disk", "ram", "secret"]


@pytest.mark.parametrize(
    ("mode", "tls_required", "refused"),
    [
        ("NOTLS", False, False),
        ("NOTLS", True, True),
        ("OPTIONALTLS", False, False),
        ("OPTIONALTLS", True, True),
        ("FORCEDTLS", False, False),
        ("FORCEDTLS", True, False),
        ("SELECTIVETLS", False, False),
        ("SELECTIVETLS", True, False),
    ],
)
def test_tls_refusal(mode, tls_required, refused):
    export = ExportConfig(name="x", backend="memory", size=512, tls_required=tls_required)
    reason = tls_refusal(export, mode)
    assert (reason is not None) == refused
    if refused:
        assert mode in reason
        assert "use SELECTIVETLS or FORCEDTLS" in reason


def test_tls_config_defaults_are_notls():
    assert TLSConfig.from_dict({}) == TLSConfig()


def test_export_allows_address():
    e = ExportConfig.from_dict(
        {
            "name": "a",
            "backend": "memory",
            "size": 512,
            "allowed_networks": ["10.1.0.0/16", "::1/128"],
        },
        "e",
    )
    assert e.allows_address("10.1.2.3")
    assert e.allows_address("::ffff:10.1.2.3")
    assert e.allows_address("::1")
    assert not e.allows_address("10.2.0.1")
    assert not e.allows_address(None)
    open_export = ExportConfig.from_dict({"name": "b", "backend": "memory", "size": 512}, "e")
    assert open_export.allows_address(None)
