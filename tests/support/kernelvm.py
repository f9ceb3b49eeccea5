"""Boot Debian's kernel under qemu so that the Linux kernel NBD client can be tested.

The host has no nbd module (and the tests must not touch the host kernel), so the kernel client
runs in a throwaway VM: Debian's packaged kernel, an initramfs built here (busybox, the kernel
modules, Debian's real /usr/sbin/nbd-client with its shared libraries, and an /init), and qemu's
user-mode network, in which the host's loopback is 10.0.2.2::

    kernel = require_kernel()                      # skip (fail under CI=true) when missing
    base = build_base_initramfs(kernel, tmp / "base.cpio.gz")
    run = boot(kernel, [base, scenario_archive({"scenario.sh": script}, tmp / "s.cpio.gz")],
               workdir=tmp, timeout=120)
    run.results      # lines the guest wrote with `result ...` (to its second serial port)
    run.console      # the whole serial console, for failure messages

The kernel comes from the package that `linux-image-amd64` depends on, downloaded with
`apt-get download` (never installed) and cached, keyed by package and version, under
``$NBDWEB_TEST_KERNEL_CACHE``, ``$XDG_CACHE_HOME/nbdweb-test-kernel`` or
``~/.cache/nbdweb-test-kernel``. `.ci/run` fetches it with ``python3 -m tests.support.kernelvm``.

Only the standard library is imported at module level: `.ci/run` runs the fetch before the venv
exists.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "GUEST_MODULES",
    "HOST_FROM_GUEST",
    "CpioWriter",
    "GuestRun",
    "Kernel",
    "boot",
    "build_base_initramfs",
    "fetch_kernel",
    "find_kernel",
    "kvm_usable",
    "require_busybox",
    "require_kernel",
    "require_qemu",
    "scenario_archive",
]

META_PACKAGE = "linux-image-amd64"
# The NIC is virtio-net: the fastest qemu NIC, and its driver chain (virtio_pci, virtio_ring,
# net_failover, ...) is resolved from the modules' own "depends" field, not listed by hand.
GUEST_MODULES = ("virtio_net", "virtio_pci", "nbd")
HOST_FROM_GUEST = "10.0.2.2"
NBD_CLIENT = "/usr/sbin/nbd-client"
BUSYBOX = "/bin/busybox"
_CACHE_FORMAT = 1


# -- where the kernel lives -----------------------------------------------------------------------


def cache_root() -> Path:
    explicit = os.environ.get("NBDWEB_TEST_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "nbdweb-test-kernel"


@dataclass(frozen=True)
class Kernel:
    """An extracted kernel: vmlinuz and the modules GUEST_MODULES needs, in load order."""

    directory: Path
    package: str
    version: str
    release: str
    load_order: tuple[str, ...]

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    def module(self, name: str) -> Path:
        return self.directory / "modules" / f"{name}.ko"

    @classmethod
    def load(cls, directory: Path) -> Kernel | None:
        """The kernel cached in `directory`, or None when it is incomplete or stale."""
        try:
            meta = json.loads((directory / "kernel.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != _CACHE_FORMAT or meta.get("wanted") != list(GUEST_MODULES):
            return None
        kernel = cls(
            directory, meta["package"], meta["version"], meta["release"], tuple(meta["load_order"])
        )
        if not kernel.vmlinuz.is_file() or not all(
            kernel.module(m).is_file() for m in kernel.load_order
        ):
            return None
        return kernel


def _apt_cache(*args: str) -> str:
    try:
        result = subprocess.run(
            ["apt-cache", *args], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout


def current_package() -> tuple[str, str] | None:
    """(package, version) of the kernel `linux-image-amd64` depends on, from the apt lists."""
    m = re.search(r"Depends:\s*(linux-image-\S+)", _apt_cache("depends", META_PACKAGE))
    if not m:
        return None
    package = m.group(1)
    v = re.search(r"^Version:\s*(\S+)", _apt_cache("show", "--no-all-versions", package), re.M)
    return (package, v.group(1)) if v else None


def _cache_key(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}"


def find_kernel() -> Kernel | None:
    """The cached kernel: the current package's when cached, else the newest cached one (so that
    stale or missing apt lists do not make an offline run lose its kernel)."""
    root = cache_root()
    current = current_package()
    if current is not None:
        kernel = Kernel.load(root / _cache_key(*current))
        if kernel is not None:
            return kernel
    candidates = sorted(
        (p for p in root.glob("linux-image-*") if p.is_dir()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for directory in candidates:
        kernel = Kernel.load(directory)
        if kernel is not None:
            return kernel
    return None


# -- module metadata ------------------------------------------------------------------------------


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The .modinfo section of a kernel module (`modinfo` without kmod): key -> values."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = elf.index(b"\0", strtab + name)
        if elf[strtab + name : end] != b".modinfo":
            continue
        for item in elf[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".ko"):
        name = name.removesuffix(suffix)
    return name.replace("-", "_")


def resolve_modules(tree: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """`wanted` and everything they depend on, in an order insmod accepts (dependencies first)."""
    index = {_module_name(p): p for p in tree.rglob("*.ko*") if p.name.endswith((".ko", ".ko.xz"))}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in index:
            raise FileNotFoundError(f"module {name} (needed by {' <- '.join(chain)}) not found")
        seen.add(name)
        depends = modinfo(_read_module(index[name])).get("depends", [""])[0]
        for dep in filter(None, depends.split(",")):
            visit(dep, (name, *chain))
        order.append((name, index[name]))

    for name in wanted:
        visit(name, ())
    return order


# -- fetching -------------------------------------------------------------------------------------


def fetch_kernel(*, log=print) -> Kernel:
    """Download (not install) the current Debian kernel package and cache what the tests need.
    Does nothing when it is cached already."""
    current = current_package()
    if current is None:
        raise RuntimeError(
            f"apt-cache knows no {META_PACKAGE}: run apt-get update (needs Debian's package lists)"
        )
    package, version = current
    root = cache_root()
    target = root / _cache_key(package, version)
    kernel = Kernel.load(target)
    if kernel is not None:
        log(f"test kernel cached: {target}")
        return kernel
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        work = Path(tmp)
        log(f"downloading {package} {version}")
        # As root, apt warns that its _apt sandbox user cannot write to a private home.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        subprocess.run(
            ["apt-get", "download", "-q", *sandbox, f"{package}={version}"],
            cwd=work,
            check=True,
            timeout=1800,
            stdout=subprocess.DEVNULL,
        )
        (deb,) = work.glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True, timeout=600)
        (vmlinuz,) = (work / "x/boot").glob("vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules_tree = next(
            p / release / "kernel"
            for p in (work / "x/lib/modules", work / "x/usr/lib/modules")
            if (p / release).is_dir()
        )
        staged = work / "kernel"
        (staged / "modules").mkdir(parents=True)
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        load_order = []
        for name, path in resolve_modules(modules_tree, GUEST_MODULES):
            (staged / "modules" / f"{name}.ko").write_bytes(_read_module(path))
            load_order.append(name)
        meta = {
            "format": _CACHE_FORMAT,
            "package": package,
            "version": version,
            "release": release,
            "wanted": list(GUEST_MODULES),
            "load_order": load_order,
        }
        (staged / "kernel.json").write_text(json.dumps(meta, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    # Older kernels are dead weight once the current one is cached.
    for old in root.glob("linux-image-*"):
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log(f"test kernel cached: {target} ({release}; modules: {' '.join(load_order)})")
    kernel = Kernel.load(target)
    assert kernel is not None
    return kernel


# -- availability (pytest) ------------------------------------------------------------------------


def _unavailable(reason: str):
    """Skip with `reason` on a developer machine; fail under CI, where .ci/run provides all."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_kernel() -> Kernel:
    kernel = find_kernel()
    if kernel is None:
        _unavailable(
            f"no test kernel cached under {cache_root()}: run `python3 -m tests.support.kernelvm`"
            f" in the repository (it downloads {META_PACKAGE}'s kernel package with apt-get"
            " download; .ci/run does this)"
        )
    return kernel


