"""`python -m nbdworker --config FILE [--listen ADDR ...] [--storage-root DIR ...]`

Exit codes: 0 after a clean shutdown, 2 for a bad command line or configuration, 1 when a
listener cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from nbdworker.config import ConfigError, WorkerConfig, WorkerSettings

log = logging.getLogger("nbdworker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nbdworker", description="nbdweb's NBD server")
    parser.add_argument("--config", required=True, help="JSON worker configuration snapshot")
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
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds a graceful shutdown waits for requests in flight",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser.parse_args(argv)


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


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def run(settings: WorkerSettings, config: WorkerConfig, shutdown_timeout: float) -> int:
    from nbdworker.server import NBDServer

    server = NBDServer(settings, config, shutdown_timeout=shutdown_timeout)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        await server.shutdown()
        return 1
    log.info("ready (node %s, config generation %d)", settings.node, config.generation)
    await server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = WorkerSettings.from_sources(args.storage_root, args.listen)
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"nbdworker: configuration error: {exc}", file=sys.stderr)
        return 2
    if config.node != settings.node:
        log.warning("config is for node %r, this worker is node %r", config.node, settings.node)
    tune_malloc()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    # NBDWORKER_PROFILE=FILE writes cProfile statistics of the whole run to FILE (bench/README).
    profile_path = os.environ.get("NBDWORKER_PROFILE")
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        return loop.run_until_complete(run(settings, config, args.shutdown_timeout))
    finally:
        loop.close()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)


if __name__ == "__main__":
    sys.exit(main())
