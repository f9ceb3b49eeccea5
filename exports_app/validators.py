"""Validators shared by the models (and so by the admin and the API serializers).

Each raises django.core.exceptions.ValidationError with a message meant for the person who typed
the value.
"""

import ipaddress
import os
import re
import unicodedata
from pathlib import PurePosixPath

from django.core.exceptions import ValidationError

from exports_app.constants import (
    MAX_DESCRIPTION_BYTES,
    MAX_EXPORT_SIZE,
    MAX_IMAGE_PATH_BYTES,
    MAX_NAME_BYTES,
    SECTOR_SIZE,
)

__all__ = [
    "normalize_client_rules",
    "normalize_networks",
    "parse_ascii_int",
    "parse_listen_address",
    "parse_object_id",
    "parse_size",
    "resolve_image_path",
    "validate_description",
    "validate_listen_address",
    "validate_nbd_name",
    "validate_no_control_characters",
    "validate_node_name",
    "validate_storage_root",
]

# [0-9], not \d: \d also matches Arabic-Indic, Devanagari, full-width... digits, which int() reads.
_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([KMGTPE]?)(?:i?B)?\s*$", re.IGNORECASE)
_ASCII_INT_RE = re.compile(r"-?[0-9]{1,30}")
# The database's largest integer (bigint): an ID beyond it matches nothing and must not reach SQL.
MAX_OBJECT_ID = (1 << 63) - 1
_SIZE_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
CLIENT_RULE_KINDS = ("fingerprint_sha256", "common_name", "san")


def parse_ascii_int(text: str) -> int | None:
    """The integer written in `text` with ASCII digits (and an optional '-'), else None.

    The one place where the web side reads a number from text: int() alone also accepts
    non-ASCII digits ("١٢" is 12), underscores and surrounding whitespace, and str.isdigit() is
    true for "²", which int() then refuses.
    """
    if not isinstance(text, str) or not _ASCII_INT_RE.fullmatch(text):
        return None
    return int(text)


def parse_object_id(text: str) -> int | None:
    """A database ID written as ASCII digits, within the database's integer range, else None."""
    value = parse_ascii_int(text)
    if value is None or not 0 <= value <= MAX_OBJECT_ID:
        return None
    return value


def _has_control_characters(value: str) -> bool:
    # Category Cc covers C0, DEL and C1; NUL is one of them.
    return any(unicodedata.category(ch) == "Cc" for ch in value)


def validate_no_control_characters(value: str) -> None:
    if _has_control_characters(value):
        raise ValidationError("Must not contain NUL or other control characters.", code="control")


