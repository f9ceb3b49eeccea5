"""`python -m nbdworker [--config FILE] [--listen ADDR ...] [--storage-root DIR ...]`

Without ``--config`` the worker takes its config from Redis (``REDIS_URL``), verified with
its node's key (``NBDWEB_NODE_KEY``, ``$NBDWEB_DATA_DIR/node_keys/<node>``, or derived from the
master secret on a single machine: nbdworker/contract/nodekey.py), follows changes, and publishes
its heartbeat and sessions (nbdworker/configsource.py, nbdworker/status.py). ``--config FILE``
serves a fixed snapshot and uses no Redis (tests, debugging).

Exit codes: 0 after a clean shutdown, 2 for a bad command line or configuration, 1 when a
listener cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from nbdworker.contract.config import ConfigError, WorkerConfig
from nbdworker.contract.nodekey import NODE_KEY_ENV, NodeKey, load_node_key
from nbdworker.contract.redisconn import check_url, connect
from nbdworker.contract.snapshot import SecretError, key_id
from nbdworker.logformat import configure_logging, log_format_from_env
from nbdworker.settings import WorkerSettings
from nbdworker.supervisor import SERVING_ENV

log = logging.getLogger("nbdworker")

# Taken out of the environment once read (the Redis URL holds Redis's password: only this
# process talks to Redis, its serving processes never do).
SECRET_VARIABLES = (NODE_KEY_ENV, "NBDWEB_CONFIG_SECRET", "REDIS_URL")
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nbdworker", description="nbdweb's NBD server")
    parser.add_argument(
        "--config",
        help="serve this JSON config snapshot, without Redis (default: follow the node's "
        "config in Redis)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="Redis with the config snapshots (env REDIS_URL)",
    )
    parser.add_argument(
        "--state-dir",
        help="where the last good snapshot is cached (default $NBDWEB_DATA_DIR/nbdworker)",
    )
    parser.add_argument(
        "--metrics-listen",
        default=os.environ.get("NBDWORKER_METRICS_LISTEN") or "",
        help="host:port for Prometheus /metrics, e.g. 127.0.0.1:9109 (env "
        "NBDWORKER_METRICS_LISTEN; default off)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        help="host:port, [v6]:port or unix:/path (repeatable; env NBD_LISTEN, comma-separated; "
        "default 127.0.0.1:10809)",
    )
    parser.add_argument(
        "--storage-root",
        action="append",
        default=[],
        help="directory file exports must live under (repeatable; env NBDWORKER_STORAGE_ROOTS, "
        "':'-separated; default $NBDWEB_DATA_DIR/images)",
    )
    parser.add_argument(
        "--max-handshakes-per-address",
        type=int,
        default=None,
        metavar="N",
        help="connections of one client address still negotiating, per serving process; more "
        "are closed at once (env NBDWORKER_MAX_HANDSHAKES_PER_ADDRESS; default 16; 0: no cap)",
    )
    parser.add_argument(
        "--max-handshakes",
        type=int,
        default=None,
        metavar="N",
        help="connections still negotiating in one serving process, from anyone; more are "
        "closed at once (env NBDWORKER_MAX_HANDSHAKES; default 256; 0: no cap)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds a graceful shutdown waits for requests in flight",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=os.environ.get("NBDWORKER_WORKERS") or "auto",
        help="serving processes: a number, or 'auto' for one per core but one, 1 to 8 (env "
        "NBDWORKER_WORKERS; default auto; 1: this process serves)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default=os.environ.get("LOG_LEVEL") or "INFO",
        choices=LOG_LEVELS,
        help="(env LOG_LEVEL; default INFO)",
    )
    args = parser.parse_args(argv)
    # argparse checks choices only on the command line, not on a default from the environment.
    if args.log_level not in LOG_LEVELS:
        parser.error(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {args.log_level!r}")
    try:
        args.log_format = log_format_from_env()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        check_url(args.redis_url)
    except ValueError as exc:
        parser.error(f"REDIS_URL: {exc}")
    if isinstance(args.workers, str):  # a default from the environment is not converted
        try:
            args.workers = _workers(args.workers)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"NBDWORKER_WORKERS: {exc}")
    return args


def _workers(text: str) -> int:
    from nbdworker.supervisor import default_workers

    if text.strip().lower() == "auto":
        return default_workers()
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{n}: between 1 and 64")
    return n


def load_config(path: str) -> WorkerConfig:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return WorkerConfig.from_dict(data)


def tune_malloc() -> None:
    """Keep freed buffers in the heap instead of returning them to the kernel.

    glibc serves allocations above its mmap threshold (128 KiB at first) with fresh mappings,
    so every 256 KiB reply or write payload cost a round of page faults; on the test VM that
    halved sequential throughput. A high, fixed threshold keeps those buffers in the heap.
    """
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (`malloc_trim`): once serving, and after
    each whole config.

    With the trim threshold `tune_malloc` sets, what start-up freed (the whole config read and
    verified: at 10,000 exports megabytes of replies and JSON) would stay resident for the
    worker's life.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def run_on_new_loop(main: Coroutine[Any, Any, int], profile_path: str | None = None) -> int:
    """Run `main` on a new event loop (uvloop when installed) and close it; with
    `profile_path`, write cProfile statistics of the whole run there (bench/README)."""
    tune_malloc()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def run(
    settings: WorkerSettings,
    config: WorkerConfig | None,
    args: argparse.Namespace,
    node_key: NodeKey | None = None,
) -> int:
    """Serve `config`, or (None) the node's config from Redis, until SIGINT/SIGTERM.

    With one worker this process serves (NBDServer); with more it supervises that many serving
    processes (nbdworker/supervisor.py). Either way it follows the config and publishes status.
    """
    from nbdworker.server import NBDServer
    from nbdworker.stats import WorkerStats
    from nbdworker.supervisor import Supervisor
    from nbdworker.worker import Worker

    # Made first, so that snapshots refused while the first config is fetched count too.
    stats = WorkerStats()
    client = source = status = None
    server: Worker | None = None
    tasks: list[asyncio.Task] = []

    # What the config follower calls, from its run() (started below, once both exist).
    def apply(new: WorkerConfig) -> None:
        assert server is not None and status is not None
        server.apply_config(new)
        status.wake()
        # A whole config was read (a resync, a snapshot): its transient megabytes go back too.
        release_free_memory()

    async def apply_changes(new: WorkerConfig, changed: frozenset[str]) -> None:
        assert server is not None and status is not None
        await server.apply_changes(new, changed)
        status.wake()

    def kicked() -> None:
        assert status is not None
        status.wake()

    if config is None:
        import redis.asyncio as aioredis

        from nbdworker.configsource import ConfigSource, default_state_dir
        from nbdworker.status import StatusPublisher

        # A Sentinel URL gives a client that asks the sentinels for the primary on every new
        # connection: the follower's reconnect after a failover reaches the promoted replica.
        client = connect(aioredis, args.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0)
        state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
        assert node_key is not None
        source = ConfigSource(
            client,
            settings.node,
            node_key,
            state_dir,
            apply=apply,
            apply_changes=apply_changes,
            on_kick=kicked,
            on_rejected=stats.snapshot_rejected,
        )
        stats.follower = source.health
        config = await source.initial()
    if args.workers > 1:
        server = Supervisor(
            settings, config, args.workers, list(args.argv), args.shutdown_timeout, stats=stats
        )
    else:
        server = NBDServer(settings, config, shutdown_timeout=args.shutdown_timeout, stats=stats)
    try:
        await server.start()
        release_free_memory()
        if args.metrics_listen:
            from nbdworker.metrics import start_metrics_server

            start_metrics_server(server, args.metrics_listen)
    except (OSError, ValueError) as exc:
        log.error("cannot listen: %s", exc)
        await server.shutdown()
        return 1
    if source is not None and client is not None:
        assert node_key is not None
        status = StatusPublisher(
            client, server, settings.node, storage_roots=settings.storage_roots, key=node_key
        )
        tasks = [asyncio.create_task(source.run()), asyncio.create_task(status.run())]
    log.info("ready (node %s, config generation %d)", settings.node, config.generation)
    try:
        await server.serve_forever()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if status is not None:
            await status.clear()
        if client is not None:
            await client.aclose()
    return 0


def wipe_initial_environment(names: tuple[str, ...]) -> None:
    """Overwrite with NULs the values of `names` in the C environment this process started with,
    which is what /proc/PID/environ shows to every process of the same user."""
    try:
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    except (OSError, ValueError):
        return  # no C library to ask: nothing this process can wipe
    prefixes = tuple(f"{name}=".encode() for name in names)
    i = 0
    while (address := environ[i]) is not None:
        entry = ctypes.string_at(address)
        for prefix in prefixes:
            if entry.startswith(prefix):
                ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        i += 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    serving = os.environ.pop(SERVING_ENV, None)
    # With serving processes, every line says which process wrote it.
    several = serving is not None or args.workers > 1
    configure_logging(args.log_format, args.log_level, with_pid=several)
    node_key = None
    try:
        settings = WorkerSettings.from_sources(
            args.storage_root,
            args.listen,
            handshakes_per_address=args.max_handshakes_per_address,
            max_handshakes=args.max_handshakes,
        )
        if serving is not None:
            from nbdworker.supervisor import serve_as_child

            return run_on_new_loop(
                serve_as_child(settings, json.loads(serving), args.shutdown_timeout)
            )
        if args.config:
            config = load_config(args.config)
        else:
            config = None
            node_key = load_node_key(settings.node)
    except (ConfigError, SecretError) as exc:
        log.error("configuration error: %s", exc)  # a log line, so JSON under LOG_FORMAT=json
        return 2
    # Serving processes (they parse the clients' bytes) inherit this environment: they use no
    # secret, so they get none. They run as this process's user, so its /proc/PID/environ (the
    # environment it started with, which unsetting leaves in place) loses the values too.
    wipe_initial_environment(SECRET_VARIABLES)
    for name in SECRET_VARIABLES:
        os.environ.pop(name, None)
    if config is not None and config.node != settings.node:
        log.warning("config is for node %r, this worker is node %r", config.node, settings.node)
    if node_key is not None:
        log.info(
            "node %r: key from %s (key id %s)", settings.node, node_key.source, key_id(node_key)
        )
        if node_key.from_master:
            log.warning(
                "this worker can read the master config secret: on any host but the web "
                "side's, give it only its node key (manage.py node_key %s)",
                settings.node,
            )
    # NBDWORKER_PROFILE=FILE writes cProfile statistics of the whole run to FILE (bench/README).
    profile = os.environ.get("NBDWORKER_PROFILE")
    return run_on_new_loop(run(settings, config, args, node_key), profile)


if __name__ == "__main__":
    sys.exit(main())
