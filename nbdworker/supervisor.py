"""Several serving processes for one worker (``--workers N``).

One Python process serves its connections on one core. With ``--workers N`` the process started
as ``python -m nbdworker`` becomes a supervisor: it binds the listeners, follows the config
(Redis or ``--config``), publishes the heartbeat and sessions and serves the metrics, and it
starts N serving processes that inherit the listening sockets and serve the connections, each
on its own event loop. A serving process accepts only while no sibling has fewer connections
(nbdworker/server.py), so a multi-connection client such as nbdcopy is spread over the cores;
connection limits are counted across all of them (nbdworker/slots.py).

The supervisor talks to each serving process over a socketpair ("the link"). Messages are a
4-byte big-endian length and a JSON object:

* supervisor -> serving: ``{"op": "config", "config": {...}}`` (the first one, then every new
  generation the config source read whole), ``{"op": "changes", "previous": g, "config":
  {...everything but the exports...}, "exports": [...], "removed": [names]}`` (a generation the
  source read as changed entries: only the changed exports, applied to generation g),
  ``{"op": "kick", "ids": [...]}``, ``{"op": "report", "id": n}``;
* serving -> supervisor: ``{"op": "ready", "pid": n}`` once it serves,
  ``{"op": "report", "id": n, "sessions": {...}, "totals": {...}}``, and ``{"op": "resync"}``
  when a "changes" message does not follow the generation it serves (the supervisor answers
  with the whole config).

Signals: SIGINT/SIGTERM to the supervisor are passed on (a second one forces, as in a single
process); a serving process that dies unexpectedly is started again; serving processes die with
the supervisor (PR_SET_PDEATHSIG) and end gracefully when their link closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from nbdworker.contract.config import ConfigError, ExportConfig, WorkerConfig
from nbdworker.listeners import Listener, bind_listeners, close_listeners
from nbdworker.metrics import merge_totals
from nbdworker.server import NBDServer
from nbdworker.settings import WorkerSettings
from nbdworker.slots import ConnectionSlots
from nbdworker.stats import WorkerStats
from nbdworker.stopsignals import stop_signals

__all__ = ["SERVING_ENV", "Supervisor", "default_workers", "serve_as_child"]

log = logging.getLogger("nbdworker")

# Set (to a JSON spec) in a serving process's environment; its absence makes a supervisor.
SERVING_ENV = "NBDWORKER_SERVING_PROCESS"
MAX_MESSAGE = 64 << 20
# How long the supervisor waits for a serving process to start, and to answer a report.
START_TIMEOUT = 30.0
REPORT_TIMEOUT = 3.0
# A serving process that died is started again after this long (not in a tight loop).
RESTART_DELAY = 1.0
_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """One serving process per core but one, at least one and at most 8.

    The node's other work needs a core too: the Celery worker's image jobs (clone, wipe, verify)
    run beside nbdworker, and the kernel's network and page-cache work for the clients runs on
    the same CPUs. Measured on a 2-vCPU VM with the client on the same machine, two serving
    processes took CPU from the client: nbdcopy was preempted ~4,000 times per GiB read instead
    of ~150 and reads slowed down (bench/README.md). Beyond 8, the supervisor's reports and the
    accept balancing cost more than another process gains.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 8))


