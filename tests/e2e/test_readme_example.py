"""The README's Example is true: its `sh` block runs as a newcomer would paste it (`make run`
in the background, the wait for its ready line, a token, an export made with curl), and qemu-img
and nbdinfo read the export. Only its addresses and the log's path are this test's own."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.livestack import ROOT, stack_env
from tests.support.polling import poll
from tests.support.tools import require_tool

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
# A first `make run` may install the requirements before it starts anything.
SCRIPT_TIMEOUT = 280


def example_block() -> str:
    section = README.read_text().split("\n## Example\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, "the Example section should hold one sh block"
    return blocks[0]


def test_the_example_starts_the_stack_and_serves_an_export(tmp_path: Path) -> None:
    for tool in ("make", "curl", "qemu-img", "nbdinfo"):
        require_tool(tool)
    env = stack_env(tmp_path / "data", {"GUNICORN_WORKERS": "1", "NBDWORKER_WORKERS": "1"})
    http, nbd = env["NBDWEB_HTTP_ADDR"], env["NBD_LISTEN"]
    log = tmp_path / "run.log"
    block = example_block()
    for default in ("127.0.0.1:8000", "127.0.0.1:10809", "run.log"):
        assert default in block, default
    script = (
        block.replace("127.0.0.1:8000", http)
        .replace("127.0.0.1:10809", nbd)
        .replace("run.log", str(log))
    )
    # Debian's NBD clients first (nbdinfo needs /usr/bin/python3's libnbd).
    env["PATH"] = f"/usr/bin:/usr/sbin:{os.environ.get('PATH', '')}"
    # Its own process group: `make run` outlives the script in the background, as in a shell.
    proc = subprocess.Popen(
        ["bash", "-c", "set -eu\n" + script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT)
        ran = log.read_text() if log.exists() else ""
        assert proc.returncode == 0, (
            f"the Example failed ({proc.returncode}):\n--- stdout\n{out[-3000:]}\n"
            f"--- stderr\n{err[-3000:]}\n--- run.log\n{ran[-4000:]}"
        )
    finally:
        _stop_group(proc.pid)
    # The one ready line names what the README says it names.
    ready = [line for line in ran.splitlines() if line.startswith("[runstack] ready:")]
    assert len(ready) == 1, ran[-3000:]
    for part in (
        f"admin http://{http}/admin/",
        f"API http://{http}/api/v1/",
        f"API docs http://{http}/api/docs/",
        f"NBD {nbd}",
        "CLI ",
    ):
        assert part in ready[0], (part, ready[0])
    # qemu-img and nbdinfo read the 1G export the curl line asked for.
    assert "virtual size: 1 GiB (1073741824 bytes)" in out, out
    assert "export-size: 1073741824" in out, out


def _stop_group(pgid: int) -> None:
    """SIGTERM to make run and its stack (runstack stops its children), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)

    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        poll(gone, "make run to stop", timeout=60)
    finally:
        if not gone():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
