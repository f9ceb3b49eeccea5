"""nbd-client (the reference client) listing exports."""

from __future__ import annotations

import pytest

from tests.interop.conftest import run

pytestmark = pytest.mark.interop


def test_nbd_client_list(served):
    result = run("nbd-client", "-l", served.worker.host, str(served.worker.port))
    lines = result.stdout.splitlines()
    assert "disk: sparse disk" in lines
    assert "ro" in lines
    assert "mem" in lines
