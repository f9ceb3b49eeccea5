"""Finding the NBD client tools the interop tests drive."""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["DEBIAN_PACKAGES", "client_env", "require_libnbd", "require_tool"]

# Which Debian 12 package provides each tool (the suite fails, naming it, when one is missing).
DEBIAN_PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "libnbd-bin",
    "nbd-client": "nbd-client",
    "nbdkit": "nbdkit",
    "fio": "fio",
}

# nbdsh runs `python3 -m nbd`: Debian's python3-libnbd exists for /usr/bin/python3 only, so the
# system directories must come before the venv on PATH.
_SYSTEM_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to run client tools with (system bin directories first)."""
    env = dict(os.environ)
    env["PATH"] = _SYSTEM_PATH + ":" + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    if extra:
        env.update(extra)
    return env


def require_tool(name: str) -> str:
    """The absolute path of client tool `name`, or fail the test naming the package."""
    path = shutil.which(name, path=client_env()["PATH"])
    if path is None:
        package = DEBIAN_PACKAGES.get(name, name)
        pytest.fail(f"{name} is not installed: apt-get install {package}", pytrace=False)
    return path


def require_libnbd():
    """The `nbd` Python module (python3-libnbd), or fail naming the package."""
    try:
        import nbd
    except ImportError:
        pytest.fail(
            "the nbd Python module is missing: apt-get install python3-libnbd (and build the "
            "venv from /usr/bin/python3 with --system-site-packages)",
            pytrace=False,
        )
    return nbd