def require_qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        _unavailable("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86")
    return path


def require_busybox() -> str:
    if not os.access(BUSYBOX, os.X_OK):
        _unavailable(f"{BUSYBOX} is not installed: apt-get install busybox-static")
    return BUSYBOX


def kvm_usable() -> bool:
    """Whether qemu can run a stock kernel under KVM here. A /dev/kvm is not enough: inside
    another VM it may be PVM (kvm_pvm, paravirtual nesting without VMX/SVM), which creates VMs
    but crawls through an unmodified kernel; only kvm_intel / kvm_amd run one at full speed."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return any(Path("/sys/module", m).is_dir() for m in ("kvm_intel", "kvm_amd"))


# -- initramfs ------------------------------------------------------------------------------------


class CpioWriter:
    """A cpio archive in the "newc" format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = {""}

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        self._ino += 1
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + name.encode() + b"\0")
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def _parents(self, path: str) -> str:
        path = path.strip("/")
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))
        return path

    def directory(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if path in self._dirs:
            return
        self._parents(path)
        self._dirs.add(path)
        self._entry(path, 0o040000 | mode)

    def file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        self._entry(self._parents(path), 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(self._parents(path), 0o120777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parents(path), 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()

    def write_gzip(self, path: Path) -> Path:
        # Level 1: the archive is rebuilt per session and read once; speed beats size.
        path.write_bytes(gzip.compress(self.finish(), compresslevel=1, mtime=0))
        return path


def shared_libraries(binary: str) -> list[str]:
    """The shared objects `binary` loads (ldd's paths, the dynamic loader included)."""
    result = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or "not a dynamic executable" in result.stdout + result.stderr:
        return []
    libs = []
    for line in result.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
        elif "=>" in line and "not found" in line:
            raise FileNotFoundError(f"{binary}: {line.strip()}")
    return libs


# The guest's /init: everything but the test itself, which is /scenario.sh from a second archive
# appended per boot. Each step is bounded by `timeout` so that a hung client still lets the
# guest report and power off; the host's qemu deadline is the outer bound.
INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1

# Results go to the second serial port (a file on the host), apart from kernel messages.
result() { echo "@@RESULT $*" >/dev/ttyS1; echo "@@RESULT $*"; }

for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m.ko || result init insmod-failed $m
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.05; done
if ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 \
        && ip route add default via 10.0.2.2; then
    result init network up
else
    result init network failed
fi

if [ -f /scenario.sh ]; then
    . /scenario.sh
else
    result init no-scenario
fi
result init done
sync
poweroff -f
"""


def build_base_initramfs(kernel: Kernel, path: Path, nbd_client: str = NBD_CLIENT) -> Path:
    """busybox with its applet links, the kernel's modules, `nbd_client` (as /usr/sbin/nbd-client)
    with its libraries, and /init, as a gzipped newc archive at `path`."""
    busybox = require_busybox()
    cpio = CpioWriter()
    for d in ("dev", "proc", "sys", "tmp", "run", "etc", "root"):
        cpio.directory(d)
    # The kernel opens /dev/console for init before anything could mount devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", "root:x:0:\n")

    real_files = {BUSYBOX.lstrip("/"), NBD_CLIENT.lstrip("/"), "init"}
    cpio.file(BUSYBOX, Path(busybox).read_bytes(), 0o755)
    cpio.file(NBD_CLIENT, Path(nbd_client).read_bytes(), 0o755)
    libs = {lib for b in (busybox, nbd_client) for lib in shared_libraries(b)}
    for lib in sorted(libs):
        # ldd names the path the loader looks for; its content is wherever that resolves to.
        cpio.file(lib, Path(lib).resolve().read_bytes(), 0o755)
        real_files.add(lib.lstrip("/"))

    applets = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for applet in applets:
        # Busybox's own nbd-client applet must not shadow Debian's real one.
        if applet not in real_files:
            cpio.symlink(applet, "/bin/busybox")

    for name in kernel.load_order:
        cpio.file(f"lib/modules/{name}.ko", kernel.module(name).read_bytes())
    cpio.file("lib/modules/load-order", "\n".join(kernel.load_order) + "\n")
    cpio.file("init", INIT, 0o755)
    return cpio.write_gzip(path)


def scenario_archive(files: Mapping[str, bytes | str], path: Path) -> Path:
    """A second archive with the per-boot files (at least ``scenario.sh``, which /init sources);
    the kernel unpacks it over the base one."""
    cpio = CpioWriter()
    for name, data in files.items():
        cpio.file(name, data, 0o755 if name.endswith(".sh") else 0o644)
    return cpio.write_gzip(path)


# -- booting --------------------------------------------------------------------------------------


@dataclass
class GuestRun:
    console: str
    results: list[str]
    returncode: int | None
    seconds: float
    accel: str
    timed_out: bool
    notes: list[str] = field(default_factory=list)

    def describe(self, tail: int = 200) -> str:
        """For assertion messages: how the VM ended and the end of its console."""
        lines = self.console.splitlines()[-tail:]
        how = "timed out" if self.timed_out else f"exited {self.returncode}"
        notes = "".join(f"{n}\n" for n in self.notes)
        return (
            f"{notes}qemu ({self.accel}) {how} after {self.seconds:.1f}s; console:\n"
            + "\n".join(lines)
        )


# A KVM boot reaches /init in a second or two; one that has not within this is not going to be
# fast (see kvm_usable) and is abandoned for TCG.
KVM_SIGN_OF_LIFE = 20.0
# None: not tried yet in this process; False: KVM did not boot, use TCG from now on.
_kvm_boots: bool | None = None


def boot(
    kernel: Kernel,
    initrd_parts: Sequence[Path],
    *,
    workdir: Path,
    timeout: float,
    memory_mb: int = 256,
    accel: str | None = None,
    append: str = "",
) -> GuestRun:
    """Boot `kernel` with the concatenation of `initrd_parts` as its initramfs, until the guest
    powers off or `timeout` passes (then qemu is killed).

    `accel` (or ``$NBDWEB_TEST_QEMU_ACCEL``) forces ``kvm`` or ``tcg``; by default KVM is used
    when `kvm_usable`, falling back to TCG when the guest shows no sign of life in time."""
    global _kvm_boots
    require_qemu()
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = workdir / "initrd.gz"
    with open(initrd, "wb") as out:
        for part in initrd_parts:
            # Concatenated gzip members are unpacked one after the other, later files winning.
            out.write(part.read_bytes())
    forced = accel or os.environ.get("NBDWEB_TEST_QEMU_ACCEL")
    if forced:
        return _run_qemu(kernel, initrd, workdir, forced, timeout, memory_mb, append)
    notes = []
    if _kvm_boots is not False and kvm_usable():
        run = _run_qemu(
            kernel, initrd, workdir, "kvm", timeout, memory_mb, append, KVM_SIGN_OF_LIFE
        )
        if run.results:
            _kvm_boots = True
            return run
        _kvm_boots = False
        notes.append(
            f"KVM: no sign of life from the guest in {KVM_SIGN_OF_LIFE:.0f}s, using TCG; "
            "console until then:\n" + run.console[-2000:]
        )
    run = _run_qemu(kernel, initrd, workdir, "tcg", timeout, memory_mb, append)
    run.notes[:0] = notes
    return run


def _run_qemu(
    kernel: Kernel,
    initrd: Path,
    workdir: Path,
    accel: str,
    timeout: float,
    memory_mb: int,
    append: str,
    sign_of_life: float | None = None,
) -> GuestRun:
    console, results = workdir / "console.log", workdir / "results.log"
    for f in (console, results):
        f.unlink(missing_ok=True)
    cmd = [
        require_qemu(),
        *("-machine", f"pc,accel={accel}"),
        *("-cpu", "host" if accel == "kvm" else "max"),
        *("-smp", "2", "-m", str(memory_mb)),
        *("-nodefaults", "-nographic", "-no-reboot", "-monitor", "none"),
        # ttyS0: the console; ttyS1: the guest's `result` lines, apart from kernel messages.
        *("-serial", f"file:{console}", "-serial", f"file:{results}"),
        *("-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"),
        *("-kernel", str(kernel.vmlinuz), "-initrd", str(initrd)),
        *("-append", f"console=ttyS0 panic=-1 loglevel=5 {append}".strip()),
    ]
    start = time.monotonic()
    deadline = start + timeout
    life_deadline = start + sign_of_life if sign_of_life is not None else None
    with open(workdir / f"qemu-{accel}.stderr", "w+") as stderr:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
        timed_out = False
        try:
            while True:
                now = time.monotonic()
                limit = deadline if life_deadline is None else min(deadline, life_deadline)
                try:
                    # Poll: the sign of life is a line in a file, which qemu cannot signal.
                    proc.wait(timeout=max(0.0, min(limit - now, 0.25)))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if life_deadline is not None and results.exists() and results.stat().st_size:
                    life_deadline = None
                if time.monotonic() >= limit:
                    timed_out = True
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        errors = stderr.read()
    seconds = time.monotonic() - start
    text = console.read_text(errors="replace") if console.exists() else ""
    if errors.strip():
        text += "\n--- qemu stderr ---\n" + errors
    lines = results.read_text(errors="replace").splitlines() if results.exists() else []
    return GuestRun(
        console=text,
        results=[ln.removeprefix("@@RESULT ").strip() for ln in lines if "@@RESULT" in ln],
        returncode=None if timed_out else proc.returncode,
        seconds=seconds,
        accel=accel,
        timed_out=timed_out,
    )


if __name__ == "__main__":
    try:
        fetch_kernel()
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"fetching the test kernel failed: {exc}", file=sys.stderr)
        sys.exit(1)
