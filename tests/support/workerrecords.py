"""What a node's worker writes to Redis, signed with its node key as nbdworker/status.py does,
for web tests that play the worker (exports_app/services/workerstatus.py believes nothing
else)."""

from __future__ import annotations

from typing import Any

from exports_app.services.nodekeys import node_key
from nbdworker.contract.statusrecord import HEARTBEAT, SESSION, sign_record

__all__ = ["heartbeat_record", "session_record"]


def heartbeat_record(node: str, body: dict[str, Any]) -> str:
    return sign_record(node_key(node), node, HEARTBEAT, body)


def session_record(node: str, body: dict[str, Any]) -> str:
    return sign_record(node_key(node), node, SESSION, body)
