"""The worker's configuration contract.

The web side builds a `WorkerConfig` snapshot (``to_dict()`` -> JSON) and the worker loads it
(``WorkerConfig.from_dict``). This module is imported by both, so it uses the standard library
only. Everything is validated once, here, with errors naming the field path.

Worker *settings* (`nbdworker.settings.WorkerSettings`) are deliberately not part of the
snapshot: where images may live and where the worker listens come only from the worker's own
command line and environment, so that a compromised or mistaken snapshot cannot point an export at
an arbitrary host file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from nbdworker.contract.imageidentity import is_identity

__all__ = [
    "MAX_NAME_BYTES",
    "SCHEMA_VERSION",
    "TLS_REQUIRED_MODES",
    "ClientMatch",
    "ConfigError",
    "ExportConfig",
    "Limits",
    "TLSConfig",
    "WorkerConfig",
    "tls_refusal",
]

SCHEMA_VERSION = 1
MAX_NAME_BYTES = 4096
MAX_DESCRIPTION_BYTES = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
MAX_MIN_BLOCK = 65536

BACKENDS = ("file", "memory")
TLS_MODES = ("NOTLS", "OPTIONALTLS", "FORCEDTLS", "SELECTIVETLS")
# The modes that make a client use TLS for a `tls_required` export: SELECTIVETLS refuses it
# before TLS, FORCEDTLS refuses everything before TLS. NOTLS cannot, and OPTIONALTLS never answers
# NBD_REP_ERR_TLS_REQD (it is SELECTIVETLS without TLS-only exports), so under either the export
# would go out in plaintext. The web side imports this to validate with the same rule.
TLS_REQUIRED_MODES = ("SELECTIVETLS", "FORCEDTLS")
CLIENT_VERIFICATION = ("none", "optional", "required")
TLS_VERSIONS = ("1.2", "1.3")
CLIENT_MATCH_KINDS = ("fingerprint_sha256", "common_name", "san")

_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """The configuration is invalid; the message starts with the offending field path."""


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# -- primitive readers --------------------------------------------------------------------------
# Each takes the path for messages. bool is a subclass of int in Python, so integer fields
# reject it explicitly: `"size": true` is a mistake, not 1.


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be an object, not {type(value).__name__}")
    return value


def _check_keys(d: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in d:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise _fail(where, "unknown field")


def _get_int(d: Mapping[str, Any], key: str, path: str, default: Any = ..., minimum: int = 0):
    where = f"{path}.{key}" if path else key
    if key not in d or d[key] is None:
        if default is ...:
            raise _fail(where, "is required")
        return default
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise _fail(where, f"must be >= {minimum}")
    return value


def _get_float(d: Mapping[str, Any], key: str, path: str, default: float) -> float:
    where = f"{path}.{key}" if path else key
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"must be a number, not {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise _fail(where, "must be a positive finite number")
    return float(value)


def _get_bool(d: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"{path}.{key}", f"must be true or false, not {type(value).__name__}")
    return value


def _get_str(
    d: Mapping[str, Any], key: str, path: str, default: Any = ..., allow_none: bool = False
):
    where = f"{path}.{key}" if path else key
    if key not in d or (d[key] is None and not allow_none):
        if default is ...:
            raise _fail(where, "is required")
        return default
    value = d[key]
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, not {type(value).__name__}")
    return value


def _get_choice(d: Mapping[str, Any], key: str, path: str, choices: Sequence[str], default: str):
    value = _get_str(d, key, path, default)
    if value not in choices:
        raise _fail(f"{path}.{key}", f"must be one of {', '.join(choices)}, not {value!r}")
    return value


def _get_list(d: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = d.get(key, [])
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _fail(f"{path}.{key}", f"must be a list, not {type(value).__name__}")
    return list(value)


def _check_nbd_string(value: str, path: str, max_bytes: int, allow_empty: bool = False) -> None:
    encoded = value.encode("utf-8", "surrogatepass")
    if not encoded and not allow_empty:
        raise _fail(path, "must not be empty")
    if len(encoded) > max_bytes:
        raise _fail(path, f"must be at most {max_bytes} bytes of UTF-8, is {len(encoded)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, "must be valid UTF-8 (no lone surrogates)") from None
    for ch in value:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise _fail(path, f"must not contain control characters (found {ord(ch):#04x})")


# -- dataclasses ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientMatch:
    """One rule that admits a TLS client: exactly one of the three keys is set."""

    fingerprint_sha256: str | None = None
    common_name: str | None = None
    san: str | None = None

    @classmethod
    def from_dict(cls, d: Any, path: str) -> ClientMatch:
        d = _mapping(d, path)
        _check_keys(d, CLIENT_MATCH_KINDS, path)
        present = [k for k in CLIENT_MATCH_KINDS if d.get(k) is not None]
        if len(present) != 1:
            raise _fail(path, f"must set exactly one of {', '.join(CLIENT_MATCH_KINDS)}")
        key = present[0]
        value = _get_str(d, key, path)
        if key == "fingerprint_sha256":
            # Accept the common colon-separated, upper-case display form; store it canonically.
            value = value.replace(":", "").lower()
            if not _FINGERPRINT_RE.match(value):
                raise _fail(f"{path}.{key}", "must be 64 hex digits (SHA-256)")
        elif not value:
            raise _fail(f"{path}.{key}", "must not be empty")
        return cls(**{key: value})

    def to_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in CLIENT_MATCH_KINDS if getattr(self, k) is not None}


_EXPORT_BOOL_DEFAULTS = {
    "read_only": False,
    "enabled": True,
    "tls_required": False,
    "flush": True,
    "fua": True,
    "trim": True,
    "write_zeroes": True,
    "fast_zero": True,
    "cache": True,
    "multi_conn": True,
}


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    backend: str = "file"
    path: str | None = None
    size: int | None = None
    description: str = ""
    read_only: bool = False
    enabled: bool = True
    tls_required: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = True
    write_zeroes: bool = True
    fast_zero: bool = True
    cache: bool = True
    multi_conn: bool = True
    min_block_size: int = 1
    preferred_block_size: int = 4096
    max_block_size: int = MAX_PAYLOAD
    max_connections: int = 0
    allowed_clients: tuple[ClientMatch, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    # The image file's identity as nbdweb recorded it (`contract.imageidentity`): the worker
    # serves the file at `path` only if it is that very file. None for an export whose image
    # nbdweb has no record of (made before images were recorded, on a host the migration could
    # not see) and in snapshots of web sides that predate it: then `path` alone, as before.
    image_identity: str | None = None

    @classmethod
    def from_dict(cls, d: Any, path: str) -> ExportConfig:
        d = _mapping(d, path)
        _check_keys(d, [f.name for f in fields(cls)], path)
        name = _get_str(d, "name", path)
        _check_nbd_string(name, f"{path}.name", MAX_NAME_BYTES)
        backend = _get_choice(d, "backend", path, BACKENDS, "file")
        file_path = _get_str(d, "path", path, None, allow_none=True)
        size = _get_int(d, "size", path, None)
        if backend == "file":
            if not file_path:
                raise _fail(f"{path}.path", "is required for the file backend")
            if not os.path.isabs(file_path):
                raise _fail(f"{path}.path", "must be an absolute path")
            if "\0" in file_path:
                raise _fail(f"{path}.path", "must not contain NUL")
            if size is not None:
                raise _fail(
                    f"{path}.size", "must not be set for the file backend (the file's size is used)"
                )
        else:
            if file_path is not None:
                raise _fail(f"{path}.path", "must not be set for the memory backend")
            if size is None:
                raise _fail(f"{path}.size", "is required for the memory backend")
        image_identity = _get_str(d, "image_identity", path, None, allow_none=True)
        if image_identity is not None:
            if backend != "file":
                raise _fail(f"{path}.image_identity", "is only for the file backend")
            if not is_identity(image_identity):
                raise _fail(f"{path}.image_identity", "must be <device>:<inode>:<hex token>")
        description = _get_str(d, "description", path, "")
        _check_nbd_string(description, f"{path}.description", MAX_DESCRIPTION_BYTES, True)
        bools = {k: _get_bool(d, k, path, v) for k, v in _EXPORT_BOOL_DEFAULTS.items()}

        min_bs = _get_int(d, "min_block_size", path, 1, minimum=1)
        if not _is_power_of_2(min_bs) or min_bs > MAX_MIN_BLOCK:
            raise _fail(
                f"{path}.min_block_size", f"must be a power of 2 between 1 and {MAX_MIN_BLOCK}"
            )
        pref_bs = _get_int(d, "preferred_block_size", path, 4096, minimum=1)
        if not _is_power_of_2(pref_bs):
            raise _fail(f"{path}.preferred_block_size", "must be a power of 2")
        if pref_bs < max(min_bs, 512):
            raise _fail(f"{path}.preferred_block_size", "must be >= max(min_block_size, 512)")
        max_bs = _get_int(d, "max_block_size", path, MAX_PAYLOAD, minimum=1)
        if max_bs < pref_bs:
            raise _fail(f"{path}.max_block_size", "must be >= preferred_block_size")
        if max_bs > MAX_PAYLOAD:
            raise _fail(f"{path}.max_block_size", f"must be <= {MAX_PAYLOAD} (32 MiB)")
        if max_bs % min_bs:
            raise _fail(f"{path}.max_block_size", "must be a multiple of min_block_size")
        if size is not None and size % min_bs:
            raise _fail(f"{path}.size", "must be a multiple of min_block_size")
        if bools["fast_zero"] and not bools["write_zeroes"]:
            # The spec forbids advertising SEND_FAST_ZERO without SEND_WRITE_ZEROES; quietly
            # dropping it would hide a config mistake, so refuse.
            raise _fail(f"{path}.fast_zero", "requires write_zeroes")
        max_conn = _get_int(d, "max_connections", path, 0)

        clients = tuple(
            ClientMatch.from_dict(c, f"{path}.allowed_clients[{i}]")
            for i, c in enumerate(_get_list(d, "allowed_clients", path))
        )
        networks = []
        for i, net in enumerate(_get_list(d, "allowed_networks", path)):
            where = f"{path}.allowed_networks[{i}]"
            if not isinstance(net, str):
                raise _fail(where, "must be a string (CIDR)")
            try:
                networks.append(str(ipaddress.ip_network(net, strict=False)))
            except ValueError as exc:
                raise _fail(where, f"is not a valid CIDR network: {exc}") from None
        return cls(
            name=name,
            backend=backend,
            path=file_path,
            size=size,
            description=description,
            min_block_size=min_bs,
            preferred_block_size=pref_bs,
            max_block_size=max_bs,
            max_connections=max_conn,
            allowed_clients=clients,
            allowed_networks=tuple(networks),
            image_identity=image_identity,
            **bools,
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allowed_clients":
                value = [c.to_dict() for c in value]
            elif f.name == "allowed_networks":
                value = list(value)
            elif f.name == "image_identity" and value is None:
                continue  # absent: what web sides before it published
            d[f.name] = value
        return d

    def allows_address(self, address: str | None) -> bool:
        """True when no network rule is set, or the peer IP is inside one of them."""
        if not self.allowed_networks:
            return True
        if address is None:
            # Unix-socket peers have no IP: a network rule cannot admit them.
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in ipaddress.ip_network(n) for n in self.allowed_networks)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    mode: str = "NOTLS"
    certificate_pem: str = ""
    key_pem: str = ""
    ca_pem: str = ""
    client_verification: str = "none"
    min_version: str = "1.2"
    revoked_serials: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Any, path: str = "tls") -> TLSConfig:
        d = _mapping(d, path)
        _check_keys(d, [f.name for f in fields(cls)], path)
        mode = _get_choice(d, "mode", path, TLS_MODES, "NOTLS")
        cert = _get_str(d, "certificate_pem", path, "")
        key = _get_str(d, "key_pem", path, "")
        ca = _get_str(d, "ca_pem", path, "")
        verification = _get_choice(d, "client_verification", path, CLIENT_VERIFICATION, "none")
        min_version = _get_choice(d, "min_version", path, TLS_VERSIONS, "1.2")
        if mode != "NOTLS":
            if "-----BEGIN" not in cert:
                raise _fail(
                    f"{path}.certificate_pem", f"must be a PEM certificate when mode is {mode}"
                )
            if "-----BEGIN" not in key:
                raise _fail(f"{path}.key_pem", f"must be a PEM private key when mode is {mode}")
            if verification != "none" and "-----BEGIN" not in ca:
                raise _fail(f"{path}.ca_pem", "must be a PEM CA bundle when clients are verified")
        serials = []
        for i, serial in enumerate(_get_list(d, "revoked_serials", path)):
            where = f"{path}.revoked_serials[{i}]"
            if not isinstance(serial, str) or not _HEX_RE.match(serial.replace(":", "")):
                raise _fail(where, "must be a hexadecimal serial number")
            serials.append(serial.replace(":", "").lower().lstrip("0") or "0")
        return cls(mode, cert, key, ca, verification, min_version, tuple(serials))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "certificate_pem": self.certificate_pem,
            "key_pem": self.key_pem,
            "ca_pem": self.ca_pem,
            "client_verification": self.client_verification,
            "min_version": self.min_version,
            "revoked_serials": list(self.revoked_serials),
        }


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout: float = 10.0
    max_connections: int = 1024
    # qemu's server stops reading at 16; measurements with fio iodepth 16 and nbdcopy (64 requests
    # of 256 KiB in flight per connection) favour a deeper queue, bounded by memory: 64 x 32 MiB
    # is the worst case a single connection may hold.
    max_inflight_per_connection: int = 64

    @classmethod
    def from_dict(cls, d: Any, path: str = "limits") -> Limits:
        d = _mapping(d, path)
        _check_keys(d, [f.name for f in fields(cls)], path)
        return cls(
            handshake_timeout=_get_float(d, "handshake_timeout", path, 10.0),
            max_connections=_get_int(d, "max_connections", path, 1024, minimum=1),
            max_inflight_per_connection=_get_int(
                d, "max_inflight_per_connection", path, 64, minimum=1
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "handshake_timeout": self.handshake_timeout,
            "max_connections": self.max_connections,
            "max_inflight_per_connection": self.max_inflight_per_connection,
        }


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    version: int = SCHEMA_VERSION
    generation: int = 0
    node: str = "default"
    default_export: str | None = None
    exports: tuple[ExportConfig, ...] = ()
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_dict(cls, d: Any) -> WorkerConfig:
        d = _mapping(d, "config")
        _check_keys(d, [f.name for f in fields(cls)], "")
        version = _get_int(d, "version", "")
        if version != SCHEMA_VERSION:
            raise _fail(
                "version",
                f"unsupported schema version {version} (this worker reads {SCHEMA_VERSION})",
            )
        generation = _get_int(d, "generation", "", 0)
        node = _get_str(d, "node", "", "default")
        _check_nbd_string(node, "node", 255)
        exports = tuple(
            ExportConfig.from_dict(e, f"exports[{i}]")
            for i, e in enumerate(_get_list(d, "exports", ""))
        )
        seen: dict[str, int] = {}
        for i, export in enumerate(exports):
            if export.name in seen:
                raise _fail(f"exports[{i}].name", f"duplicate of exports[{seen[export.name]}].name")
            seen[export.name] = i
        default_export = _get_str(d, "default_export", "", None, allow_none=True)
        if default_export is not None and default_export not in seen:
            raise _fail("default_export", f"names no export: {default_export!r}")
        # A tls_required export under a mode that cannot enforce it is valid here and refused
        # by the worker alone (`tls_refusal`): one such export must not cost the node its whole
        # config, and the web side publishes what older versions let an admin create.
        tls = TLSConfig.from_dict(d.get("tls") or {}, "tls")
        limits = Limits.from_dict(d.get("limits") or {}, "limits")
        return cls(version, generation, node, default_export, exports, tls, limits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "generation": self.generation,
            "node": self.node,
            "default_export": self.default_export,
            "exports": [e.to_dict() for e in self.exports],
            "tls": self.tls.to_dict(),
            "limits": self.limits.to_dict(),
        }

    def export(self, name: str) -> ExportConfig | None:
        """The export a client asked for; "" means the default export."""
        if name == "" and self.default_export is not None:
            name = self.default_export
        for export in self.exports:
            if export.name == name:
                return export
        return None


def tls_refusal(export: ExportConfig, tls_mode: str) -> str | None:
    """Why the worker must not serve `export` under `tls_mode`, or None if it may.

    An export that must only be reached over TLS is refused outright (not served at all, not
    even over TLS) where the mode cannot enforce that: serving it in plaintext would be a silent
    downgrade, and serving it over TLS only would turn the mode into SELECTIVETLS behind the
    admin's back.
    """
    if export.tls_required and tls_mode not in TLS_REQUIRED_MODES:
        return (
            f"tls_required, but the TLS mode {tls_mode} would serve it in plaintext; "
            "use SELECTIVETLS or FORCEDTLS"
        )
    return None
