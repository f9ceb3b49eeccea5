"""Where a worker started without ``--config`` gets its configuration: Redis.

Notify, then pull. The web side stores the node's signed snapshot at ``nbdweb:config:<node>``
and publishes ``<node>:<generation>`` on the node's own channel
``nbdweb:config-changed:<node>`` (kicks on ``nbdweb:session-kick:<node>``). The worker:

* fetches the snapshot at start; if Redis cannot be reached, it starts from the last good
  snapshot cached on local disk (``<state dir>/config-<node>.json``, mode 0600, still signed and
  verified again when read), or with no exports when there is none;
* subscribes to the channel and fetches again on every notice for its node, and after every
  (re)subscription, because pub/sub drops whatever was published while it was disconnected;
* reconnects with exponential backoff (0.2 s doubling to 30 s, with jitter) and keeps serving
  meanwhile;
* applies a snapshot only if its signature verifies, it parses and validates, it names this
  node, and its generation is above the one applied. Anything else is logged and counted
  (``nbdworker_config_rejected_total``) and the current config stays. A value longer than
  ``MAX_SNAPSHOT_BYTES`` is refused from its length (``STRLEN``) before any of it is read.

Anyone who can publish on Redis can send anything on the two channels: every message is parsed
defensively (ASCII digits only, bytes that are not UTF-8 refused), and a malformed one is
logged, counted (``nbdworker_pubsub_messages_rejected_total``) and ignored. The follower itself
is supervised: whatever escapes it is logged and counted, and it starts again after the backoff.
Its health (`FollowerHealth`) is in the heartbeat and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from nbdworker.configentries import CACHE_FORMAT, EntrySet, NoHead, Update
from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.snapshot import (
    MAX_SNAPSHOT_BYTES,
    SnapshotError,
    config_channel,
    config_key,
    kick_channel,
    parse_kick,
    parse_notice,
    verify_snapshot,
)

__all__ = ["ConfigSource", "FollowerHealth", "default_state_dir"]

log = logging.getLogger("nbdworker.configsource")

BACKOFF_MIN = 0.2
BACKOFF_MAX = 30.0
# At start, how long Redis may take to answer before the cached snapshot is used.
STARTUP_TIMEOUT = 3.0
PING_INTERVAL = 5.0
# Seconds the cache writer waits, gathering changes, before writing the latest.
CACHE_DELAY = 1.0
# Malformed messages logged per minute at most (all are counted): a flood must not flood the log.
MAX_BAD_MESSAGE_LOGS = 20


def default_state_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("NBDWEB_DATA_DIR") or "./var") / "nbdworker"


@dataclass(slots=True)
class FollowerHealth:
    """How the config follower is doing; read by the heartbeat and the metrics."""

    # starting, following (subscribed), reconnecting (Redis lost), restarting (it failed)
    state: str = "starting"
    restarts: int = 0
    last_error: str | None = None
    messages_rejected: dict[str, int] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.state == "following"

    def to_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "messages_rejected": sum(self.messages_rejected.values()),
        }


def _channel_name(channel: object) -> str | None:
    if isinstance(channel, bytes):
        channel = channel.decode("utf-8", "replace")
    return channel if isinstance(channel, str) else None


class ConfigSource:
    def __init__(
        self,
        client: aioredis.Redis,
        node: str,
        key: str,
        state_dir: Path,
        apply: Callable[[WorkerConfig], None],
        on_kick: Callable[[], None] = lambda: None,
        on_rejected: Callable[[str], None] = lambda kind: None,
        apply_changes: Callable[[WorkerConfig, frozenset[str]], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.node = node
        self.key = key  # the node's key, never the master secret
        self.state_dir = Path(state_dir)
        self.cache_path = self.state_dir / f"config-{node}.json"
        self.apply = apply
        # Given, an update that read only the changed entries is applied with the names of the
        # exports they changed (before and after), so the worker opens only those.
        self.apply_changes = apply_changes
        self.on_kick = on_kick
        self.on_rejected = on_rejected
        self.generation = 0
        # This node's own channels: a change to another node is never delivered here.
        self.channel = config_channel(node)
        self.kick_channel = kick_channel(node)
        self.connected = asyncio.Event()
        self.health = FollowerHealth()
        self._lock = asyncio.Lock()
        self._log_window = (0.0, 0)  # (start of the minute, lines logged in it)
        # The node's signed entries (the web side's format since issue 19; a single snapshot
        # at config_key is still read when there is no head).
        self.entry_set = EntrySet(client, node, key, on_rejected)
        self._cached_update: Update | None = None
        # Cache writes happen off the event loop, one at a time, the latest only.
        self._cache_writer = ThreadPoolExecutor(1, thread_name_prefix="nbdworker-cache")
        self._cache_latest: Update | None = None
        self._cache_lock = threading.Lock()

    # -- start ----------------------------------------------------------------------------------

    async def initial(self) -> WorkerConfig:
        """The config to start with: the newer of Redis's and the cached one, else none."""
        from_redis = None
        update = data = None
        try:
            try:
                # Each Redis command is bounded, not verifying: 50 workers starting together on
                # two cores each verify their whole config, which may take longer.
                update = await self.entry_set.fetch(0, io_timeout=STARTUP_TIMEOUT)
            except NoHead:
                async with asyncio.timeout(STARTUP_TIMEOUT):
                    data = await self._read_snapshot()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("Redis unreachable at start (%s): using the cached config", exc)
        else:
            if update is not None:
                from_redis = update.config
            elif data is not None:
                from_redis = self._verify(data, "Redis")
        # The cache counts even when Redis answers: an older snapshot put back into Redis must
        # not roll a restarted worker back.
        cached = self._load_cache()
        if from_redis is not None and (
            cached is None or from_redis.generation >= cached.generation
        ):
            if update is not None:
                self.entry_set.commit(update)
                self._save_cache(self.entry_set.cache_lines(update))
            else:
                self._save_cache(data)
            config = from_redis
        elif cached is not None:
            log.info("using the cached config, generation %d", cached.generation)
            if self._cached_update is not None:
                self.entry_set.commit(self._cached_update)
            config = cached
        else:
            log.warning("starting with no exports until a config for node %r arrives", self.node)
            return WorkerConfig(node=self.node)
        self.generation = config.generation
        return config

    def _load_cache(self) -> WorkerConfig | None:
        try:
            with open(self.cache_path, "rb") as f:
                # One byte over the bound is enough to know it is too big.
                data = f.read(MAX_SNAPSHOT_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read the cached config %s: %s", self.cache_path, exc)
            return None
        origin = f"cache {self.cache_path}"
        if data.startswith(b'{"format":"' + CACHE_FORMAT.encode() + b'"'):
            self._cached_update = self.entry_set.from_cache_lines(data, origin)
            return self._cached_update.config if self._cached_update else None
        return self._verify(data, origin)

    async def _read_snapshot(self) -> bytes | None:
        """The node's snapshot from Redis, or None (none published, or refused and counted).

        The length is asked first, and the read itself is bounded too (the value may change
        between the two): an oversized value is never read whole.
        """
        key = config_key(self.node)
        try:
            length = await self.client.strlen(key)
            if length > MAX_SNAPSHOT_BYTES:
                log.error(
                    "config from Redis rejected: snapshot of %d bytes is over %d",
                    length,
                    MAX_SNAPSHOT_BYTES,
                )
                self.on_rejected("too_large")
                return None
            data = await self.client.getrange(key, 0, MAX_SNAPSHOT_BYTES)
        except ResponseError as exc:  # e.g. WRONGTYPE: someone stored a list there
            log.error("config from Redis rejected: %s", exc)
            self.on_rejected("malformed")
            return None
        if not data:
            # GETRANGE answers "" for a missing key; an empty snapshot is none either.
            log.info("no config published for node %r", self.node)
            return None
        if len(data) > MAX_SNAPSHOT_BYTES:
            log.error("config from Redis rejected: snapshot over %d bytes", MAX_SNAPSHOT_BYTES)
            self.on_rejected("too_large")
            return None
        return data

    def _save_cache(self, data: bytes | str | Iterable[bytes]) -> None:
        if isinstance(data, str):
            data = data.encode()
        chunks = [data] if isinstance(data, bytes) else data
        tmp = self.cache_path.with_suffix(".tmp")
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The snapshot holds the TLS private key: never readable by others, not even briefly.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            log.error("cannot cache the config in %s: %s", self.cache_path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # -- verify and apply -----------------------------------------------------------------------

    def _verify(self, data: bytes | str, origin: str) -> WorkerConfig | None:
        try:
            return verify_snapshot(data, self.key, node=self.node)
        except SnapshotError as exc:
            self._verify_failed(origin, exc)
            return None

    def _verify_failed(self, origin: str, exc: SnapshotError) -> None:
        kind = exc.kind
        level = logging.INFO if kind == "old_generation" else logging.ERROR
        log.log(level, "config from %s rejected: %s", origin, exc)
        self.on_rejected(kind)

    async def fetch(self) -> bool:
        """Fetch, verify and apply the node's config; True if a new generation was applied."""
        async with self._lock:
            try:
                update = await self.entry_set.fetch(self.generation)
            except NoHead:
                return await self._fetch_snapshot()
            if update is None:
                return False
            try:
                if update.incremental and self.apply_changes is not None:
                    await self.apply_changes(update.config, self._changed_exports(update))
                else:
                    self.apply(update.config)
            except Exception:
                log.exception("config generation %d could not be applied", update.config.generation)
                self.on_rejected("apply_failed")
                return False
            self.generation = update.config.generation
            self.entry_set.commit(update)
            log.info(
                "config generation %d from %s",
                self.generation,
                f"{len(update.head.changed or ())} changed entries"
                if update.incremental
                else f"all {len(update.entries)} entries",
            )
            self._cache_in_background(update)
            return True

    def _changed_exports(self, update: Update) -> frozenset[str]:
        """The names of the exports `update`'s changed entries held or hold: an entry's export
        may have been renamed, so both."""
        names = set()
        for name in update.head.changed or ():
            for entries in (self.entry_set.entries, update.entries):
                entry = entries.get(name)
                if entry is not None and entry.export is not None:
                    names.add(entry.export.name)
        return frozenset(names)

    def _cache_in_background(self, update: Update) -> None:
        """Cache `update` from the cache thread; writes queued meanwhile collapse into the
        latest."""
        with self._cache_lock:
            pending = self._cache_latest is not None
            self._cache_latest = update
        if not pending:
            self._cache_writer.submit(self._write_latest_cache)

    def _write_latest_cache(self) -> None:
        # Changes arriving within CACHE_DELAY make one write: the cache is for a start without
        # Redis, and each write of a large node's entries costs CPU the event loop could use.
        time.sleep(CACHE_DELAY)
        with self._cache_lock:
            update, self._cache_latest = self._cache_latest, None
        if update is not None:
            self._save_cache(self.entry_set.cache_lines(update))

    async def _fetch_snapshot(self) -> bool:
        """The node's config published as one snapshot (no head in Redis)."""
        data = await self._read_snapshot()
        if data is None:
            return False
        # The same generation again (a repeated notice, a reconnect) is no news.
        current = self.generation
        config = self._verify(data, "Redis")
        if config is None:
            return False
        if config.generation == current:
            return False
        if config.generation < current:
            log.warning(
                "config from Redis rejected: generation %d is older than %d (applied)",
                config.generation,
                current,
            )
            self.on_rejected("old_generation")
            return False
        try:
            self.apply(config)
        except Exception:
            log.exception("config generation %d could not be applied", config.generation)
            self.on_rejected("apply_failed")
            return False
        self.generation = config.generation
        self._save_cache(data)
        return True

    # -- follow ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the channel forever: reconnect with backoff when Redis goes away, and start
        again (counted in `health`) when anything else escapes."""
        delay = BACKOFF_MIN
        while True:
            try:
                await self._follow()
            except (RedisError, OSError) as exc:
                if self.connected.is_set():
                    log.warning("Redis connection lost (%s); reconnecting", exc)
                    delay = BACKOFF_MIN
                else:
                    log.debug("Redis still unreachable: %s", exc)
                self.health.state = "reconnecting"
            except Exception as exc:
                # A bug must not end config following (revocations included) for good.
                log.exception("the config follower failed; starting it again")
                self.health.state = "restarting"
                self.health.restarts += 1
                self.health.last_error = f"{type(exc).__name__}: {exc}"[:200]
            self.connected.clear()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _follow(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel, self.kick_channel)
            # Subscribed first, then fetched: a change published in between is not missed.
            await self.fetch()
            self.on_kick()
            self.connected.set()
            self.health.state = "following"
            log.info(
                "following %s for node %r (generation %d)",
                self.channel,
                self.node,
                self.generation,
            )
            while True:
                message = await pubsub.get_message(timeout=PING_INTERVAL)
                if message is None:
                    # A quiet channel: make sure the connection is still alive.
                    await pubsub.ping()
                    continue
                if message.get("type") != "message":
                    continue
                if self._handle(message):
                    await self.fetch()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _handle(self, message: dict) -> bool:
        """Act on one message; True when it announces a newer config for this node."""
        channel = _channel_name(message.get("channel"))
        data = message.get("data")
        if channel == self.kick_channel:
            node = parse_kick(data)
            if node is None:
                self._bad_message(self.kick_channel, data)
            elif node == self.node:
                self.on_kick()
            return False
        if channel == self.channel:
            notice = parse_notice(data)
            if notice is None:
                self._bad_message(self.channel, data)
                return False
            return notice[0] == self.node and notice[1] > self.generation
        return False

    def _bad_message(self, channel: str, data: object) -> None:
        rejected = self.health.messages_rejected
        rejected[channel] = rejected.get(channel, 0) + 1
        now = time.monotonic()
        start, logged = self._log_window
        if now - start >= 60.0:
            start, logged = now, 0
        if logged < MAX_BAD_MESSAGE_LOGS:
            shown = repr(data)
            if len(shown) > 80:
                shown = f"{shown[:80]}... ({len(data) if hasattr(data, '__len__') else '?'} long)"
            log.warning("ignored a malformed message on %s: %s", channel, shown)
        self._log_window = (start, logged + 1)
