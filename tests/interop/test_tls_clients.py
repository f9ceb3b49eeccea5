"""Real TLS clients against the worker in every TLS mode: qemu-img / qemu-io with a
``tls-creds-x509`` object, and libnbd (nbdinfo, nbdcopy, nbdsh) with ``nbds://`` URIs and
``set_tls``. Data written by one client is read back by another and compared.

The client credentials are files in a directory per client (see tests/support/pki.py); libnbd is
always given that directory explicitly (as root it would otherwise look in /etc/pki/libnbd).
"""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import run
from tests.support.pki import PKI, make_pki
from tests.support.tlsprobe import EXPORT_SIZE, MODES, wait_for_line, worker_config
from tests.support.worker import RunningWorker, run_worker

pytestmark = pytest.mark.interop

TLS_MODES = [m for m in MODES if m != "NOTLS"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def workers(
    pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningWorker]]:
    base = tmp_path_factory.mktemp("workers")
    with contextlib.ExitStack() as stack:
        yield {
            mode: stack.enter_context(run_worker(worker_config(pki, mode), workdir=base / mode))
            for mode in MODES
        }


# -- client command lines -------------------------------------------------------------------------


def qemu_object(creds: Path | None) -> list[str]:
    if creds is None:
        return []
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}"]


def qemu_image(worker: RunningWorker, export: str, creds: Path | None) -> str:
    """The ``--image-opts`` string for `export`, over TLS with `creds` unless None."""
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={worker.port}"
    opts += f",export={export}"
    return opts + (",tls-creds=tls0" if creds is not None else "")


def qemu_opts(worker: RunningWorker, export: str, creds: Path | None) -> list[str]:
    """qemu-img / qemu-io arguments opening `export` as the source image."""
    return [*qemu_object(creds), "--image-opts", qemu_image(worker, export, creds)]


def qemu_io(worker: RunningWorker, export: str, creds: Path | None, *commands: str) -> str:
    args = []
    for c in commands:
        args += ["-c", c]
    result = run("qemu-io", *qemu_opts(worker, export, creds), *args)
    out = result.stdout + result.stderr
    # qemu-io reports failed commands but still exits 0.
    assert "error" not in out.lower() and "fail" not in out.lower(), out
    return out


def nbds(worker: RunningWorker, export: str, creds: Path) -> str:
    return f"nbds://127.0.0.1:{worker.port}/{export}?tls-certificates={creds}"


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def export_for(mode: str) -> str:
    # SELECTIVETLS: the TLS-only export; elsewhere it is served over TLS like any other.
    return "secret" if mode != "OPTIONALTLS" else "plain"


# -- data round trips in every TLS mode -----------------------------------------------------------


@pytest.mark.parametrize("mode", TLS_MODES)
def test_qemu_img_writes_and_nbdcopy_reads_back(
    workers: dict[str, RunningWorker], pki: PKI, tmp_path: Path, mode: str
) -> None:
    worker, export, creds = workers[mode], export_for(mode), pki.client_dir("alice")
    src = random_file(tmp_path / "src.img", 2 * MiB)
    run(
        "qemu-img",
        "convert",
        *qemu_object(creds),
        "-n",
        "-f",
        "raw",
        "--target-image-opts",
        str(tmp_path / "src.img"),
        qemu_image(worker, export, creds),
    )
    run("nbdcopy", nbds(worker, export, creds), str(tmp_path / "back.img"))
    back = (tmp_path / "back.img").read_bytes()
    assert len(back) == EXPORT_SIZE
    assert back[: len(src)] == src


@pytest.mark.parametrize("mode", TLS_MODES)
def test_nbdcopy_writes_and_qemu_img_reads_back(
    workers: dict[str, RunningWorker], pki: PKI, tmp_path: Path, mode: str
) -> None:
    worker, export, creds = workers[mode], export_for(mode), pki.client_dir("alice")
    src = random_file(tmp_path / "src.img", EXPORT_SIZE)
    # Several connections at once (nbdcopy's default for multi-conn exports).
    run("nbdcopy", "--connections=4", str(tmp_path / "src.img"), nbds(worker, export, creds))
    run(
        "qemu-img",
        "convert",
        *qemu_opts(worker, export, creds),
        "-O",
        "raw",
        str(tmp_path / "back.img"),
    )
    assert (tmp_path / "back.img").read_bytes() == src


