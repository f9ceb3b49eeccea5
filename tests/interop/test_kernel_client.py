"""The Linux kernel NBD client (nbd.ko driven by Debian's nbd-client) against nbdworker.

The host has no nbd module, so one VM (tests/support/kernelvm.py: Debian's kernel under qemu,
KVM when it works, TCG otherwise) runs every scenario in one boot, one /dev/nbdN each, and
reports on its second serial port; the tests below check those reports against the image files
and the workers' logs:

* rw: read the whole device (sha256 vs the host's random data), write a pattern with O_DIRECT,
  flush, read it back, disconnect, reconnect and read everything again;
* ro: a read_only export attaches read-only, writes fail, the image is unchanged;
* SELECTIVETLS: a plain export is served to the plaintext kernel client, a tls_required one is
  refused, and served once nbd-client brings TLS (client certificate);
* multi: ``nbd-client -C 2`` (two connections behind one device), write and read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.fixtures import make_image
from tests.support.kernelvm import (
    HOST_FROM_GUEST,
    GuestRun,
    boot,
    build_base_initramfs,
    require_busybox,
    require_kernel,
    require_qemu,
    scenario_archive,
)
from tests.support.pki import make_pki, tls_config_dict
from tests.support.tools import require_tool
from tests.support.worker import RunningWorker, file_export, memory_export, run_worker

pytestmark = pytest.mark.interop

MiB = 1 << 20
KiB = 1 << 10
DISK_SIZE = 8 * MiB
RO_SIZE = 4 * MiB
OPEN_SIZE = 4 * MiB
MULTI_SIZE = 8 * MiB
# Where the guest writes its patterns (4 KiB blocks for dd's seek/skip).
RW_OFFSET, RW_LEN = 1 * MiB, 256 * KiB
MULTI_OFFSET, MULTI_LEN = 3 * MiB, 512 * KiB
# The whole boot, under pytest-timeout's 300 s: TCG runs it in ~15 s here; the rest is for a
# loaded CI machine.
BOOT_DEADLINE = 180.0

SCENARIO = r"""
NBD=/usr/sbin/nbd-client
H={host}
PLAIN={plain_port}
SELECTIVE={selective_port}

attach() {{  # device port export [nbd-client options]: prints nbd-client's output
    dev=$1; port=$2; name=$3; shift 3
    timeout 30 $NBD $H $port $dev -N $name "$@" >/tmp/attach.out 2>&1
    rc=$?
    sed "s|^|nbd-client $name: |" /tmp/attach.out
    return $rc
}}
detach() {{ timeout 30 $NBD -d $1; }}
sha() {{ timeout 60 sha256sum $1 | cut -d' ' -f1; }}
# device skip count (4 KiB blocks), read with O_DIRECT: from the server, not the page cache.
sha_direct() {{
    timeout 60 dd if=$1 bs=4096 skip=$2 count=$3 iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}}
# dd's own exit status, and its message (busybox dd says e.g. "Operation not permitted").
write_pattern() {{  # pattern device seek-block
    timeout 60 dd if=$1 of=$2 bs=4096 seek=$3 oflag=direct conv=notrunc 2>/tmp/dd.err
    rc=$?
    msg=$(grep -v records /tmp/dd.err | head -n 1)
    echo "dd $2: rc=$rc $msg"
    return $rc
}}

# -- rw ----------------------------------------------------------------------------------------
attach /dev/nbd0 $PLAIN disk; result rw attach $?
result rw size $(blockdev --getsize64 /dev/nbd0)
result rw ro $(blockdev --getro /dev/nbd0)
result rw sha-before $(sha /dev/nbd0)
write_pattern /rw.bin /dev/nbd0 {rw_block}; result rw write $?
sync
blockdev --flushbufs /dev/nbd0; result rw flush $?
result rw readback $(sha_direct /dev/nbd0 {rw_block} {rw_blocks})
detach /dev/nbd0; result rw detach $?
attach /dev/nbd0 $PLAIN disk; result rw reattach $?
result rw sha-after $(sha /dev/nbd0)
detach /dev/nbd0; result rw detach2 $?

# -- ro ----------------------------------------------------------------------------------------
attach /dev/nbd1 $PLAIN ro; result ro attach $?
result ro ro $(blockdev --getro /dev/nbd1)
result ro sha $(sha /dev/nbd1)
write_pattern /rw.bin /dev/nbd1 0; result ro write $?
result ro write-error $msg
# Past the block layer's read-only flag: the driver itself must refuse (the export said so).
blockdev --setrw /dev/nbd1
write_pattern /rw.bin /dev/nbd1 0; result ro write-forced $?
detach /dev/nbd1; result ro detach $?

# -- SELECTIVETLS ------------------------------------------------------------------------------
attach /dev/nbd2 $SELECTIVE open; result selective open-attach $?
result selective open-sha $(sha /dev/nbd2)
detach /dev/nbd2; result selective open-detach $?
attach /dev/nbd3 $SELECTIVE secret; result selective secret-attach $?
result selective secret-size $(blockdev --getsize64 /dev/nbd3)
result selective secret-message $(tr '\n' ' ' </tmp/attach.out)
detach /dev/nbd3 >/dev/null 2>&1
# The same export over TLS: nbd-client does the handshake (GnuTLS) for the kernel.
attach /dev/nbd5 $SELECTIVE secret -enable-tls -cacertfile /tls/ca.pem \
    -certfile /tls/cert.pem -keyfile /tls/key.pem -tlshostname localhost
