"""Where a worker started without ``--config`` gets its configuration: Redis.

Notify, then pull. The web side stores the node's signed snapshot at ``nbdweb:config:<node>``
and publishes ``<node>:<generation>`` on ``nbdweb:config-changed``. The worker:

* fetches the snapshot at start; if Redis cannot be reached, it starts from the last good
  snapshot cached on local disk (``<state dir>/config-<node>.json``, mode 0600, still signed and
  verified again when read), or with no exports when there is none;
* subscribes to the channel and fetches again on every notice for its node, and after every
  (re)subscription, because pub/sub drops whatever was published while it was disconnected;
* reconnects with exponential backoff (0.2 s doubling to 30 s, with jitter) and keeps serving
  meanwhile;
* applies a snapshot only if its signature verifies, it parses and validates, it names this
  node, and its generation is above the one applied. Anything else is logged and counted
  (``nbdworker_config_rejected_total``) and the current config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.snapshot import (
    CHANNEL,
    KICK_CHANNEL,
    SnapshotError,
    config_key,
    parse_notice,
    verify_snapshot,
)

__all__ = ["ConfigSource", "default_state_dir"]

log = logging.getLogger("nbdworker.configsource")

BACKOFF_MIN = 0.2
BACKOFF_MAX = 30.0
# At start, how long Redis may take to answer before the cached snapshot is used.
STARTUP_TIMEOUT = 3.0
PING_INTERVAL = 5.0


def default_state_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("NBDWEB_DATA_DIR") or "./var") / "nbdworker"


def _rejection_kind(exc: SnapshotError) -> str:
    text = str(exc)
    for needle, kind in (
        ("signature", "bad_signature"),
        ("another secret", "bad_signature"),
        ("not newer", "old_generation"),
        ("for node", "other_node"),
    ):
        if needle in text:
            return kind
    return "malformed"


class ConfigSource:
    def __init__(
        self,
        client: aioredis.Redis,
        node: str,
        secret: str,
        state_dir: Path,
        apply: Callable[[WorkerConfig], None],
        on_kick: Callable[[], None] = lambda: None,
        on_rejected: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self.client = client
        self.node = node
        self.secret = secret
        self.state_dir = Path(state_dir)
        self.cache_path = self.state_dir / f"config-{node}.json"
        self.apply = apply
        self.on_kick = on_kick
        self.on_rejected = on_rejected
        self.generation = 0
        self.connected = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- start ----------------------------------------------------------------------------------

    async def initial(self) -> WorkerConfig:
        """The config to start with: the newer of Redis's and the cached one, else none."""
        from_redis = None
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                data = await self.client.get(config_key(self.node))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("Redis unreachable at start (%s): using the cached config", exc)
        else:
            if data is None:
                log.info("no config published for node %r yet", self.node)
            else:
                from_redis = self._verify(data, "Redis")
        # The cache counts even when Redis answers: an older snapshot put back into Redis must
        # not roll a restarted worker back.
        cached = self._load_cache()
        if from_redis is not None and (
            cached is None or from_redis.generation >= cached.generation
        ):
            self._save_cache(data)
            config = from_redis
        elif cached is not None:
            log.info("using the cached config, generation %d", cached.generation)
            config = cached
        else:
            log.warning("starting with no exports until a config for node %r arrives", self.node)
            return WorkerConfig(node=self.node)
        self.generation = config.generation
        return config

    def _load_cache(self) -> WorkerConfig | None:
        try:
            data = self.cache_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read the cached config %s: %s", self.cache_path, exc)
            return None
        return self._verify(data, f"cache {self.cache_path}")

    def _save_cache(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        tmp = self.cache_path.with_suffix(".tmp")
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # The snapshot holds the TLS private key: never readable by others, not even briefly.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
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
            return verify_snapshot(data, self.secret, node=self.node)
        except SnapshotError as exc:
            kind = _rejection_kind(exc)
            level = logging.INFO if kind == "old_generation" else logging.ERROR
            log.log(level, "config from %s rejected: %s", origin, exc)
            self.on_rejected(kind)
            return None

    async def fetch(self) -> bool:
        """Fetch, verify and apply the node's snapshot; True if a new generation was applied."""
        async with self._lock:
            data = await self.client.get(config_key(self.node))
            if data is None:
                log.info("no config published for node %r", self.node)
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
        """Follow the channel forever, reconnecting with backoff."""
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
                self.connected.clear()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _follow(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL, KICK_CHANNEL)
            # Subscribed first, then fetched: a change published in between is not missed.
            await self.fetch()
            self.on_kick()
            self.connected.set()
            log.info(
                "following %s for node %r (generation %d)", CHANNEL, self.node, self.generation
            )
            while True:
                message = await pubsub.get_message(timeout=PING_INTERVAL)
                if message is None:
                    # A quiet channel: make sure the connection is still alive.
                    await pubsub.ping()
                    continue
                if message["type"] != "message":
                    continue
                self._handle(message)
                if message["channel"] in (CHANNEL, CHANNEL.encode()):
                    notice = parse_notice(message["data"])
                    if (
                        notice is not None
                        and notice[0] == self.node
                        and notice[1] > self.generation
                    ):
                        await self.fetch()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _handle(self, message: dict) -> None:
        channel = message["channel"]
        data = message["data"]
        if channel in (KICK_CHANNEL, KICK_CHANNEL.encode()):
            node = data.decode() if isinstance(data, bytes) else data
            if node == self.node:
                self.on_kick()
