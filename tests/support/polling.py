"""Waiting for a condition in tests: a poll with a deadline, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

__all__ = ["poll"]

T = TypeVar("T")


def poll(predicate: Callable[[], T], what: str = "condition", timeout: float = 10.0) -> T:
    """Call `predicate` every 20 ms until it returns a true value, and return that value; fail
    the test, naming `what`, if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
