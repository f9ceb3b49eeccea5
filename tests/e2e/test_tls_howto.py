"""docs/tls-howto.md is true: its fenced `sh` blocks run, in order, in one bash (`set -e`)
against `make run`'s live stack, from a certificate authority to a FORCEDTLS export that
qemu-img, nbdinfo and nbd-client reach with a client bundle, until the revocation cuts the
client off. A block that fails fails the test with the block and its output."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.livestack import RunningStack, running_stack
from tests.support.tools import require_tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
HOWTO = ROOT / "docs" / "tls-howto.md"


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", markdown, flags=re.S | re.M)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("howto-stack")) as running:
        yield running


def test_the_howto_has_the_steps_it_promises() -> None:
    text = HOWTO.read_text()
    blocks = "\n".join(shell_blocks(text))
    for command in ("authorities/", "certs issue", "FORCEDTLS", "exports create", "certs bundle",
                    "qemu-img info", "nbdinfo", "nbd-client", "certs revoke"):  # fmt: skip
        assert command in blocks, command


def test_every_shell_block_of_the_howto_runs(stack: RunningStack, tmp_path: Path) -> None:
    for tool in ("curl", "jq", "qemu-img", "nbdinfo", "nbd-client"):
        require_tool(tool)
    blocks = shell_blocks(HOWTO.read_text())
    env = dict(stack.env)
    env.update(
        NBDWEB_URL=stack.url,
        NBD_PORT=str(stack.nbd_port),
        # /usr/bin first (nbdinfo and nbdsh need Debian's python3-libnbd); the venv's nbdweb.
        PATH=f"/usr/bin:/usr/sbin:{os.environ.get('PATH', '')}",
    )
    workdir = tmp_path / "reader"
    workdir.mkdir()
    # The reader's shell: the checkout as the working directory for the first block (manage.py,
    # .venv), then a scratch directory for the files the walk-through makes.
    script = ["set -euo pipefail", f"cd {ROOT}"]
    for number, block in enumerate(blocks):
        script.append(f"echo '=== block {number}'")
        script.append(block)
        if number == 0:
            script.append(f"cd {workdir}")
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    failed_at = re.findall(r"=== block (\d+)", result.stdout)
    assert result.returncode == 0, (
        f"block {failed_at[-1] if failed_at else '?'} failed ({result.returncode}):\n"
        f"{blocks[int(failed_at[-1])] if failed_at else ''}\n--- stdout\n{result.stdout[-4000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}"
    )
    assert "alice is refused" in result.stdout
    # nbd-client listed the export over TLS (its block printed the export's name).
    listing = next(n for n, block in enumerate(blocks) if "nbd-client -l" in block)
    printed = result.stdout.split(f"=== block {listing}\n")[1].split("=== block")[0]
    assert "secure" in printed.split(), printed
    assert (workdir / "nbd-tls" / "client-key.pem").stat().st_mode & 0o077 == 0