result selective secret-tls-attach $?
result selective secret-tls-size $(blockdev --getsize64 /dev/nbd5)
write_pattern /rw.bin /dev/nbd5 0; result selective secret-tls-write $?
blockdev --flushbufs /dev/nbd5
result selective secret-tls-readback $(sha_direct /dev/nbd5 0 {rw_blocks})
detach /dev/nbd5; result selective secret-tls-detach $?

# -- multi-connection --------------------------------------------------------------------------
attach /dev/nbd4 $PLAIN multi -C 2; result multi attach $?
result multi sha-before $(sha /dev/nbd4)
write_pattern /multi.bin /dev/nbd4 {multi_block}; result multi write $?
sync
blockdev --flushbufs /dev/nbd4; result multi flush $?
result multi readback $(sha_direct /dev/nbd4 {multi_block} {multi_blocks})
detach /dev/nbd4; result multi detach $?
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Guest:
    run: GuestRun
    plain: RunningWorker
    selective: RunningWorker
    images: Path
    data: dict[str, bytes]
    patterns: dict[str, bytes]
    results: dict[tuple[str, str], str] = field(default_factory=dict)

    def result(self, scenario: str, key: str) -> str:
        """What the guest reported for `scenario` / `key` (fails with the console if nothing)."""
        value = self.results.get((scenario, key))
        assert value is not None, f"the guest did not report {scenario} {key}\n{self.context()}"
        return value

    def context(self) -> str:
        """For assertion messages: the guest's reports, its console and both workers' logs."""
        reports = "\n".join(f"  {s} {k} {v}" for (s, k), v in self.results.items())
        return (
            f"guest reports:\n{reports}\n{self.run.describe()}\n"
            f"--- plain worker log ---\n{self.plain.log_tail(80)}"
            f"--- selective worker log ---\n{self.selective.log_tail(80)}"
        )


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    # Both before any work, so that a machine without them skips (or fails under CI) at once.
    require_qemu()
    require_busybox()
    nbd_client = require_tool("nbd-client")
    kernel = require_kernel()
    root = tmp_path_factory.mktemp("kernel-client")
    images = root / "images"
    data = {
        "disk": os.urandom(DISK_SIZE),
        "ro": os.urandom(RO_SIZE),
        "open": os.urandom(OPEN_SIZE),
        "multi": os.urandom(MULTI_SIZE),
    }
    for name, content in data.items():
        make_image(images / f"{name}.img", len(content), content)
    patterns = {"rw": os.urandom(RW_LEN), "multi": os.urandom(MULTI_LEN)}

    pki = make_pki(root / "pki")
    plain_config = {
        "version": 1,
        "exports": [
            file_export("disk", images / "disk.img"),
            file_export("ro", images / "ro.img", read_only=True),
            file_export("multi", images / "multi.img"),
        ],
    }
    selective_config = {
        "version": 1,
        "exports": [
            file_export("open", images / "open.img"),
            memory_export("secret", 4 * MiB, tls_required=True),
        ],
        "tls": tls_config_dict(pki, "SELECTIVETLS"),
    }
    base = build_base_initramfs(kernel, root / "base.cpio.gz", nbd_client)
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(
            run_worker(plain_config, workdir=root / "plain", storage_root=images, log_level="DEBUG")
        )
        selective = stack.enter_context(
            run_worker(
                selective_config,
                workdir=root / "selective",
                storage_root=images,
                log_level="DEBUG",
            )
        )
        script = SCENARIO.format(
            host=HOST_FROM_GUEST,
            plain_port=plain.port,
            selective_port=selective.port,
            rw_block=RW_OFFSET // 4096,
            rw_blocks=RW_LEN // 4096,
            multi_block=MULTI_OFFSET // 4096,
            multi_blocks=MULTI_LEN // 4096,
        )
        scenario = scenario_archive(
            {
                "scenario.sh": script,
                "rw.bin": patterns["rw"],
                "multi.bin": patterns["multi"],
                "tls/ca.pem": pki.ca.cert_pem,
                "tls/cert.pem": pki.clients["alice"].cert_pem,
                "tls/key.pem": pki.clients["alice"].key_pem,
            },
            root / "scenario.cpio.gz",
        )
        run = boot(kernel, [base, scenario], workdir=root / "vm", timeout=BOOT_DEADLINE)
        for note in run.notes:
            print(note)
        print(
            f"kernel client VM: {kernel.package} {kernel.version}, {run.accel}, {run.seconds:.1f}s"
        )
        g = Guest(run, plain, selective, images, data, patterns)
        for line in run.results:
            scenario_name, _, rest = line.partition(" ")
            key, _, value = rest.partition(" ")
            g.results[(scenario_name, key)] = value.strip()
        yield g


