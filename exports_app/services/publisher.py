"""Out-of-band publishing: a change commits and returns; its node is published after.

`schedule_publish(nodes, scope)` is what every change to a worker's config calls (the model
signals in `exports_app.signals` do, so no path forgets). In the change's own transaction it
inserts a dirty marker per node (`PendingPublish`: it commits or rolls back with the change),
and after commit it wakes this process's publisher thread. Nothing is published on the request
thread.

The publisher thread (one per process, started on demand, gone after a few idle seconds)
publishes each woken node with `publishing.publish_node`: under the node's Redis lock (one
publisher per node across every process and host), from the database, clearing only the
markers the published config includes. So:

* changes to a node made while it is being published, or within `COALESCE_SECONDS`, go out in
  one publish;
* another process's publisher holding the lock re-reads the markers after releasing it, so a
  change it did not include is not left behind;
* a Redis error keeps the markers and the thread tries again (0.5 s doubling to 10 s);
* a process that dies leaves its markers: the next change to the node (any process), the Celery
  beat sweep (`publish_pending`, every few seconds) or `manage.py publish_config` publishes
  them from the database.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import redis
from django.db import DatabaseError, connections, transaction

from exports_app.models import PendingPublish, WorkerNode
from exports_app.models.publishing import NODE_SCOPE
from exports_app.services.publishing import NodeBusy, publish_node, publish_pending_batch

__all__ = ["COALESCE_SECONDS", "drain", "publish_pending", "schedule_publish"]

log = logging.getLogger("exports_app.publishing")

# Changes to one node this close together go out as one publish.
COALESCE_SECONDS = 0.01
# The thread ends after this long without work (a web process that makes no change holds none).
IDLE_SECONDS = 5.0
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 10.0
# Threads that publish the nodes of one change together (each with its own database
# connection).
PUBLISH_THREADS = 4


def _node_ids(nodes: object | Iterable[object]) -> set[int]:
    if isinstance(nodes, WorkerNode | int):
        nodes = [nodes]
    ids: set[int] = set()
    for node in nodes:  # type: ignore[union-attr]
        ids.add(node.pk if isinstance(node, WorkerNode) else int(node))
    return ids


def schedule_publish(nodes: object | Iterable[object], scope: str = NODE_SCOPE) -> None:
    """Mark `nodes` (a WorkerNode, a node id, or several) as changed in `scope` ("node" or
    "export:<pk>") in the current transaction; publish them out of band after it commits."""
    ids = _node_ids(nodes)
    if not ids:
        return
    PendingPublish.objects.bulk_create([PendingPublish(node_id=i, scope=scope) for i in ids])
    transaction.on_commit(partial(_publisher().wake, ids))


class _Publisher:
    """This process's publisher thread and the nodes it was woken for."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._wanted: set[int] = set()
        self._thread: threading.Thread | None = None

    def wake(self, node_ids: Iterable[int]) -> None:
        with self._cond:
            self._wanted |= set(node_ids)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nbdweb-publisher", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _take(self) -> set[int] | None:
        """The nodes to publish next; None once idle long enough (the thread then ends)."""
        with self._cond:
            if not self._wanted:
                self._cond.wait(IDLE_SECONDS)
            if not self._wanted:
                self._thread = None
                return None
        # Let changes arriving together gather into one publish (not a synchronisation).
        time.sleep(COALESCE_SECONDS)
        with self._cond:
            wanted, self._wanted = self._wanted, set()
        return wanted

    def _back_off(self, failed: set[int], delay: float) -> None:
        """Wait `delay` before retrying `failed`, unless another node is woken meanwhile: one
        node that keeps failing must not hold back every other node's publish. A change to a
        failing node does not cut its backoff short."""
        deadline = time.monotonic() + delay
        with self._cond:
            self._wanted |= failed
            while self._wanted <= failed and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def _run(self) -> None:
        delay = RETRY_FIRST_DELAY
        try:
            while (wanted := self._take()) is not None:
                try:
                    failed = _publish_each(wanted)
                except Exception:
                    # Whatever escaped, this process goes on publishing: a thread that died
                    # here left every later change of this process unpublished.
                    log.exception("config of node(s) %s not published (retrying)", sorted(wanted))
                    failed = set(wanted)
                if not failed:
                    delay = RETRY_FIRST_DELAY
                    continue
                self._back_off(failed, delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
        finally:
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None  # the next change starts a thread anew
            connections.close_all()  # this thread's own database connections


def _publish_until_clean(node_id: int) -> bool:
    """Publish one node until it has no marker left; False if it failed (to retry)."""
    try:
        while True:
            publish_node(node_id, only_pending=True)
            # Released: a change marked while we held the lock (its publisher found the lock
            # taken) is ours to publish.
            if not PendingPublish.objects.filter(node_id=node_id).exists():
                return True
    except NodeBusy:
        return True  # its holder re-reads the markers when it releases the lock
    except (redis.RedisError, DatabaseError) as exc:
        log.error("node %s: config not published, retrying: %s", _node_label(node_id), exc)
    except Exception:
        log.exception("node %s: config not published (retrying)", _node_label(node_id))
    return False


def _node_label(node_id: int) -> str:
    """The node's name for a log line (operators know nodes by name), its id if unreadable."""
    try:
        name = WorkerNode.objects.filter(pk=node_id).values_list("name", flat=True).first()
    except DatabaseError:
        name = None
    return repr(name) if name else f"#{node_id}"


def _publish_in_pool_thread(node_id: int) -> bool:
    try:
        return _publish_until_clean(node_id)
    finally:
        connections.close_all()  # the pool thread's own connection


def _publish_each(node_ids: Iterable[int]) -> set[int]:
    """Publish each node that has markers; the ids that failed (to retry). Several nodes (a
    policy shared by many) are published as one batch, then what is left by up to
    PUBLISH_THREADS threads at once: most of a publish is waiting on PostgreSQL and Redis."""
    ids = sorted(node_ids)
    if len(ids) <= 1:
        return {i for i in ids if not _publish_until_clean(i)}
    try:
        # One batch for all (one round trip per phase, each TLS section built once), then
        # node by node what is left: marked meanwhile, or held by another publisher.
        publish_pending_batch(ids)
    except (redis.RedisError, DatabaseError) as exc:
        log.error("config of %d nodes not published together, one by one: %s", len(ids), exc)
    except Exception:
        log.exception("config of %d nodes not published together, one by one", len(ids))
    left = set(PendingPublish.objects.filter(node_id__in=ids).values_list("node_id", flat=True))
    ids = sorted(left)
    if len(ids) <= 1:
        return {i for i in ids if not _publish_until_clean(i)}
    with ThreadPoolExecutor(min(PUBLISH_THREADS, len(ids)), "nbdweb-publish") as pool:
        done = pool.map(_publish_in_pool_thread, ids)
        return {node_id for node_id, ok in zip(ids, done, strict=True) if not ok}


_lock = threading.Lock()
_instance: _Publisher | None = None


def _publisher() -> _Publisher:
    """This process's publisher (a forked child gets its own: threads do not survive fork)."""
    global _instance
    with _lock:
        if _instance is None or _instance.pid != os.getpid():
            _instance = _Publisher()
        return _instance


def _pending_nodes() -> list[int]:
    return list(PendingPublish.objects.values_list("node_id", flat=True).distinct())


def publish_pending() -> None:
    """Publish every node with markers, in this thread, skipping those another publisher holds
    (the Celery beat sweep: catches up what a publisher that died left)."""
    failed = _publish_each(_pending_nodes())
    if failed:
        log.warning("%d node(s) still pending after the sweep", len(failed))


def drain(timeout: float = 20.0) -> None:
    """Wait until no change is pending, publishing in this thread what no other publisher is
    already publishing (tests, `manage.py publish_config`). Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while pending := _pending_nodes():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"config of node(s) {pending} still pending after {timeout} s")
        for node_id in pending:
            try:
                publish_node(node_id, only_pending=True, lock_wait=deadline - time.monotonic())
            except (NodeBusy, redis.RedisError, DatabaseError):
                time.sleep(0.05)  # polling the deadline while Redis or the lock holder is busy
