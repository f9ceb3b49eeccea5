"""The worker's own settings: where its images may live, where it listens, which node it is.

They come only from the command line and the environment, never from the config snapshot
(nbdworker/contract/config.py), so that a compromised or mistaken snapshot cannot point an export
at an arbitrary host file or move the listening socket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nbdworker.contract.config import ConfigError

__all__ = [
    "DEFAULT_BUSY_POLL_US",
    "DEFAULT_HANDSHAKES_PER_ADDRESS",
    "DEFAULT_LISTEN",
    "MAX_BUSY_POLL_US",
    "MAX_HANDSHAKES_PER_ADDRESS",
    "ListenAddress",
    "WorkerSettings",
    "parse_listen",
]

DEFAULT_LISTEN = "127.0.0.1:10809"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """Parse `host:port`, `[v6]:port` or `unix:/path`."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"listen {text!r}: empty socket path")
        return ListenAddress("unix", path=path)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"listen {text!r}: expected [v6-address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"listen {text!r}: expected host:port, [v6]:port or unix:/path")
    try:
        port_no = int(port)
    except ValueError:
        raise ConfigError(f"listen {text!r}: port must be a number") from None
    if not 0 <= port_no <= 65535:
        raise ConfigError(f"listen {text!r}: port out of range")
    return ListenAddress("tcp", host=host or "0.0.0.0", port=port_no)


DEFAULT_BUSY_POLL_US = 50
MAX_BUSY_POLL_US = 1000
# Connections of one client address still negotiating, per serving process: far above what a
# client opens at once (nbdcopy: 4), far below the connection limit (1024), so idle handshakes
# from one peer cannot take every slot. 0 turns the cap off.
DEFAULT_HANDSHAKES_PER_ADDRESS = 16
MAX_HANDSHAKES_PER_ADDRESS = 65535
# Connections still negotiating in one serving process, whatever their addresses: many peers
# (or one with many addresses) could otherwise hold every connection slot with idle
# handshakes, and each TLS handshake costs memory and CPU before anyone is authenticated. A
# quarter of the connection limit: far above the connects a busy node sees at once. 0: no cap.
DEFAULT_MAX_HANDSHAKES = 256
MAX_MAX_HANDSHAKES = 65535


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    # Real paths (symlinks resolved once, at start: the operator's roots are trusted).
    storage_roots: tuple[str, ...]
    listen: tuple[ListenAddress, ...]
    node: str = "default"
    # How long a serving process polls its connections before its event loop sleeps
    # (nbdworker/spin.py); 0 turns it off.
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    # The roots as the operator spelled them (absolute), in the order of storage_roots: an
    # export's path may name its root either way.
    storage_roots_given: tuple[str, ...] = ()
    # Connections of one client address still negotiating, per serving process (0: no cap).
    handshakes_per_address: int = DEFAULT_HANDSHAKES_PER_ADDRESS
    # Connections still negotiating in one serving process, from anyone (0: no cap).
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES

    @classmethod
    def from_sources(
        cls,
        storage_roots: Sequence[str] | None = None,
        listen: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        handshakes_per_address: int | None = None,
        max_handshakes: int | None = None,
    ) -> WorkerSettings:
        """Command-line values win over the environment, which wins over the defaults."""
        env = os.environ if environ is None else environ
        if not storage_roots:
            raw = env.get("NBDWORKER_STORAGE_ROOTS", "")
            storage_roots = [r for r in raw.split(":") if r]
        if not storage_roots:
            data_dir = env.get("NBDWEB_DATA_DIR") or "./var"
            storage_roots = [os.path.join(data_dir, "images")]
        if not listen:
            raw = env.get("NBD_LISTEN", "")
            listen = [x for x in raw.split(",") if x.strip()]
        if not listen:
            listen = [DEFAULT_LISTEN]
        roots = tuple(os.path.realpath(r) for r in storage_roots)
        raw_poll = env.get("NBDWORKER_BUSY_POLL_US", "").strip()
        try:
            busy_poll_us = int(raw_poll) if raw_poll else DEFAULT_BUSY_POLL_US
        except ValueError:
            raise ConfigError(
                f"NBDWORKER_BUSY_POLL_US={raw_poll!r}: expected microseconds (0 turns it off)"
            ) from None
        if not 0 <= busy_poll_us <= MAX_BUSY_POLL_US:
            raise ConfigError(
                f"NBDWORKER_BUSY_POLL_US={busy_poll_us}: between 0 and {MAX_BUSY_POLL_US}"
            )
        if handshakes_per_address is None:
            handshakes_per_address = _count_from_env(
                env, "NBDWORKER_MAX_HANDSHAKES_PER_ADDRESS", DEFAULT_HANDSHAKES_PER_ADDRESS
            )
        if not 0 <= handshakes_per_address <= MAX_HANDSHAKES_PER_ADDRESS:
            raise ConfigError(
                f"max handshakes per address {handshakes_per_address}: between 0 (no cap) and "
                f"{MAX_HANDSHAKES_PER_ADDRESS}"
            )
        if max_handshakes is None:
            max_handshakes = _count_from_env(
                env, "NBDWORKER_MAX_HANDSHAKES", DEFAULT_MAX_HANDSHAKES
            )
        if not 0 <= max_handshakes <= MAX_MAX_HANDSHAKES:
            raise ConfigError(
                f"max handshakes {max_handshakes}: between 0 (no cap) and {MAX_MAX_HANDSHAKES}"
            )
        return cls(
            storage_roots=roots,
            listen=tuple(parse_listen(x) for x in listen),
            node=env.get("NBDWORKER_NODE") or "default",
            busy_poll_us=busy_poll_us,
            storage_roots_given=tuple(os.path.abspath(r) for r in storage_roots),
            handshakes_per_address=handshakes_per_address,
            max_handshakes=max_handshakes,
        )

    @property
    def root_spellings(self) -> tuple[tuple[str, str], ...]:
        """(as given, real path) of each storage root, for nbdworker/imagefile.py."""
        given = self.storage_roots_given or self.storage_roots
        return tuple(zip(given, self.storage_roots, strict=True))


def _count_from_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ConfigError(f"{name}={raw!r}: expected a number (0: no cap)")
    return int(raw)