def sessions(worker: RunningWorker, export: str) -> list[str]:
    """The peers (host:port) of the connections that opened `export`, each of which must also
    have ended with NBD_CMD_DISC (the kernel's graceful disconnect)."""
    peers = re.findall(rf"(\S+): export '{export}' opened", worker.log)
    for peer in peers:
        worker.wait_for_log(rf"{re.escape(peer)}: NBD_CMD_DISC", timeout=10)
    return peers


def expected_image(original: bytes, offset: int, pattern: bytes) -> bytes:
    return original[:offset] + pattern + original[offset + len(pattern) :]


def test_guest_ran_every_scenario(guest: Guest):
    assert not guest.run.timed_out, guest.context()
    assert guest.result("init", "network") == "up", guest.context()
    assert guest.result("init", "done") == "", guest.context()


def test_read_write(guest: Guest):
    g = guest
    assert g.result("rw", "attach") == "0", g.context()
    assert g.result("rw", "size") == str(DISK_SIZE), g.context()
    assert g.result("rw", "ro") == "0", g.context()
    assert g.result("rw", "sha-before") == sha256(g.data["disk"]), g.context()
    assert g.result("rw", "write") == "0", g.context()
    assert g.result("rw", "flush") == "0", g.context()
    assert g.result("rw", "readback") == sha256(g.patterns["rw"]), g.context()
    assert g.result("rw", "detach") == "0", g.context()
    expected = expected_image(g.data["disk"], RW_OFFSET, g.patterns["rw"])
    # What reached the server, read back by the kernel over a new connection.
    assert g.result("rw", "reattach") == "0", g.context()
    assert g.result("rw", "sha-after") == sha256(expected), g.context()
    assert (g.images / "disk.img").read_bytes() == expected, g.context()
    assert len(sessions(g.plain, "disk")) == 2, g.context()


def test_read_only_export(guest: Guest):
    g = guest
    assert g.result("ro", "attach") == "0", g.context()
    assert g.result("ro", "ro") == "1", g.context()
    assert g.result("ro", "sha") == sha256(g.data["ro"]), g.context()
    assert g.result("ro", "write") != "0", g.context()
    assert "Operation not permitted" in g.result("ro", "write-error"), g.context()
    assert g.result("ro", "write-forced") != "0", g.context()
    assert g.result("ro", "detach") == "0", g.context()
    assert (g.images / "ro.img").read_bytes() == g.data["ro"], g.context()
    assert len(sessions(g.plain, "ro")) == 1, g.context()


def test_selective_tls_serves_plain_export(guest: Guest):
    g = guest
    assert g.result("selective", "open-attach") == "0", g.context()
    assert g.result("selective", "open-sha") == sha256(g.data["open"]), g.context()
    assert g.result("selective", "open-detach") == "0", g.context()
    assert len(sessions(g.selective, "open")) == 1, g.context()


def test_selective_tls_refuses_tls_required_export(guest: Guest):
    g = guest
    assert g.result("selective", "secret-attach") != "0", g.context()
    # Never attached: the device has no size.
    assert g.result("selective", "secret-size") == "0", g.context()
    assert "TLS required for export 'secret'" in g.result("selective", "secret-message")
    refused = g.selective.wait_for_log(
        r"(\S+): NBD_OPT_GO -> NBD_REP_ERR_TLS_REQD .*'secret'", timeout=10
    ).group(1)
    assert f"{refused}: export 'secret' opened" not in g.selective.log, g.context()


def test_tls_required_export_over_tls(guest: Guest):
    """nbd-client does the TLS handshake (GnuTLS) and hands the kernel the encrypted session."""
    g = guest
    assert g.result("selective", "secret-tls-attach") == "0", g.context()
    assert g.result("selective", "secret-tls-size") == str(4 * MiB), g.context()
    assert g.result("selective", "secret-tls-write") == "0", g.context()
    assert g.result("selective", "secret-tls-readback") == sha256(g.patterns["rw"]), g.context()
    assert g.result("selective", "secret-tls-detach") == "0", g.context()
    (peer,) = sessions(g.selective, "secret")
    assert re.search(rf"{re.escape(peer)}: TLS up .*CN=alice", g.selective.log), g.context()


def test_multi_connection(guest: Guest):
    g = guest
    assert g.result("multi", "attach") == "0", g.context()
    assert g.result("multi", "sha-before") == sha256(g.data["multi"]), g.context()
    assert g.result("multi", "write") == "0", g.context()
    assert g.result("multi", "flush") == "0", g.context()
    assert g.result("multi", "readback") == sha256(g.patterns["multi"]), g.context()
    assert g.result("multi", "detach") == "0", g.context()
    expected = expected_image(g.data["multi"], MULTI_OFFSET, g.patterns["multi"])
    assert (g.images / "multi.img").read_bytes() == expected, g.context()
    # One device, two sockets: two sessions of the same export, each ended gracefully.
    assert len(set(sessions(g.plain, "multi"))) == 2, g.context()


def test_no_protocol_errors(guest: Guest):
    for worker in (guest.plain, guest.selective):
        assert "protocol error" not in worker.log, guest.context()
        assert "dropping" not in worker.log, guest.context()
