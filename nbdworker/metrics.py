"""Prometheus metrics of the worker, counted cheaply.

Connections count their requests in plain ints (`SessionRecord.counts`, nbdworker/session.py):
per request that is two
list increments, nothing else. Nothing is pushed to prometheus-client on the request path;
the collector reads the live connections and the totals of the ended ones when Prometheus
scrapes. The scrape runs in prometheus-client's HTTP thread, so it asks the event loop for a
consistent copy (`run_coroutine_threadsafe`) instead of reading structures the loop is changing.
With several serving processes (nbdworker/supervisor.py) the supervisor asks each of them for
its totals at scrape time and sums them.

Address: ``--metrics-listen HOST:PORT`` or env ``NBDWORKER_METRICS_LISTEN``; off unless set
(``127.0.0.1:9109`` is the conventional choice).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from nbdworker.protocol import Command, Errno
from nbdworker.session import BYTES, SessionRecord, new_counts
from nbdworker.settings import parse_listen
from nbdworker.stats import WorkerStats
from nbdworker.worker import Worker

if TYPE_CHECKING:
    from nbdworker.configsource import FollowerHealth

__all__ = [
    "ServerCollector",
    "connection_totals",
    "merge_totals",
    "start_metrics_server",
]

log = logging.getLogger("nbdworker.metrics")

_COMMAND_NAMES = {int(c): c.name.lower() for c in Command}
_ERRNO_NAMES = {int(e): e.name for e in Errno}
# What a scrape may wait for the event loop before it gives up (a stuck loop is itself news).
SCRAPE_TIMEOUT = 5.0


def connection_totals(
    stats: WorkerStats,
    sessions: Iterable[SessionRecord],
    fast_paths: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The counters of one serving process, live connections included, as plain JSON data
    (a supervisor sums those of its serving processes with `merge_totals`); `fast_paths` is
    each export's `Backend.fast_paths()`."""
    counts = {export: list(c) for export, c in stats.retired_counts.items()}
    errors = dict(stats.errors)
    live: dict[str, int] = {}
    handshaking = 0
    for record in sessions:
        export = record.export
        if export is None:
            handshaking += 1
            continue
        live[export] = live.get(export, 0) + 1
        total = counts.setdefault(export, new_counts())
        for i, n in enumerate(record.counts):
            if n:
                total[i] += n
        # Copied in one step (list() holds the GIL throughout): the connection's serving
        # thread may add an errno meanwhile.
        for errno, n in list(record.errors.items()):
            errors[export, errno] = errors.get((export, errno), 0) + n
    return {
        "handshaking": handshaking,
        "live": live,
        "counts": counts,
        "errors": [[export, errno, n] for (export, errno), n in errors.items()],
        "opened": dict(stats.connections_opened),
        "handshake_failures": dict(stats.handshake_failures),
        "exports_refused": dict(stats.exports_refused),
        "fast_paths": [
            [export, path, state, 1]
            for export, paths in (fast_paths or {}).items()
            for path, state in paths.items()
        ],
    }


def merge_totals(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "handshaking": 0,
        "live": {},
        "counts": {},
        "errors": [],
        "opened": {},
        "handshake_failures": {},
        "exports_refused": {},
    }
    errors: dict[tuple[str, int], int] = {}
    paths: dict[tuple[str, str, str], int] = {}
    for part in parts:
        merged["handshaking"] += part["handshaking"]
        for export, path, state, n in part.get("fast_paths", ()):
            paths[export, path, state] = paths.get((export, path, state), 0) + n
        for key in ("live", "opened", "handshake_failures", "exports_refused"):
            target = merged[key]
            for name, n in part[key].items():
                target[name] = target.get(name, 0) + n
        for export, c in part["counts"].items():
            total = merged["counts"].setdefault(export, new_counts())
            for i, n in enumerate(c):
                total[i] += n
        for export, errno, n in part["errors"]:
            errors[export, errno] = errors.get((export, errno), 0) + n
    merged["errors"] = [[export, errno, n] for (export, errno), n in errors.items()]
    merged["fast_paths"] = [[*key, n] for key, n in paths.items()]
    return merged