def validate_nbd_name(value: str) -> None:
    """An NBD export name: non-empty UTF-8, at most 4096 bytes, no NUL or control characters."""
    if not value:
        raise ValidationError("The name must not be empty.", code="empty")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ValidationError(
            f"The name must be at most {MAX_NAME_BYTES} bytes of UTF-8.", code="too_long"
        )
    if _has_control_characters(value):
        raise ValidationError(
            "The name must not contain NUL or other control characters.", code="control"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("The name must be valid UTF-8.", code="encoding") from None


def validate_description(value: str) -> None:
    """An NBD description: at most 4096 bytes, no NUL (tabs and newlines are fine)."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_DESCRIPTION_BYTES:
        raise ValidationError(
            f"The description must be at most {MAX_DESCRIPTION_BYTES} bytes of UTF-8.",
            code="too_long",
        )
    if any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in value):
        raise ValidationError(
            "The description must not contain NUL or other control characters.", code="control"
        )


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "10G", "512M", "1T", "4096" (binary units).

    The result is > 0, a multiple of 512 and fits a file offset.
    """
    if isinstance(value, bool):
        raise ValidationError("The size must be a number of bytes or a string like '10G'.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValidationError("The size must be a whole number of bytes.")
        value = int(value)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValidationError(
                "The size must be a number of bytes or a number with a binary unit "
                "(K, M, G, T, P), e.g. '10G'."
            )
        digits, unit = match.groups()
        if len(digits) > 30:
            raise ValidationError("The size is too large.")
        size = int(digits) << _SIZE_UNITS[unit.upper()]
    else:
        raise ValidationError("The size must be a number of bytes or a string like '10G'.")
    if size <= 0:
        raise ValidationError("The size must be greater than 0.", code="min_value")
    if size % SECTOR_SIZE:
        raise ValidationError(
            f"The size must be a multiple of {SECTOR_SIZE} bytes.", code="alignment"
        )
    if size > MAX_EXPORT_SIZE:
        raise ValidationError(f"The size must be at most {MAX_EXPORT_SIZE} bytes.", code="max")
    return size


def validate_node_name(value: str) -> None:
    """Node names go into Redis keys and Celery queue names (`node.<name>`): keep them plain."""
    if not _NODE_NAME_RE.match(value):
        raise ValidationError(
            "Use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit."
        )


def parse_listen_address(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port). Raises ValidationError."""
    host, sep, port_text = value.rpartition(":")
    port = parse_ascii_int(port_text)
    if not sep or not host or port is None or port_text.startswith("-"):
        raise ValidationError("Use host:port, e.g. 127.0.0.1:10809 or [::1]:10809.")
    if not 1 <= port <= 65535:
        raise ValidationError("The port must be between 1 and 65535.")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValidationError("An IPv6 address must be written in brackets: [::1]:10809.")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValidationError("The bracketed host must be an IPv6 address.") from None
    elif ":" in host:
        raise ValidationError("An IPv6 address must be written in brackets: [::1]:10809.")
    elif _has_control_characters(host) or " " in host or "/" in host:
        raise ValidationError("The host is not a valid host name or address.")
    return host, port


def validate_listen_address(value: str) -> None:
    parse_listen_address(value)


def validate_storage_root(value: str) -> None:
    if not value or not os.path.isabs(value):
        raise ValidationError("The storage root must be an absolute path.")
    if "\0" in value:
        raise ValidationError("The storage root must not contain NUL.")


def resolve_image_path(storage_root: str, relative_path: str) -> str:
    """The absolute image path for `relative_path` under `storage_root`, or ValidationError.

    Refuses absolute paths, `..` components and symbolic links (in the path as it exists on this
    host) that lead outside the root.
    """
    if not relative_path:
        raise ValidationError("The image path must not be empty.")
    if len(relative_path.encode("utf-8", "surrogatepass")) > MAX_IMAGE_PATH_BYTES:
        raise ValidationError(f"The image path must be at most {MAX_IMAGE_PATH_BYTES} bytes.")
    if _has_control_characters(relative_path):
        raise ValidationError("The image path must not contain NUL or control characters.")
    pure = PurePosixPath(relative_path)
    if pure.is_absolute():
        raise ValidationError("The image path must be relative to the node's storage root.")
    if ".." in pure.parts:
        raise ValidationError("The image path must not contain '..'.")
    if relative_path.endswith("/") or not pure.parts or pure.parts == (".",):
        raise ValidationError("The image path must name a file.")
    root = os.path.realpath(storage_root)
    candidate = os.path.realpath(os.path.join(root, *pure.parts))
    if os.path.commonpath([root, candidate]) != root or candidate == root:
        raise ValidationError("The image path leads outside the node's storage root.")
    return os.path.join(storage_root, *pure.parts)


def normalize_client_rules(value: object) -> list[dict[str, str]]:
    """Allowed TLS client identities, each exactly one of fingerprint_sha256, common_name, san.

    Same shape as nbdworker.contract.config.ClientMatch; fingerprints are stored lower-case, no
    colons.
    """
    if not isinstance(value, list):
        raise ValidationError("Must be a list of objects like {'common_name': 'alice'}.")
    rules = []
    for index, rule in enumerate(value):
        if not isinstance(rule, dict) or len(rule) != 1:
            raise ValidationError(
                f"Item {index}: must set exactly one of {', '.join(CLIENT_RULE_KINDS)}."
            )
        ((kind, text),) = rule.items()
        if kind not in CLIENT_RULE_KINDS:
            raise ValidationError(
                f"Item {index}: unknown key {kind!r}; use one of {', '.join(CLIENT_RULE_KINDS)}."
            )
        if not isinstance(text, str) or not text or _has_control_characters(text):
            raise ValidationError(f"Item {index}: {kind} must be a non-empty string.")
        if kind == "fingerprint_sha256":
            text = text.replace(":", "").lower()
            if not _FINGERPRINT_RE.match(text):
                raise ValidationError(f"Item {index}: fingerprint_sha256 must be 64 hex digits.")
        rules.append({kind: text})
    return rules


def normalize_networks(value: object) -> list[str]:
    """Allowed client networks as canonical CIDR strings."""
    if not isinstance(value, list):
        raise ValidationError("Must be a list of CIDR networks, e.g. ['10.0.0.0/8'].")
    networks = []
    for index, network in enumerate(value):
        if not isinstance(network, str):
            raise ValidationError(f"Item {index}: must be a CIDR string.")
        try:
            networks.append(str(ipaddress.ip_network(network, strict=False)))
        except ValueError as exc:
            raise ValidationError(f"Item {index}: {exc}") from None
    return networks
