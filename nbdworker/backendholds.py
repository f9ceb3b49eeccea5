"""When an export's open image may be closed, and when a new config may keep it open.

A backend is held by:

* the current configuration generation (`ServerState`), for every export it serves;
* a connection still negotiating, for every export of the generation it negotiates under (it
  may still pick any of them);
* a connection in transmission, for its own export's backend, until nothing of it touches the
  backend any more (its serving thread has ended and no thread-pool job of it runs:
  `LoopTransmission.when_done`).

When the last hold goes, the backend is closed: the image's descriptor goes, and with it the
space of an image deleted meanwhile. Before this, a removed or replaced export's descriptor
stayed open for the life of the worker (one per config change, up to EMFILE).

A config that changes nothing the backend was opened with (a description, block sizes, rules)
hands the open backend over to the new generation (`reusable_backend`), as long as the path
still names the very file that is open: an image replaced at the same path is opened anew.

Everything here runs on the event loop; nothing needs a lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection

from nbdworker.backends import Backend, FileBackend
from nbdworker.contract.config import ExportConfig
from nbdworker.exports import ExportEntry, ServerState

__all__ = ["BackendHolds", "reusable_backend"]

log = logging.getLogger("nbdworker")


class BackendHolds:
    def __init__(self) -> None:
        # id() keys: backends and states compare by identity (their dataclass __eq__ is off or
        # would compare contents); the value keeps the object alive while it is counted.
        self._backends: dict[int, tuple[Backend, int]] = {}
        self._states: dict[int, tuple[ServerState, int]] = {}

    @property
    def open_backends(self) -> int:
        return len(self._backends)

    def hold(self, backend: Backend) -> None:
        _, count = self._backends.get(id(backend), (backend, 0))
        self._backends[id(backend)] = (backend, count + 1)

    def release(self, backend: Backend) -> None:
        held = self._backends.get(id(backend))
        if held is None:
            return
        if held[1] > 1:
            self._backends[id(backend)] = (backend, held[1] - 1)
            return
        del self._backends[id(backend)]
        try:
            backend.close()
        except OSError as exc:
            log.warning("closing an export's image failed: %s", exc)

    def hold_state(self, state: ServerState) -> None:
        """Hold `state` (and through it each of its backends)."""
        _, count = self._states.get(id(state), (state, 0))
        self._states[id(state)] = (state, count + 1)
        if count == 0:
            for entry in state.exports.values():
                self.hold(entry.backend)

    def release_state(self, state: ServerState) -> None:
        held = self._states.get(id(state))
        if held is None:
            return
        if held[1] > 1:
            self._states[id(state)] = (state, held[1] - 1)
            return
        del self._states[id(state)]
        for entry in state.exports.values():
            self.release(entry.backend)

    def pass_on(
        self, previous: ServerState, new: ServerState, changed: Collection[str] | None
    ) -> None:
        """The current generation's hold goes from `previous` to `new` (`hold_state(new)`, then
        `release_state(previous)`). When `changed` names every export in which the two differ
        (the others are the very same entries) and only the current generation holds
        `previous`, just those exports' backends are counted again: the others would be held
        once more by `new` and once less by `previous`."""
        held = self._states.get(id(previous))
        if changed is None or held is None or held[1] != 1 or id(new) in self._states:
            self.hold_state(new)
            self.release_state(previous)
            return
        del self._states[id(previous)]
        self._states[id(new)] = (new, 1)
        for name in changed:
            entry = new.exports.get(name)
            if entry is not None:
                self.hold(entry.backend)
        for name in changed:
            entry = previous.exports.get(name)
            if entry is not None:
                self.release(entry.backend)


def reusable_backend(prev: ExportEntry | None, cfg: ExportConfig) -> Backend | None:
    """`prev`'s open file backend when `cfg` changed nothing it was opened with (same path,
    read-only flag and recorded identity, the image's size unchanged) and the path still names
    that very file."""
    if prev is None or cfg.backend != "file" or prev.config.backend != "file":
        return None
    backend = prev.backend
    if not isinstance(backend, FileBackend) or backend.is_block or cfg.path is None:
        return None
    before, after = prev.config, cfg
    if (before.path, before.read_only, before.image_identity) != (
        after.path,
        after.read_only,
        after.image_identity,
    ):
        return None
    if backend.size_changed():
        return None
    try:
        # The open file was proven to lie under the storage roots when it was opened
        # (imagefile.py); a file put at the path since then is not that file and is opened,
        # and proven, anew.
        named = os.stat(cfg.path, follow_symlinks=False)
        opened = os.fstat(backend.fd)
    except OSError:
        return None
    if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
        return None
    return backend
