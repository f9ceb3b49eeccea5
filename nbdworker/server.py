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
import errno
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor

from nbdworker.backendholds import BackendHolds, reusable_backend
from nbdworker.backends import Backend, FileBackend, MemoryBackend
from nbdworker.connection import NBDConnection
from nbdworker.contract.config import ExportConfig, WorkerConfig, tls_refusal
from nbdworker.exports import ExportEntry, ServerState
from nbdworker.imagefile import ImageRefused, RefusalReason, open_image
from nbdworker.listeners import Listener, bind_listeners, close_listeners
from nbdworker.metrics import connection_totals
from nbdworker.protocol import ExportView, TLSMode, TransmissionFlag
from nbdworker.reload import ending_reason
from nbdworker.session import HandshakeFailure
from nbdworker.settings import WorkerSettings
from nbdworker.slots import ConnectionSlots
from nbdworker.spin import IdleSpinner
from nbdworker.stats import WorkerStats
from nbdworker.stopsignals import stop_signals
from nbdworker.tls import TLSContextCache, TLSSetupError

__all__ = ["ExportEntry", "NBDServer", "ServerState"]

log = logging.getLogger("nbdworker")

# How long a graceful shutdown waits for connections to finish before cutting them off.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# A serving process that is not the least loaded leaves a new connection to a sibling and
# looks again after this long (in case the sibling is busy).
ACCEPT_DEFER = 0.005
# Connections accepted per readiness callback before the loop serves others again.
ACCEPT_BATCH = 16
# The serving-thread pool's own cap, far above any connection limit: threads are made only
# when no idle one is left, so there are as many as the most connections served at once.
SERVING_THREADS_MAX = 1 << 16


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


def _open_backend(
    cfg: ExportConfig,
    settings: WorkerSettings,
    shared_memory: str | None = None,
    refused: Callable[[str, str], None] = lambda reason, line: log.error("%s", line),
) -> Backend | None:
    """The export's backend, or None when it is refused (`refused(reason, log line)`: the
    caller logs it)."""
    if cfg.backend == "memory":
        if shared_memory is not None:
            return _shared_memory_backend(cfg, shared_memory)
        return MemoryBackend(cfg.size or 0, read_only=cfg.read_only)
    assert cfg.path is not None
    try:
        fd = open_image(
            cfg.path,
            settings.root_spellings,
            writable=not cfg.read_only,
            identity=cfg.image_identity,
        )
    except ImageRefused as exc:
        refused(exc.reason, f"export {cfg.name!r} refused: {exc}")
        return None
    try:
        return FileBackend(cfg.path, read_only=cfg.read_only, fd=fd)
    except OSError as exc:
        refused(
            RefusalReason.OPEN_FAILED, f"export {cfg.name!r} refused: cannot open {cfg.path}: {exc}"
        )
        return None


def _shared_memory_backend(cfg: ExportConfig, prefix: str) -> Backend | None:
    """A memory export of several serving processes: one sparse file in shared memory (tmpfs)
    that all of them open, so a block written through one is read through another. Named after
    the export's whole config, as a single process starts a new RAM disk when that changes."""
    ident = hashlib.blake2b(
        json.dumps(cfg.to_dict(), sort_keys=True).encode(), digest_size=12
    ).hexdigest()
    path = f"{prefix}-{ident}"
    size = cfg.size or 0
    try:
        # /dev/shm is writable by anyone: a symlink or a FIFO planted at the name must not be
        # followed or opened, nor someone else's file used.
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600
        )
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise OSError(errno.EPERM, f"{path} is not a file of ours")
            os.set_blocking(fd, True)
            if st.st_size != size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return FileBackend(path, read_only=cfg.read_only, fd=fd)
    except OSError as exc:
        log.error("export %r refused: cannot create its shared memory: %s", cfg.name, exc)
        return None


