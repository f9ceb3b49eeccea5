"""Where the Celery side of a node may touch files: the storage roots configured on its own host.

A node's `storage_root` comes from the database, which the jobs do not trust: it must be one of
the host's roots, or a directory below one (`NBDWORKER_STORAGE_ROOTS`, the variable nbdworker
reads, `:`-separated; default `NBDWEB_STORAGE_ROOT`). An image is reached from the root's open
directory one component at a time, each opened with O_NOFOLLOW: a symbolic link anywhere below
the root (placed there before or during the job) ends the walk instead of leading elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import PurePosixPath

from django.conf import settings

from exports_app.services.images import ImagePlace

__all__ = ["NotThisHost", "StorageRefused", "configured_roots", "image_place"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StorageRefused(Exception):
    """The path is outside this host's storage roots or passes a symbolic link."""


class NotThisHost(StorageRefused):
    """The node's storage root is none of this host's: its files are another host's to see."""


def configured_roots() -> list[str]:
    """This host's storage roots (normalised, never from the database)."""
    return [os.path.normpath(root) for root in settings.NBDWEB_JOB_STORAGE_ROOTS]


def _relative_components(path: str, what: str) -> list[str]:
    parts = PurePosixPath(path).parts
    if not parts or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise StorageRefused(f"The {what} {path!r} is not a plain relative path.")
    return list(parts)


def _below_configured_root(storage_root: str) -> tuple[str, list[str]]:
    """(configured root, components from it to `storage_root`)."""
    wanted = os.path.normpath(storage_root)
    if not os.path.isabs(wanted):
        raise StorageRefused(f"The node's storage root {storage_root!r} is not absolute.")
    for root in sorted(configured_roots(), key=len, reverse=True):
        if wanted == root:
            return root, []
        if os.path.commonpath([root, wanted]) == root:
            return root, _relative_components(os.path.relpath(wanted, root), "storage root")
    raise NotThisHost(
        f"The node's storage root {storage_root!r} is not among this host's storage roots "
        f"({':'.join(configured_roots()) or 'none'}; NBDWORKER_STORAGE_ROOTS)."
    )


def _enter(parent: int, name: str, shown: str, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, "No such directory", shown) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StorageRefused(f"{shown} is not a directory (a symbolic link?).") from None
        raise OSError(exc.errno, exc.strerror, shown) from None
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)
    return _enter(parent, name, shown, create=False)


@contextlib.contextmanager
def image_place(
    storage_root: str, image_path: str, create_parents: bool = False
) -> Iterator[ImagePlace]:
    """The image `image_path` (relative) of a node whose root is `storage_root`, opened as far
    as its directory. `create_parents` makes missing directories below the node's root."""
    root, root_parts = _below_configured_root(storage_root)
    image_parts = _relative_components(image_path, "image path")
    try:
        current = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, root) from None
    shown = root
    try:
        for index, name in enumerate(root_parts + image_parts[:-1]):
            shown = os.path.join(shown, name)
            creatable = create_parents and index >= len(root_parts)
            entered = _enter(current, name, shown, creatable)
            os.close(current)
            current = entered
        yield ImagePlace(current, image_parts[-1], os.path.join(shown, image_parts[-1]))
    finally:
        os.close(current)
