"""The `nbdweb` command-line client against the running stack (`make run`'s
scripts/runstack.py: gunicorn, Celery, beat, nbdworker, a private Redis): exports from create
to delete with jobs watched to their end, a job that fails and makes `jobs watch` exit 1,
certificates issued, bundled and revoked, sessions, and where the URL and token come from.

The commands run as `python -m nbdweb_cli` from this checkout; one test checks that the
installed `nbdweb` console script is that same program.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.livestack import RunningStack, running_stack
from tests.support.polling import poll
from tests.support.tools import client_env, require_tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("cli-stack")) as running:
        yield running


def nbdweb(
    stack: RunningStack, *args: str, env: dict[str, str] | None = None, token: bool = True
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NBDWEB_")}
    full_env["NBDWEB_CLI_CONFIG"] = "/nonexistent/cli.toml"
    if token:
        full_env.update(NBDWEB_URL=stack.url, NBDWEB_TOKEN=stack.token)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "nbdweb_cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def test_exports_from_create_to_delete(stack: RunningStack) -> None:
    created = ok(nbdweb(stack, "--json", "exports", "create", "disk1", "--size", "1M", "--wait"))
    export = json.loads(created.stdout)
    assert export["state"] == "ready" and export["size"] == 1 << 20
    # The watched job drew its bar on stderr and ended at 100%.
    assert "100%" in created.stderr and "succeeded" in created.stderr

    listed = json.loads(ok(nbdweb(stack, "--json", "exports", "list")).stdout)
    assert [(e["name"], e["state"]) for e in listed] == [("disk1", "ready")]
    table = ok(nbdweb(stack, "exports", "list")).stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "NAME", "NODE", "SIZE", "STATE"]
    assert "disk1" in table[1] and "1.0 MiB" in table[1] and "ready" in table[1]

    shown = ok(nbdweb(stack, "exports", "show", "disk1")).stdout
    assert "uri " in shown and export["uri"] in shown

    resized = ok(nbdweb(stack, "--json", "exports", "resize", "disk1", "2M", "--wait"))
    assert json.loads(resized.stdout)["size"] == 2 << 20
    nbdinfo = require_tool("nbdinfo")
    info = subprocess.run(
        [nbdinfo, "--size", export["uri"]], capture_output=True, text=True, env=client_env(),
        timeout=30,
    )  # fmt: skip
    assert info.stdout.strip() == str(2 << 20), info.stderr

    clone = ok(nbdweb(stack, "--json", "exports", "clone", "disk1", "disk2", "--wait"))
    assert json.loads(clone.stdout)["state"] == "ready"

    deleted = ok(nbdweb(stack, "exports", "delete", "disk2", "--wipe"))
    assert "being deleted" in deleted.stdout

    def gone() -> bool:
        names = [e["name"] for e in json.loads(nbdweb(stack, "--json", "exports", "list").stdout)]
        return names == ["disk1"]

    poll(gone, "disk2 deleted", timeout=60)


def test_a_failed_job_makes_watch_exit_non_zero(stack: RunningStack) -> None:
    # A directory where the image should go: the create job cannot make the file.
    (stack.images / "blocked.img").mkdir(parents=True)
    created = nbdweb(stack, "--json", "exports", "create", "blocked", "--size", "1M", "--wait")
    assert created.returncode == 1, (created.stdout, created.stderr)
    assert "failed" in created.stderr
    job = stack.api("GET", "jobs/?export_name=blocked")["results"][0]
    watched = nbdweb(stack, "jobs", "watch", str(job["id"]))
    assert watched.returncode == 1
    assert f"job {job['id']} failed" in watched.stderr
    assert "state" in watched.stdout and "failed" in watched.stdout


def test_certificates_issue_bundle_revoke(stack: RunningStack, tmp_path: Path) -> None:
    stack.api("POST", "authorities/", {"name": "cli-ca", "common_name": "CLI test CA"})
    issued = ok(nbdweb(stack, "--json", "certs", "issue", "alice", "--authority", "cli-ca"))
    certificate = json.loads(issued.stdout)
    assert certificate["common_name"] == "alice" and certificate["kind"] == "client"

    target = tmp_path / "alice.tar.gz"
    ok(nbdweb(stack, "certs", "bundle", "alice", "-o", str(target)))
    assert target.stat().st_mode & 0o777 == 0o600
    with tarfile.open(target) as bundle:
        names = {Path(n).name for n in bundle.getnames()}
    assert {"ca-cert.pem", "client-cert.pem", "client-key.pem"} <= names

    revoked = ok(nbdweb(stack, "--json", "certs", "revoke", "alice", "--reason", "left"))
    assert json.loads(revoked.stdout)["revoked_at"]
    again = nbdweb(stack, "certs", "revoke", "no-such-cert")
    assert again.returncode == 1 and "no certificate named 'no-such-cert'" in again.stderr


def test_sessions_list_and_kick(stack: RunningStack) -> None:
    assert json.loads(ok(nbdweb(stack, "--json", "sessions", "list")).stdout) == []
    assert "(none)" in ok(nbdweb(stack, "sessions", "list")).stdout
    kicked = nbdweb(stack, "sessions", "kick", "abc123")
    assert kicked.returncode == 1 and "HTTP 404" in kicked.stderr


def test_url_and_token_from_flags_environment_or_config_file(stack, tmp_path: Path) -> None:
    missing = nbdweb(stack, "exports", "list", token=False)
    assert missing.returncode == 2 and "no API token" in missing.stderr

    flags = nbdweb(stack, "--url", stack.url, "--token", stack.token, "--json", "exports", "list",
                   token=False)  # fmt: skip
    assert flags.returncode == 0, flags.stderr

    config = tmp_path / "cli.toml"
    config.write_text(f'url = "{stack.url}"\ntoken = "{stack.token}"\n')
    config.chmod(0o644)
    loose = nbdweb(stack, "exports", "list", token=False, env={"NBDWEB_CLI_CONFIG": str(config)})
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    config.chmod(0o600)
    ok(nbdweb(stack, "exports", "list", token=False, env={"NBDWEB_CLI_CONFIG": str(config)}))

    wrong = nbdweb(stack, "exports", "list", env={"NBDWEB_TOKEN": "nbdweb_wrong"})
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr


def test_the_installed_console_script_is_this_cli() -> None:
    script = shutil.which("nbdweb", path=str(Path(sys.executable).parent))
    assert script, "the `nbdweb` console script is not installed: `make venv` installs it"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("exports", "certs", "sessions", "jobs"):
        assert command in result.stdout