def handshake_peer_key(address: str) -> str:
    """Whom `address` counts as for the per-address handshake cap: an IPv6 peer by its /64 (one
    host usually has a whole /64 to pick addresses from), an IPv4-mapped one by its IPv4
    address, an IPv4 peer by its address."""
    if ":" not in address:
        # An AF_INET peername is already a canonical dotted quad; parsing it costs microseconds
        # on every connect.
        return address
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class NBDServer:
    def __init__(
        self,
        settings: WorkerSettings,
        config: WorkerConfig,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        slots: ConnectionSlots | None = None,
        shared_memory: str | None = None,
        stats: WorkerStats | None = None,
    ) -> None:
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        self.state = ServerState(WorkerConfig())
        # Who holds each open image: closed when nobody does (nbdworker/backendholds.py).
        self.backend_holds = BackendHolds()
        self.connections: set[NBDConnection] = set()
        # Connection counts, global and per export name, across config generations (an
        # export's max_connections is a property of the export, not of one snapshot) and
        # across serving processes when there are several (nbdworker/slots.py).
        self.slots = slots if slots is not None else ConnectionSlots.create()
        # Path prefix for memory exports shared by serving processes (None: private RAM disks).
        self.shared_memory = shared_memory
        self._balanced = self.slots.processes > 1
        self._owned_listeners: list[Listener] = []
        self._listeners: list[Listener] = []  # served here, owned or inherited
        self._adopting: set[asyncio.Task] = set()  # accepted sockets being wrapped
        self._preadmitted = 0  # accepted and counted, connection_made still to come
        # Connections still negotiating, per client address (settings.handshakes_per_address),
        # and in all (settings.max_handshakes).
        self._handshaking: dict[str, int] = {}
        self._handshakes = 0
        self.spinner = IdleSpinner(settings.busy_poll_us)
        self._spin_pending = False
        # Thread pool for I/O that may block (flush, fallocate, cold reads); reads from the page
        # cache and plain writes run inline (nbdworker/connection/commands.py, bench/README.md).
        self.tls_contexts = TLSContextCache()
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="nbdio")
        # One thread per plain connection in transmission (connection/serving.py), reused
        # across connections; admit() bounds how many there are, not this pool.
        self.serving_threads = ThreadPoolExecutor(
            max_workers=SERVING_THREADS_MAX, thread_name_prefix="nbdconn"
        )
        self._servers: list[asyncio.AbstractServer] = []
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._forced = False
        self.stats = stats if stats is not None else WorkerStats()
        self.apply_config(config)

    # -- configuration --------------------------------------------------------------------------

    async def apply_changes(self, config: WorkerConfig, changed: Collection[str]) -> None:
        """`apply_config(config, changed)`, with the changed exports' images opened (or, for one
        kept open, stat'ed and fstat'ed) in the executor, off the event loop; then the swap on
        the loop. A config applied meanwhile (none is, from one config source) makes this one
        open its images on the loop instead."""
        base = self.state
        if config.tls.mode != base.config.tls.mode:
            self.apply_config(config)  # a new mode may refuse any export: all are compared
            return
        wanted = [cfg for cfg in config.exports if cfg.name in changed]
        refusals: list[tuple[str, str]] = []
        prepared = await asyncio.get_running_loop().run_in_executor(
            self.executor,
            self._prepare_entries,
            wanted,
            config.tls.mode,
            base,
            lambda reason, line: refusals.append((reason, line)),
        )
        # Logged here, on the loop, just before the swap (no await in between): once a refusal
        # is in the log, the export is no longer served.
        for reason, line in refusals:
            self._refused(reason, line)
        if self.state is not base:
            for name, entry in prepared.items():
                prev = base.exports.get(name)
                if entry is not None and (prev is None or entry.backend is not prev.backend):
                    entry.backend.close()
            self.apply_config(config, changed)
            return
        self.apply_config(config, changed, prepared)

    def _prepare_entries(
        self,
        wanted: list[ExportConfig],
        tls_mode: str,
        base: ServerState,
        refused: Callable[[str, str], None],
    ) -> dict[str, ExportEntry | None]:
        return {
            cfg.name: self._export_entry(cfg, tls_mode, base.exports.get(cfg.name), refused)
            for cfg in wanted
        }

    def apply_config(
        self,
        config: WorkerConfig,
        changed: Collection[str] | None = None,
        prepared: dict[str, ExportEntry | None] | None = None,
    ) -> None:
        """Swap in a new configuration; existing connections keep the one they started with.

        `changed`: the export names (before and after) in which `config` may differ from the
        config applied (nbdworker/configsource.py knows them from the entries it read). Only
        those are compared and (re)opened; every other export keeps its entry, open image and
        all, untouched (no comparison, no fstat). None, or a new TLS mode (which may refuse any
        export: `tls_refusal`), compares every export, as at start and after a resync.
        `prepared`: the changed exports' entries, made off the loop (`apply_changes`).
        """
        old = self.state.exports
        if changed is not None and config.tls.mode != self.state.config.tls.mode:
            changed = None
        exports: dict[str, ExportEntry] = {}
        for cfg in config.exports:
            if changed is not None and cfg.name not in changed:
                # Unchanged since the config applied: served (or not) as it was.
                kept = old.get(cfg.name)
                if kept is not None:
                    exports[cfg.name] = kept
                continue
            if prepared is not None and cfg.name in prepared:
                entry = prepared[cfg.name]
            else:
                entry = self._export_entry(cfg, config.tls.mode, old.get(cfg.name), self._refused)
            if entry is not None:
                exports[cfg.name] = entry
        # The backends this generation no longer serves close when the last connection using
        # them lets go (backendholds.py), so nothing is closed under a live client.
        tls_context = None
        if config.tls.mode != "NOTLS":
            try:
                tls_context = self.tls_contexts.get(config.tls)
            except TLSSetupError as exc:
                # Never fall back to plaintext: STARTTLS will be acked and the connection dropped
                # until a usable policy arrives.
                log.error("TLS policy unusable, TLS connections will fail: %s", exc)
        previous = self.state
        self.state = ServerState(config, exports, TLSMode[config.tls.mode], tls_context)
        self.backend_holds.pass_on(previous, self.state, changed)
        log.info(
            "config generation %d applied: %d export(s) served", config.generation, len(exports)
        )
        self.stats.generation = config.generation
        self.end_affected_connections()

    def _refused(self, reason: str, line: str) -> None:
        log.error("%s", line)
        self.stats.export_refused(reason)

    def _export_entry(
        self,
        cfg: ExportConfig,
        tls_mode: str,
        prev: ExportEntry | None,
        refused: Callable[[str, str], None],
    ) -> ExportEntry | None:
        """What `cfg` serves: `prev` when nothing changed, else its image reused or opened (and
        proven, nbdworker/imagefile.py); None when it is disabled or refused (`refused(why, line)`).
        Touches nothing of the server's state: it may run in the executor."""
        if not cfg.enabled:
            return None
        # Checked before an open backend is reused: the export may be unchanged while the
        # mode is not (SELECTIVETLS -> OPTIONALTLS).
        refusal = tls_refusal(cfg, tls_mode)
        if refusal is not None:
            # Absent from LIST, INFO/GO answered UNKNOWN, live sessions ended: never served
            # in plaintext while the admin believes it is TLS-only.
            refused("tls_mode", f"export {cfg.name!r} refused: {refusal}")
            return None
        if prev is not None and prev.config == cfg and not prev.backend.size_changed():
            return prev
        # A description or rule edit keeps the open image (one descriptor per image, not
        # one per change); anything else opens it anew.
        backend = reusable_backend(prev, cfg) or _open_backend(
            cfg, self.settings, self.shared_memory, refused
        )
        if backend is None:
            return None
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
        log.info(
            "export %r: %s backend, %d bytes%s",
            cfg.name,
            cfg.backend,
            backend.size,
            ", read-only" if view.flags & TransmissionFlag.READ_ONLY else "",
        )
        return ExportEntry(cfg, backend, view)

    def end_affected_connections(self) -> None:
        """End, gracefully, the connections the current config withdraws (nbdworker/reload.py);
        connections still negotiating are checked when they open their export."""
        for conn in list(self.connections):
            record = conn.record
            if record.entry is None or record.ending:
                continue
            reason = ending_reason(record, self.state)
            if reason is not None:
                log.info(
                    "%s: export %r: %s: ending the connection gracefully",
                    record.peer,
                    record.export,
                    reason,
                )
                conn.shutdown()

    # -- listeners ------------------------------------------------------------------------------

    def _factory(self) -> Callable[[], asyncio.BaseProtocol]:
        return lambda: NBDConnection(self)

    async def start(self, listeners: list[Listener] | None = None) -> list[str]:
        """Serve on `listeners` (inherited from a supervisor), or bind the configured ones;
        return their printable addresses (actual ports)."""
        if listeners is None:
            listeners = self._owned_listeners = bind_listeners(self.settings.listen)
        loop = asyncio.get_running_loop()
        self._listeners = list(listeners)
        for listener in listeners:
            # A new connection ends a spin as a request does (nbdworker/spin.py).
            if self.spinner.enabled:
                self.spinner.watch(listener.sock.fileno())
            if self._balanced:
                # Several serving processes share these sockets: accept only while no sibling
                # has fewer connections, so nbdcopy's four connections land two and two.
                loop.add_reader(listener.sock.fileno(), self._acceptable, listener)
            elif listener.unix_path is not None or listener.sock.family == socket.AF_UNIX:
                self._servers.append(
                    await loop.create_unix_server(self._factory(), sock=listener.sock)
                )
            else:
                self._servers.append(await loop.create_server(self._factory(), sock=listener.sock))
        return [listener.text for listener in listeners]

    def request_spin(self) -> None:
        """A connection answered everything it had: poll for the next request before the loop
        sleeps (nbdworker/spin.py). Once per loop pass, after the pass's writes are out."""
        if self._spin_pending or self._stopping or self._adopting or not self.spinner.enabled:
            return
        self._spin_pending = True
        asyncio.get_running_loop().call_soon(self._spin)

    def _spin(self) -> None:
        self._spin_pending = False
        # A connection accepted meanwhile is being set up by a task: spinning would delay it.
        if not self._stopping and not self._adopting:
            self.spinner.spin()

    def _acceptable(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        fd = listener.sock.fileno()
        if not self.slots.least_loaded():
            loop.remove_reader(fd)
            loop.call_later(ACCEPT_DEFER, self._watch_again, listener)
            return
        for _ in range(ACCEPT_BATCH):
            if not self.slots.least_loaded():
                return  # a sibling now has fewer: the rest are its to take
            try:
                sock, addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and the like: the connection stays in the backlog; look again later.
                log.warning("accept on %s failed: %s", listener.text, exc)
                loop.remove_reader(fd)
                loop.call_later(0.1, self._watch_again, listener)
                return
            # Counted now, not when the connection is set up on a later loop pass: clients that
            # connect at once (nbdcopy opens its connections together) must see this one.
            if self._stopping or not self.slots.try_open_connection(
                self.state.config.limits.max_connections
            ):
                peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
                log.warning("%s: refused: connection limit reached or shutting down", peer)
                sock.close()
                continue
            self._preadmitted += 1
            task = loop.create_task(self._adopt(sock))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    def _watch_again(self, listener: Listener) -> None:
        if not self._stopping:
            asyncio.get_running_loop().add_reader(
                listener.sock.fileno(), self._acceptable, listener
            )

    async def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._factory(), sock)
        except OSError as exc:
            log.debug("accepted connection lost at once: %s", exc)
            sock.close()
            self._preadmitted -= 1
            self.slots.close_connection()

    def _stop_listening(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            self.spinner.forget(listener.sock.fileno())
            if self._balanced:
                loop.remove_reader(listener.sock.fileno())
        for server in self._servers:
            server.close()
        close_listeners(self._owned_listeners)

    # -- connection bookkeeping -----------------------------------------------------------------

    def admit(self, conn: NBDConnection) -> bool:
        """Count a new connection in, unless the worker is full or stopping."""
        if self._preadmitted:
            # Counted when it was accepted (_acceptable).
            self._preadmitted -= 1
            if self._stopping:
                self.slots.close_connection()
                return False
        elif self._stopping or not self.slots.try_open_connection(
            self.state.config.limits.max_connections
        ):
            return False
        self.connections.add(conn)
        return True

    def handshake_started(self, address: str) -> str | None:
        """Count a connection from `address` ("" for a Unix-socket peer) into the handshake;
        None, or why not (a `HandshakeFailure`): this process already negotiates with as many
        connections as settings.max_handshakes allows, or that peer (its IPv6 /64:
        handshake_peer_key) with as many as its cap allows (one peer must not take every
        slot)."""
        limit = self.settings.max_handshakes
        if limit and self._handshakes >= limit:
            return HandshakeFailure.HANDSHAKE_LIMIT
        if address:
            cap = self.settings.handshakes_per_address
            key = handshake_peer_key(address)
            n = self._handshaking.get(key, 0)
            if cap and n >= cap:
                return HandshakeFailure.HANDSHAKE_CAP
            self._handshaking[key] = n + 1
        self._handshakes += 1
        return None

    def handshake_ended(self, address: str) -> None:
        self._handshakes -= 1
        if not address:
            return
        key = handshake_peer_key(address)
        n = self._handshaking.get(key, 0) - 1
        if n > 0:
            self._handshaking[key] = n
        else:
            self._handshaking.pop(key, None)

    def export_slot_free(self, entry: ExportEntry) -> bool:
        # Checked at INFO/GO and counted at the start of transmission: between the two, a
        # sibling process may count one more (a window of microseconds).
        limit = entry.config.max_connections
        return limit == 0 or self.slots.export_connections(entry.config.name) < limit

    def export_opened(self, name: str) -> None:
        self.slots.open_export(name)
        self.stats.export_opened(name)

    def export_closed(self, name: str) -> None:
        self.slots.close_export(name)

    def connection_closed(self, conn: NBDConnection) -> None:
        if conn in self.connections:
            record = conn.record
            if record.export is not None:
                self.stats.retire(record.export, record.counts, record.errors)
            elif record.handshake_failure is not None:
                self.stats.handshake_failed(record.handshake_failure)
            self.connections.discard(conn)
            self.slots.close_connection()
        if self._stopping and not self.connections and self._stop_event is not None:
            self._stop_event.set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM, then shut down gracefully (second signal: force)."""
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: forcing shutdown", signal.Signals(signum).name)
                self.force_close()
            else:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                stop.set()

        with stop_signals(on_signal):
            await stop.wait()
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting; let each connection finish what it has in flight; then close."""
        self._stopping = True
        self._stop_event = asyncio.Event()
        self._stop_listening()
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
        self.serving_threads.shutdown(wait=False)
        log.info("stopped")

    # -- what the status publisher and the metrics ask (nbdworker/status.py, metrics.py) ------

    async def session_report(self, node: str) -> dict[str, dict]:
        """session id -> public view of each connection in transmission."""
        return {
            conn.record.id: conn.record.public_view(node)
            for conn in list(self.connections)
            if conn.record.entry is not None
        }

    async def end_sessions(self, ids: set[str]) -> None:
        """End, gracefully, the sessions an administrator kicked."""
        for conn in list(self.connections):
            record = conn.record
            if record.id in ids and record.entry is not None:
                log.info(
                    "%s: session %s on export %r ended by an administrator",
                    record.peer,
                    record.id,
                    record.export,
                )
                conn.shutdown()

    async def metric_totals(self) -> dict:
        fast_paths = {name: e.backend.fast_paths() for name, e in self.state.exports.items()}
        return connection_totals(self.stats, [conn.record for conn in self.connections], fast_paths)

    def force_close(self) -> None:
        self._forced = True
        for conn in list(self.connections):
            conn.abort()
        if self._stop_event is not None:
            self._stop_event.set()