def remove_stale_shared_memory(directory: str) -> list[str]:
    """Remove the memory-export files of supervisors that are gone (killed before they could
    clean up); return what was removed. A file is stale when no process has its pid."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), "nbdworker-*-*")):
        pid_text = os.path.basename(path).split("-")[1]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    if removed:
        log.info("removed %d memory-export file(s) left by stopped workers", len(removed))
    return removed


def encode_message(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the link."""
    try:
        head = await reader.readexactly(4)
        size = int.from_bytes(head, "big")
        if size > MAX_MESSAGE:
            raise ValueError(f"link message of {size} bytes")
        return json.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class ServingProcess:
    """The supervisor's handle on one serving process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready: asyncio.Future | None = None
        self.reports: dict[int, asyncio.Future] = {}
        self.task: asyncio.Task | None = None
        self.pid = 0

    def send(self, message: dict[str, Any]) -> bool:
        writer = self.writer
        if writer is None or writer.is_closing():
            return False
        writer.write(encode_message(message))
        return True


class Supervisor:
    def __init__(
        self,
        settings: WorkerSettings,
        config: WorkerConfig,
        processes: int,
        argv: list[str],
        shutdown_timeout: float,
        stats: WorkerStats | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.processes = processes
        self.argv = argv
        self.shutdown_timeout = shutdown_timeout
        self.stats = stats if stats is not None else WorkerStats()
        self.stats.generation = config.generation
        self.slots = ConnectionSlots.create(processes)
        self.children = [ServingProcess(i) for i in range(processes)]
        self.listeners: list[Listener] = []
        self._stopping = False
        # Memory exports live in shared memory files under this prefix (removed at the end).
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.shared_memory = os.path.join(shm_dir, f"nbdworker-{os.getpid()}")
        remove_stale_shared_memory(shm_dir)
        self._report_id = 0
        self._all_exited: asyncio.Event | None = None

    # -- starting -------------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Bind the listeners, start every serving process, wait until all of them serve."""
        self.listeners = bind_listeners(self.settings.listen)
        self._all_exited = asyncio.Event()
        try:
            for child in self.children:
                await self._spawn(child)
            await asyncio.wait_for(
                asyncio.gather(*(c.ready for c in self.children if c.ready is not None)),
                START_TIMEOUT,
            )
        except (OSError, TimeoutError, RuntimeError) as exc:
            await self.shutdown()
            raise OSError(f"serving processes did not start: {exc}") from None
        log.info(
            "%d serving processes (pids %s)",
            self.processes,
            ", ".join(str(c.pid) for c in self.children),
        )
        return [listener.text for listener in self.listeners]

    async def _spawn(self, child: ServingProcess) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = {
            "index": child.index,
            "processes": self.processes,
            "supervisor": os.getpid(),
            "link": theirs.fileno(),
            "slots": self.slots.fd,
            "shared_memory": self.shared_memory,
            "listeners": [[lst.sock.fileno(), lst.text, lst.unix_path] for lst in self.listeners],
        }
        env = dict(os.environ)
        env[SERVING_ENV] = json.dumps(spec)
        try:
            child.proc = subprocess.Popen(
                [sys.executable, "-m", "nbdworker", *self.argv],
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno(), self.slots.fd]
                + [lst.sock.fileno() for lst in self.listeners],
                # Signals reach it from us only: a Ctrl-C in the terminal must not count twice.
                start_new_session=True,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        child.writer = writer
        child.ready = loop.create_future()
        child.send({"op": "config", "config": self.config.to_dict()})
        child.task = loop.create_task(self._follow(child, reader))

    async def _follow(self, child: ServingProcess, reader: asyncio.StreamReader) -> None:
        """Read one serving process's messages until its link ends, then restart it."""
        while True:
            message = await read_message(reader)
            if message is None:
                break
            op = message.get("op")
            if op == "ready":
                child.pid = int(message.get("pid", 0))
                if child.ready is not None and not child.ready.done():
                    child.ready.set_result(None)
            elif op == "report":
                future = child.reports.pop(int(message.get("id", -1)), None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif op == "resync":
                log.warning("serving process %d asked for the whole config", child.index)
                child.send({"op": "config", "config": self.config.to_dict()})
        await self._ended(child)

    async def _ended(self, child: ServingProcess) -> None:
        proc = child.proc
        code = None
        if proc is not None:
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        if child.writer is not None:
            child.writer.close()
        child.writer = None
        for future in child.reports.values():
            if not future.done():
                future.cancel()
        child.reports.clear()
        # Its connections are gone with it: its counts must not hold slots forever.
        self.slots.reset(child.index)
        if child.ready is not None and not child.ready.done():
            child.ready.set_exception(RuntimeError(f"serving process exited with {code}"))
        if self._stopping:
            log.debug("serving process %d (pid %s) exited with %s", child.index, child.pid, code)
            if all(c.writer is None for c in self.children) and self._all_exited is not None:
                self._all_exited.set()
            return
        log.error(
            "serving process %d (pid %s) exited with %s: starting it again",
            child.index,
            child.pid,
            code,
        )
        await asyncio.sleep(RESTART_DELAY)
        if self._stopping:
            return
        await self._spawn(child)
        try:
            await asyncio.wait_for(asyncio.shield(child.ready), START_TIMEOUT)
        except (TimeoutError, RuntimeError) as exc:
            log.error("serving process %d did not start again: %s", child.index, exc)
            return
        log.info("serving process %d serves again (pid %d)", child.index, child.pid)

    # -- what the config source, the status publisher and the metrics call ---------------------

    def apply_config(self, config: WorkerConfig, changed: Collection[str] | None = None) -> None:
        previous, self.config = self.config, config
        self.stats.generation = config.generation
        log.info("config generation %d passed to the serving processes", config.generation)
        if changed is None:
            message = {"op": "config", "config": config.to_dict()}
        else:
            # Only what changed: a 10,000-export config is megabytes of JSON to encode here
            # and to parse in every serving process.
            message = changes_message(previous, config, changed)
        for child in self.children:
            child.send(message)

    async def apply_changes(self, config: WorkerConfig, changed: Collection[str]) -> None:
        self.apply_config(config, changed)

    async def _reports(self) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        waiting = []
        for child in self.children:
            self._report_id += 1
            future = loop.create_future()
            if child.send({"op": "report", "id": self._report_id}):
                child.reports[self._report_id] = future
                waiting.append(future)
        if not waiting:
            return []
        done, pending = await asyncio.wait(waiting, timeout=REPORT_TIMEOUT)
        for future in pending:
            future.cancel()
        if pending:
            log.warning("%d serving process(es) did not report in time", len(pending))
        return [f.result() for f in done if not f.cancelled()]

    async def session_report(self, node: str) -> dict[str, dict]:
        sessions: dict[str, dict] = {}
        for report in await self._reports():
            sessions.update(report.get("sessions", {}))
        return sessions

    async def end_sessions(self, ids: set[str]) -> None:
        message = {"op": "kick", "ids": sorted(ids)}
        for child in self.children:
            child.send(message)

    async def metric_totals(self) -> dict[str, Any]:
        return merge_totals([report["totals"] for report in await self._reports()])

    # -- stopping -------------------------------------------------------------------------------

    async def serve_forever(self) -> None:
        """Until SIGINT/SIGTERM: pass it on, wait for the serving processes to end."""
        stop = asyncio.Event()
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) > 1:
                log.warning("second %s: forcing shutdown", signal.Signals(signum).name)
            else:
                log.info("%s received: shutting down", signal.Signals(signum).name)
            self._signal_children(signum)
            stop.set()

        with stop_signals(on_signal):
            await stop.wait()
            await self.shutdown(signalled=True)

    def _signal_children(self, signum: int) -> None:
        self._stopping = True
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    async def shutdown(self, signalled: bool = False) -> None:
        """Graceful: the serving processes finish what they have; then the listeners close."""
        self._stopping = True
        if not signalled:
            self._signal_children(signal.SIGTERM)
        if self._all_exited is not None and any(c.writer is not None for c in self.children):
            # Each serving process has its own shutdown deadline; this one is the backstop.
            try:
                await asyncio.wait_for(self._all_exited.wait(), self.shutdown_timeout + 5.0)
            except TimeoutError:
                log.warning("serving processes still running: killing them")
                for child in self.children:
                    if child.proc is not None and child.proc.poll() is None:
                        child.proc.kill()
        for child in self.children:
            if child.task is not None and not child.task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(child.task, 5.0)
        close_listeners(self.listeners)
        self.listeners = []
        for path in glob.glob(glob.escape(self.shared_memory) + "-*"):
            with contextlib.suppress(OSError):
                os.unlink(path)
        log.info("stopped")