def _families(totals: dict[str, Any], stats: WorkerStats) -> list[Any]:
    """Every metric family, from the serving processes' totals and the worker's own stats."""
    handshaking = totals["handshaking"]
    live = totals["live"]
    counts = totals["counts"]
    errors = {(export, errno): n for export, errno, n in totals["errors"]}

    connections = GaugeMetricFamily(
        "nbdworker_open_connections",
        'Connections now open, by export (export="": still negotiating).',
        labels=["export"],
    )
    connections.add_metric([""], handshaking)
    for export, n in sorted(live.items()):
        connections.add_metric([export], n)
    opened = CounterMetricFamily(
        "nbdworker_connections", "Connections that opened an export.", labels=["export"]
    )
    for export, n in sorted(totals["opened"].items()):
        opened.add_metric([export], n)
    requests = CounterMetricFamily(
        "nbdworker_requests",
        "Requests executed, by export and command.",
        labels=["export", "command"],
    )
    nbytes = CounterMetricFamily(
        "nbdworker_request_bytes",
        "Bytes named by the requests' length fields, by export and command.",
        labels=["export", "command"],
    )
    for export, c in sorted(counts.items()):
        for code, name in _COMMAND_NAMES.items():
            if c[code]:
                requests.add_metric([export, name], c[code])
                nbytes.add_metric([export, name], c[BYTES + code])
    errs = CounterMetricFamily(
        "nbdworker_errors", "Error replies, by export and NBD errno.", labels=["export", "errno"]
    )
    for (export, errno), n in sorted(errors.items()):
        errs.add_metric([export, _ERRNO_NAMES.get(errno, str(errno))], n)
    failures = CounterMetricFamily(
        "nbdworker_handshake_failures",
        "Connections that ended before transmission, by reason.",
        labels=["reason"],
    )
    for reason, n in sorted(totals["handshake_failures"].items()):
        failures.add_metric([reason], n)
    refused = CounterMetricFamily(
        "nbdworker_exports_refused",
        "Exports a serving process would not serve when a config was applied, by reason "
        "(symlink, not_regular, outside_roots, ...).",
        labels=["reason"],
    )
    for reason, n in sorted(totals["exports_refused"].items()):
        refused.add_metric([reason], n)
    rejected = CounterMetricFamily(
        "nbdworker_config_rejected",
        "Config snapshots refused (forged, malformed, older, other node).",
        labels=["reason"],
    )
    for reason, n in sorted(stats.config_rejected.items()):
        rejected.add_metric([reason], n)
    fast_paths = GaugeMetricFamily(
        "nbdworker_export_fast_path",
        "Serving processes by the state of an optional fast path on an export's image "
        "(hole_check on|off, reads rwf_nowait|measured, sendfile on|off; tmpfs: hole_check off, "
        "reads measured). Why is in the log.",
        labels=["export", "path", "state"],
    )
    for export, path, state, n in sorted(totals.get("fast_paths", ())):
        fast_paths.add_metric([export, path, state], n)
    generation = GaugeMetricFamily(
        "nbdworker_config_generation", "The config generation applied.", value=stats.generation
    )
    uptime = GaugeMetricFamily(
        "nbdworker_uptime_seconds",
        "Seconds since the worker started.",
        value=time.time() - stats.started,
    )
    families = [
        connections,
        opened,
        requests,
        nbytes,
        errs,
        failures,
        refused,
        rejected,
        fast_paths,
        generation,
        uptime,
    ]
    if stats.follower is not None:
        families += _follower_families(stats.follower)
    return families


def _follower_families(health: FollowerHealth) -> list[Any]:
    up = GaugeMetricFamily(
        "nbdworker_config_follower_up",
        "1 while the config follower is subscribed to Redis, else 0.",
        value=1 if health.up else 0,
    )
    restarts = CounterMetricFamily(
        "nbdworker_config_follower_restarts",
        "Times the config follower failed unexpectedly and was started again.",
        value=health.restarts,
    )
    bad = CounterMetricFamily(
        "nbdworker_pubsub_messages_rejected",
        "Malformed pub/sub messages ignored, by channel.",
        labels=["channel"],
    )
    for channel, n in sorted(health.messages_rejected.items()):
        bad.add_metric([channel], n)
    return [up, restarts, bad]


class ServerCollector(Collector):
    def __init__(self, source: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        # The scrape runs in prometheus-client's thread; the totals are gathered on the loop.
        future = asyncio.run_coroutine_threadsafe(self.source.metric_totals(), self.loop)
        try:
            totals = future.result(SCRAPE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise
        yield from _families(totals, self.source.stats)


def start_metrics_server(source: Worker, address: str) -> str:
    """Serve /metrics on `address` (host:port) from a background thread; return the address."""
    listen = parse_listen(address)
    if listen.kind != "tcp":
        raise ValueError(f"metrics address {address!r}: must be host:port")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(source, asyncio.get_running_loop()))
    httpd, _thread = start_http_server(listen.port, listen.host, registry=registry)
    host, port = httpd.server_address[:2]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("metrics on http://%s/metrics", shown)
    return shown
