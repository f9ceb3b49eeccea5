"""What the Django admin's forms post, for tests that drive the admin with the test client."""

from __future__ import annotations

from typing import Any

__all__ = ["export_add_form"]


def export_add_form(node_pk: int, name: str = "admin-disk", **fields: Any) -> dict[str, Any]:
    """The export add form as a browser posts it with the defaults left alone (checkboxes
    that are ticked post "on", unticked ones are absent); `fields` override or add."""
    data: dict[str, Any] = {
        "node": node_pk,
        "name": name,
        "size": "1G",
        "description": "",
        "image_path": "",
        "enabled": "on",
        # The structured editors: rows of (identity kind, value), one network per line.
        "allowed_clients_kind": ["", ""],
        "allowed_clients_value": ["", ""],
        "allowed_networks": "",
        "flush": "on",
        "fua": "on",
        "trim": "on",
        "write_zeroes": "on",
        "fast_zero": "on",
        "cache": "on",
        "multi_conn": "on",
        "min_block_size": 1,
        "preferred_block_size": 4096,
        "max_block_size": 32 << 20,
        "max_connections": 0,
    }
    data.update(fields)
    return data