def changes_message(
    previous: WorkerConfig, config: WorkerConfig, changed: Collection[str]
) -> dict[str, Any]:
    """The "changes" message taking a serving process from `previous` to `config`, which
    differ at most in the exports named in `changed` (and in anything but the exports)."""
    header = replace(config, exports=()).to_dict()
    del header["exports"]
    present = [e for e in config.exports if e.name in changed]
    present_names = {e.name for e in present}
    return {
        "op": "changes",
        "previous": previous.generation,
        "config": header,
        "exports": [e.to_dict() for e in present],
        "removed": sorted(name for name in changed if name not in present_names),
    }


def config_with_changes(current: WorkerConfig, message: dict[str, Any]) -> WorkerConfig:
    """`current` with a "changes" message applied: changed exports replaced where they were
    (new ones last), removed ones dropped. Raises ConfigError (KeyError, TypeError) when the
    message is malformed."""
    header = dict(message["config"])
    default_export = header.pop("default_export", None)
    # Everything but the exports, validated as a config without any.
    base = WorkerConfig.from_dict({**header, "exports": []})
    changed: dict[str, ExportConfig] = {}
    for i, d in enumerate(message["exports"]):
        export = ExportConfig.from_dict(d, f"exports[{i}]")
        if export.name in changed:
            raise ConfigError(f"exports[{i}].name: a duplicate")
        changed[export.name] = export
    removed = message["removed"]
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        raise ConfigError("removed: expected a list of names")
    gone = set(removed)
    exports = []
    for export in current.exports:
        if export.name in gone:
            continue
        exports.append(changed.pop(export.name, export))
    exports.extend(changed.values())
    if default_export is not None and not any(e.name == default_export for e in exports):
        raise ConfigError(f"default_export: names no export: {default_export!r}")
    return replace(base, default_export=default_export, exports=tuple(exports))


