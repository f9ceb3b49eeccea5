"""A client bundle as its user gets it: downloaded from the API, unpacked, and the command
lines its README prints (exports_app/services/bundles.py), to run as they are."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

__all__ = ["README_TOOLS", "download_bundle", "readme_commands", "unpack_bundle"]

# The README's command lines: indented, starting with one of these tools (continued by a
# trailing backslash).
README_TOOLS = ("mkdir", "qemu-img", "nbdinfo", "nbd-client")


def download_bundle(api, certificate_id: int, export_id: int) -> bytes:
    """The .tar.gz of a client certificate's bundle for an export, through the API."""
    response = api.get(f"/api/v1/certificates/{certificate_id}/bundle/?export={export_id}")
    assert response.status_code == 200, response.content
    return response.content


def unpack_bundle(data: bytes, into: Path) -> str:
    """Unpack the bundle's files into `into` (made here); return its README."""
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile():
                (into / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    assert {"ca-cert.pem", "client-cert.pem", "client-key.pem"} <= {p.name for p in into.iterdir()}
    return (into / "README.txt").read_text()


def readme_commands(readme: str) -> list[str]:
    """The command lines the README prints, each on one line, in order."""
    commands: list[str] = []
    continued = False
    for line in readme.splitlines():
        if continued:
            commands[-1] += " " + line.strip().removesuffix("\\").strip()
        elif line.startswith("  ") and line.split()[0] in README_TOOLS:
            commands.append(line.strip().removesuffix("\\").strip())
        continued = line.endswith("\\")
    return commands
