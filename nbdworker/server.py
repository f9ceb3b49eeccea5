"""Listeners, the export table and the worker's lifecycle.

startup (open exports, bind listeners) -> serve -> graceful shutdown (stop accepting, let
requests in flight finish, close). A second SIGINT/SIGTERM forces the end.

Configuration is held in one immutable `ServerState` that `apply_config` replaces in a single
assignment: a connection takes the state current when it was accepted and keeps it for its
whole life, so a reload never changes an export underneath a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nbdworker.backends import Backend, FileBackend, MemoryBackend
from nbdworker.config import (
    ExportConfig,
    ListenAddress,
    WorkerConfig,
    WorkerSettings,
    tls_refusal,
)
from nbdworker.metrics import WorkerStats
from nbdworker.protocol import ExportView, TLSMode, TransmissionFlag
from nbdworker.reload import ending_reason
from nbdworker.tls import TLSContextCache, TLSSetupError

__all__ = ["ExportEntry", "NBDServer", "ServerState"]

log = logging.getLogger("nbdworker")

# How long a graceful shutdown waits for connections to finish before cutting them off.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


@dataclass(eq=False, slots=True)
class ExportEntry:
    config: ExportConfig
    backend: Backend
    view: ExportView


def export_flags(cfg: ExportConfig, backend: Backend) -> TransmissionFlag:
    flags = TransmissionFlag.HAS_FLAGS
    read_only = cfg.read_only or backend.read_only
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    if cfg.flush and backend.can_flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if cfg.fua and backend.can_fua:
        flags |= TransmissionFlag.SEND_FUA
    if not read_only:
        if cfg.trim and backend.can_trim:
            flags |= TransmissionFlag.SEND_TRIM
        if cfg.write_zeroes and backend.can_zero:
            flags |= TransmissionFlag.SEND_WRITE_ZEROES
            if cfg.fast_zero and backend.can_fast_zero:
                flags |= TransmissionFlag.SEND_FAST_ZERO
    if cfg.cache and backend.can_cache:
        flags |= TransmissionFlag.SEND_CACHE
    if cfg.multi_conn and backend.can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return flags


@dataclass(frozen=True, slots=True)
class ServerState:
    """One configuration generation, with its exports opened."""

    config: WorkerConfig
    exports: dict[str, ExportEntry] = field(default_factory=dict)
    tls_mode: TLSMode = TLSMode.NOTLS
    # The server context of this generation's TLS policy (None: NOTLS, or the policy is unusable).
    tls_context: ssl.SSLContext | None = None

    def lookup(self, name: str) -> ExportEntry | None:
        if name == "" and self.config.default_export is not None:
            name = self.config.default_export
        return self.exports.get(name)


def _open_backend(cfg: ExportConfig, settings: WorkerSettings) -> Backend | None:
    if cfg.backend == "memory":
        return MemoryBackend(cfg.size or 0, read_only=cfg.read_only)
    assert cfg.path is not None
    if not settings.path_allowed(cfg.path):
        log.error(
            "export %r refused: %s is not under a storage root (%s)",
            cfg.name,
            os.path.realpath(cfg.path),
            ", ".join(settings.storage_roots),
        )
        return None
    try:
        return FileBackend(os.path.realpath(cfg.path), read_only=cfg.read_only)
    except OSError as exc:
        log.error("export %r refused: cannot open %s: %s", cfg.name, cfg.path, exc)
        return None


def _image_resized(entry: ExportEntry) -> bool:
    """Whether a file export's image changed size since it was opened (a resize job): it is
    then reopened, so new connections see the new size while live ones keep theirs."""
    backend = entry.backend
    if not isinstance(backend, FileBackend) or backend.is_block:
        return False
    try:
        return os.fstat(backend.fd).st_size != entry.view.size
    except OSError:
        return True


class NBDServer:
    def __init__(
        self,
        settings: WorkerSettings,
        config: WorkerConfig,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        self.state = ServerState(WorkerConfig())
        self.connections: set = set()
        # Live connections per export name, across config generations: max_connections is a
        # property of the export, not of one snapshot.
        self.export_connections: dict[str, int] = {}
        # Thread pool for I/O that may block (flush, fallocate, cold reads); reads from the page
        # cache and plain writes run inline (see connection.py for the measurements).
        self.tls_contexts = TLSContextCache()
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="nbdio")
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._forced = False
        self.stats = WorkerStats()
        self.apply_config(config)

    # -- configuration --------------------------------------------------------------------------

    def apply_config(self, config: WorkerConfig) -> None:
        """Swap in a new configuration; existing connections keep the one they started with."""
        old = self.state.exports
        exports: dict[str, ExportEntry] = {}
        for cfg in config.exports:
            if not cfg.enabled:
                continue
            # Checked before an open backend is reused: the export may be unchanged while the
            # mode is not (SELECTIVETLS -> OPTIONALTLS).
            refusal = tls_refusal(cfg, config.tls.mode)
            if refusal is not None:
                # Absent from LIST, INFO/GO answered UNKNOWN, live sessions ended: never served
                # in plaintext while the admin believes it is TLS-only.
                log.error("export %r refused: %s", cfg.name, refusal)
                continue
            prev = old.get(cfg.name)
            if prev is not None and prev.config == cfg and not _image_resized(prev):
                exports[cfg.name] = prev
                continue
            backend = _open_backend(cfg, self.settings)
            if backend is None:
                continue
            view = ExportView(
                name=cfg.name,
                description=cfg.description,
                size=backend.size,
                flags=export_flags(cfg, backend),
                min_block=cfg.min_block_size,
                preferred_block=cfg.preferred_block_size,
                max_block=cfg.max_block_size,
                tls_required=cfg.tls_required,
            )
            exports[cfg.name] = ExportEntry(cfg, backend, view)
            log.info(
                "export %r: %s backend, %d bytes%s",
                cfg.name,
                cfg.backend,
                backend.size,
                ", read-only" if view.flags & TransmissionFlag.READ_ONLY else "",
            )
        # Retired backends close when the last connection using them lets go (FileBackend
        # closes its descriptor when collected), so nothing is closed under a live client.
        tls_context = None
        if config.tls.mode != "NOTLS":
            try:
                tls_context = self.tls_contexts.get(config.tls)
            except TLSSetupError as exc:
                # Never fall back to plaintext: STARTTLS will be acked and the connection dropped
                # until a usable policy arrives.
                log.error("TLS policy unusable, TLS connections will fail: %s", exc)
        self.state = ServerState(config, exports, TLSMode[config.tls.mode], tls_context)
        log.info(
            "config generation %d applied: %d export(s) served", config.generation, len(exports)
        )
        self.stats.generation = config.generation
        self.end_affected_connections()

    def end_affected_connections(self) -> None:
        """End, gracefully, the connections the current config withdraws (nbdworker/reload.py);
        connections still negotiating are checked when they open their export."""
        for conn in list(self.connections):
            if conn.entry is None or conn.shutting_down:
                continue
            reason = ending_reason(conn, self.state)
            if reason is not None:
                log.info(
                    "%s: export %r: %s: ending the connection gracefully",
                    conn.peer,
                    conn.entry.config.name,
                    reason,
                )
                conn.shutdown()

    # -- listeners ------------------------------------------------------------------------------

    def _factory(self) -> Callable[[], asyncio.BaseProtocol]:
        from nbdworker.connection import NBDConnection

        return lambda: NBDConnection(self)

    async def start(self) -> list[str]:
        """Bind every listener; return their printable addresses (actual ports)."""
        loop = asyncio.get_running_loop()
        bound: list[str] = []
        for addr in self.settings.listen:
            bound.extend(await self._listen(loop, addr))
        return bound

    async def _listen(self, loop: asyncio.AbstractEventLoop, addr: ListenAddress) -> list[str]:
        if addr.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(addr.path).st_mode):
                    os.unlink(addr.path)
            server = await loop.create_unix_server(self._factory(), addr.path, backlog=1024)
            self._servers.append(server)
            self._unix_paths.append(addr.path)
            log.info("listening on unix:%s", addr.path)
            return [f"unix:{addr.path}"]
        host = addr.host
        server = await loop.create_server(
            self._factory(), host, addr.port, reuse_address=True, backlog=1024
        )
        self._servers.append(server)
        result = []
        for sock in server.sockets:
            sockname = sock.getsockname()
            if sock.family == socket.AF_INET6:
                text = f"[{sockname[0]}]:{sockname[1]}"
            else:
                text = f"{sockname[0]}:{sockname[1]}"
            log.info("listening on %s", text)
            result.append(text)
        return result

    # -- connection bookkeeping -----------------------------------------------------------------

    def connection_allowed(self) -> bool:
        return (
            not self._stopping and len(self.connections) < self.state.config.limits.max_connections
        )

    def export_slot_free(self, entry: ExportEntry) -> bool:
        limit = entry.config.max_connections
        return limit == 0 or self.export_connections.get(entry.config.name, 0) < limit

    def export_opened(self, name: str) -> None:
        self.export_connections[name] = self.export_connections.get(name, 0) + 1
        self.stats.export_opened(name)

    def export_closed(self, name: str) -> None:
        left = self.export_connections.get(name, 0) - 1
        if left > 0:
            self.export_connections[name] = left
        else:
            self.export_connections.pop(name, None)

    def connection_closed(self, conn) -> None:
        if conn in self.connections:
            if conn.entry is not None:
                self.stats.retire(conn.entry.config.name, conn.counts, conn.errors)
            elif conn.hs_failure is not None:
                self.stats.handshake_failed(conn.hs_failure)
        self.connections.discard(conn)
        if self._stopping and not self.connections and self._stop_event is not None:
            self._stop_event.set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM, then shut down gracefully (second signal: force)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: forcing shutdown", signal.Signals(signum).name)
                self.force_close()
            else:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                stop.set()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await stop.wait()
            await self.shutdown()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def shutdown(self) -> None:
        """Stop accepting; let each connection finish what it has in flight; then close."""
        self._stopping = True
        self._stop_event = asyncio.Event()
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            log.info("waiting for %d connection(s) to finish", len(self.connections))
            try:
                await asyncio.wait_for(self._stop_event.wait(), self.shutdown_timeout)
            except TimeoutError:
                log.warning("shutdown timeout: closing %d connection(s)", len(self.connections))
                self.force_close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self.executor.shutdown(wait=not self._forced, cancel_futures=self._forced)
        log.info("stopped")

    def force_close(self) -> None:
        self._forced = True
        for conn in list(self.connections):
            conn.abort()
        if self._stop_event is not None:
            self._stop_event.set()