# -- the serving process's side ---------------------------------------------------------------


def _die_with_supervisor(supervisor_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor_pid:
        # The supervisor died before the line above took effect.
        os.kill(os.getpid(), signal.SIGTERM)


async def serve_as_child(
    settings: WorkerSettings, spec: dict[str, Any], shutdown_timeout: float
) -> int:
    """Run one serving process: take the config from the link, serve the inherited sockets."""
    _die_with_supervisor(int(spec["supervisor"]))
    link = socket.socket(fileno=int(spec["link"]))
    reader, writer = await asyncio.open_unix_connection(sock=link)
    first = await read_message(reader)
    if first is None or first.get("op") != "config":
        log.error("serving process: no config from the supervisor")
        return 1
    try:
        config = WorkerConfig.from_dict(first["config"])
    except ConfigError as exc:
        log.error("serving process: bad config from the supervisor: %s", exc)
        return 2
    slots = ConnectionSlots(int(spec["slots"]), int(spec["processes"]), int(spec["index"]))
    listeners = [
        Listener(socket.socket(fileno=int(fd)), text, path) for fd, text, path in spec["listeners"]
    ]
    server = NBDServer(
        settings,
        config,
        shutdown_timeout=shutdown_timeout,
        slots=slots,
        shared_memory=spec.get("shared_memory"),
    )
    await server.start(listeners)
    writer.write(encode_message({"op": "ready", "pid": os.getpid()}))
    link_task = asyncio.create_task(_follow_supervisor(reader, writer, server, settings.node))
    try:
        await server.serve_forever()
    finally:
        link_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await link_task
        writer.close()
    return 0


async def _follow_supervisor(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: NBDServer, node: str
) -> None:
    while True:
        message = await read_message(reader)
        if message is None:
            # The supervisor is gone: end like a SIGTERM would (finish what is in flight).
            log.warning("supervisor link closed: shutting down")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        op = message.get("op")
        if op == "config":
            try:
                server.apply_config(WorkerConfig.from_dict(message["config"]))
            except (ConfigError, KeyError) as exc:
                log.error("config from the supervisor refused: %s", exc)
        elif op == "changes":
            current = server.state.config
            if message.get("previous") != current.generation:
                # A generation missed (one refused): the changes do not apply to this one.
                log.warning(
                    "changes to generation %r, this process serves %d: asking for the whole config",
                    message.get("previous"),
                    current.generation,
                )
                writer.write(encode_message({"op": "resync"}))
                continue
            try:
                config = config_with_changes(current, message)
            except (ConfigError, KeyError, TypeError) as exc:
                log.error("config changes from the supervisor refused: %s", exc)
                writer.write(encode_message({"op": "resync"}))
                continue
            names = {e["name"] for e in message["exports"]} | set(message["removed"])
            log.info(
                "generation %d from the supervisor: %d export(s) changed, %d removed",
                config.generation,
                len(message["exports"]),
                len(message["removed"]),
            )
            await server.apply_changes(config, names)
        elif op == "kick":
            await server.end_sessions(set(message.get("ids", ())))
        elif op == "report":
            writer.write(
                encode_message(
                    {
                        "op": "report",
                        "id": message.get("id"),
                        "sessions": await server.session_report(node),
                        "totals": await server.metric_totals(),
                    }
                )
            )