def test_pipelined_writes_across_the_receive_buffer_over_tls(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    # Two writes sent back to back: the second one's 3 MiB payload runs past the end of the
    # 4 MiB receive buffer and is streamed to the image, out of 16 KiB TLS records.
    worker, creds = workers["FORCEDTLS"], pki.client_dir("alice")
    script = textwrap.dedent(
        f"""
        import os
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates({str(creds)!r})
        h.set_export_name({export_for("FORCEDTLS")!r})
        h.connect_tcp("127.0.0.1", "{worker.port}")
        first, second = os.urandom(1 << 20), os.urandom(3 << 20)
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(first), 0),
                   h.aio_pwrite(nbd.Buffer.from_bytearray(second), 1 << 20,
                                flags=nbd.CMD_FLAG_FUA)]
        while cookies:
            cookies = [c for c in cookies if not h.aio_command_completed(c)]
            if cookies:
                h.poll(-1)
        assert h.pread(4 << 20, 0) == first + second
        h.shutdown()
        print("ok")
        """
    )
    assert run("nbdsh", "-c", script).stdout.strip() == "ok"


@pytest.mark.parametrize("mode", TLS_MODES)
def test_qemu_io_writes_a_pattern_that_libnbd_reads(
    workers: dict[str, RunningWorker], pki: PKI, tmp_path: Path, mode: str
) -> None:
    worker, export, creds = workers[mode], export_for(mode), pki.client_dir("bob")
    offset = 3 * MiB
    qemu_io(worker, export, creds, f"write -P 0xa7 {offset} 64k", f"read -P 0xa7 {offset} 64k")
    script = textwrap.dedent(
        f"""
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates({str(creds)!r})
        h.set_export_name({export!r})
        h.connect_tcp("127.0.0.1", "{worker.port}")
        assert h.get_tls_negotiated()
        assert h.pread(65536, {offset}) == b"\\xa7" * 65536
        h.shutdown()
        print("ok")
        """
    )
    assert run("nbdsh", "-c", script).stdout.strip() == "ok"


@pytest.mark.parametrize("mode", TLS_MODES)
def test_nbdsh_set_tls_writes_and_qemu_io_verifies(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    worker, export, creds = workers[mode], export_for(mode), pki.client_dir("alice")
    offset = MiB + 4096
    script = textwrap.dedent(
        f"""
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates({str(creds)!r})
        h.set_export_name({export!r})
        h.connect_tcp("127.0.0.1", "{worker.port}")
        h.pwrite(b"\\x3c" * 131072, {offset}, nbd.CMD_FLAG_FUA)
        assert h.pread(131072, {offset}) == b"\\x3c" * 131072
        h.flush()
        h.shutdown()
        print("ok")
        """
    )
    assert run("nbdsh", "-c", script).stdout.strip() == "ok"
    qemu_io(worker, export, creds, f"read -P 0x3c {offset} 128k")


@pytest.mark.parametrize("mode", TLS_MODES)
def test_nbdinfo_over_tls(workers: dict[str, RunningWorker], pki: PKI, mode: str) -> None:
    worker, export = workers[mode], export_for(mode)
    info = json.loads(
        run("nbdinfo", "--json", nbds(worker, export, pki.client_dir("carol"))).stdout
    )
    assert info["TLS"] is True
    (exp,) = info["exports"]
    assert exp["export-name"] == export
    assert exp["export-size"] == EXPORT_SIZE


@pytest.mark.parametrize("mode", TLS_MODES)
def test_nbdinfo_list_over_tls_shows_what_the_client_may_open(
    workers: dict[str, RunningWorker], pki: PKI, mode: str
) -> None:
    out = run("nbdinfo", "--list", "--json", nbds(workers[mode], "", pki.client_dir("alice")))
    names = {e["export-name"] for e in json.loads(out.stdout)["exports"]}
    assert {"plain", "alice-only"} <= names
    # OPTIONALTLS cannot hold the tls_required "secret" to TLS, so the worker does not serve it.
    assert ("secret" in names) is (mode != "OPTIONALTLS")
    assert "bob-only" not in names
    assert "lan-only" not in names


# -- plaintext clients ----------------------------------------------------------------------------


def test_notls_serves_plaintext_clients_and_refuses_tls_clients(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    worker, creds = workers["NOTLS"], pki.client_dir("alice")
    qemu_io(worker, "plain", None, "write -P 0x11 0 4k", "read -P 0x11 0 4k")
    assert json.loads(run("nbdinfo", "--json", worker.uri("plain")).stdout)["TLS"] is False
    failed = run("qemu-img", "info", *qemu_opts(worker, "plain", creds), check=False)
    assert failed.returncode != 0
    assert run("nbdinfo", nbds(worker, "plain", creds), check=False).returncode != 0


@pytest.mark.parametrize("mode", ["OPTIONALTLS", "SELECTIVETLS"])
def test_plaintext_client_is_served_a_plain_export(
    workers: dict[str, RunningWorker], mode: str
) -> None:
    worker = workers[mode]
    qemu_io(worker, "plain", None, "write -P 0x22 8k 4k", "read -P 0x22 8k 4k")
    info = json.loads(run("nbdinfo", "--json", worker.uri("plain")).stdout)
    assert info["TLS"] is False


def test_selectivetls_refuses_the_tls_only_export_to_a_plaintext_client(
    workers: dict[str, RunningWorker],
) -> None:
    worker = workers["SELECTIVETLS"]
    failed = run("nbdinfo", worker.uri("secret"), check=False)
    # (libnbd turns NBD_REP_ERR_TLS_REQD into ENOTSUP; the exact reply is checked by
    # tests/worker/test_tls_modes.py.)
    assert failed.returncode != 0
    assert run("qemu-img", "info", *qemu_opts(worker, "secret", None), check=False).returncode


def test_optionaltls_serves_no_tls_required_export(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    # Plaintext would be a silent downgrade; TLS only would be SELECTIVETLS in disguise: refused.
    worker = workers["OPTIONALTLS"]
    wait_for_line(worker, "export 'secret' refused", "OPTIONALTLS", "SELECTIVETLS or FORCEDTLS")
    assert run("nbdinfo", worker.uri("secret"), check=False).returncode != 0
    creds = pki.client_dir("alice")
    assert run("nbdinfo", nbds(worker, "secret", creds), check=False).returncode != 0
    assert run("qemu-img", "info", *qemu_opts(worker, "secret", None), check=False).returncode
    info = json.loads(run("nbdinfo", "--json", nbds(worker, "plain", creds)).stdout)
    assert info["TLS"] is True


def test_forcedtls_refuses_a_plaintext_client(workers: dict[str, RunningWorker]) -> None:
    worker = workers["FORCEDTLS"]
    assert run("nbdinfo", worker.uri("plain"), check=False).returncode != 0
    assert run("qemu-img", "info", *qemu_opts(worker, "plain", None), check=False).returncode


# -- refusals with real clients -------------------------------------------------------------------


@pytest.mark.parametrize("client", ["mallory", "expired", "revoked", "anonymous"])
def test_client_refused_by_certificate(
    workers: dict[str, RunningWorker], pki: PKI, client: str
) -> None:
    worker, creds = workers["FORCEDTLS"], pki.client_dir(client)
    assert run("nbdinfo", nbds(worker, "plain", creds), check=False).returncode != 0
    assert run("qemu-img", "info", *qemu_opts(worker, "plain", creds), check=False).returncode
    if client == "revoked":
        serial = pki.clients["revoked"].serial_hex
        wait_for_line(worker, f"certificate serial {serial} is revoked")
    # Others are still served.
    run("nbdinfo", nbds(worker, "plain", pki.client_dir("alice")))


def test_client_allowed_on_one_export_is_refused_another(
    workers: dict[str, RunningWorker], pki: PKI
) -> None:
    worker = workers["SELECTIVETLS"]
    bob = pki.client_dir("bob")
    run("nbdinfo", nbds(worker, "bob-only", bob))
    failed = run("nbdinfo", nbds(worker, "alice-only", bob), check=False)
    assert failed.returncode != 0
    assert run("qemu-img", "info", *qemu_opts(worker, "alice-only", bob), check=False).returncode
    wait_for_line(worker, "CN=bob", "not authorized for export 'alice-only'")
    run("nbdinfo", nbds(worker, "alice-only", pki.client_dir("alice")))


def test_client_without_certificate_is_served_with_verification_none(
    pki: PKI, tmp_path: Path
) -> None:
    cfg = worker_config(pki, "FORCEDTLS", client_verification="none")
    anonymous = pki.client_dir("anonymous")
    with run_worker(cfg, workdir=tmp_path) as worker:
        qemu_io(worker, "plain", anonymous, "write -P 0x44 0 4k", "read -P 0x44 0 4k")
        info = json.loads(run("nbdinfo", "--json", nbds(worker, "plain", anonymous)).stdout)
        assert info["TLS"] is True
        # No certificate, no identity: exports limited to listed clients stay closed.
        assert run("nbdinfo", nbds(worker, "alice-only", anonymous), check=False).returncode
