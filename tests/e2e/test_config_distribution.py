"""Config distribution end to end: the API changes the database, the web side publishes the
node's signed snapshot to a private Redis after commit, a real nbdworker (no --config) follows
it, and real clients (nbdinfo, nbdsh, a raw socket client) see the result.

The disk jobs run in-process (Celery's eager mode: the same `run_job` a Celery worker runs,
on commit), so an export created through the API becomes ready and is published as in
production. Every test has its own node name; tests that stop Redis have their own Redis.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from exports_app.models import Export, TLSPolicy, WorkerNode
from exports_app.services import publisher
from exports_app.services.nodekeys import node_key
from nbdworker.contract.entries import Head, entries_key, head_key, sign_entry, sign_head
from nbdworker.contract.nodekey import NODE_KEY_ENV
from nbdworker.contract.snapshot import config_channel
from nbdworker.protocol import Command, Errno, Reply
from tests.support.entries import publish_entries, read_head
from tests.support.polling import poll as wait_for
from tests.support.rawclient import RawClient
from tests.support.redisserver import PrivateRedis, private_redis
from tests.support.tools import client_env, require_tool
from tests.support.worker import RunningWorker, start_worker

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("eager_jobs"),
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

EXPORTS = "/api/v1/exports/"
MiB = 1 << 20
BLOCK = 4096
# How long a change may take to reach a client: the issue asks for "within a second"; the
# deadline leaves room for a loaded machine, and the tests assert convergence by then.
CONVERGE = 5.0


poll = functools.partial(wait_for, timeout=CONVERGE)


def pattern(block: int) -> bytes:
    return struct.pack(">Q", block) * (BLOCK // 8)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@dataclass
class Stack:
    redis: PrivateRedis
    node: WorkerNode
    api: APIClient
    tmp: Path
    worker: RunningWorker | None = None

    @property
    def storage_root(self) -> Path:
        return self.tmp / "images"

    def start_worker(self) -> RunningWorker:
        # What the test committed is published before the worker reads it: the publisher
        # thread's timing is test_publishing's subject, not this module's.
        publisher.drain()
        self.worker = start_worker(
            None,
            workdir=self.tmp / "worker",
            storage_root=self.storage_root,
            env={
                "REDIS_URL": self.redis.url,
                NODE_KEY_ENV: node_key(self.node.name),
                "NBDWORKER_NODE": self.node.name,
                "NBDWEB_DATA_DIR": str(self.tmp / "data"),
            },
        )
        return self.worker

    # -- through the API --

    def create(self, name: str, size: int = 4 * MiB, **fields) -> Export:
        response = self.api.post(
            EXPORTS, {"node": self.node.pk, "name": name, "size": size, **fields}
        )
        assert response.status_code == 201, response.content
        export = Export.objects.get(pk=response.json()["id"])
        assert export.state == "ready", (export.state, export.last_error)
        return export

    def patch(self, export: Export, **fields) -> None:
        response = self.api.patch(f"{EXPORTS}{export.pk}/", fields)
        assert response.status_code == 200, response.content

    def delete(self, export: Export) -> None:
        response = self.api.delete(f"{EXPORTS}{export.pk}/")
        assert response.status_code in (202, 204), response.content

    # -- clients --

    def listing(self) -> dict[str, str]:
        """{export name: description} as `nbdinfo --list` reports it."""
        assert self.worker is not None
        out = subprocess.run(
            [require_tool("nbdinfo"), "--list", "--json", self.worker.uri()],
            capture_output=True,
            text=True,
            timeout=30,
            env=client_env(),
        )
        assert out.returncode == 0, out.stderr
        return {
            e["export-name"]: e.get("description", "") for e in json.loads(out.stdout)["exports"]
        }

    def wait_listing(self, predicate: Callable[[dict[str, str]], bool], what: str) -> dict:
        return poll(
            lambda: (lambda names: names if predicate(names) else None)(self.listing()), what
        )


@pytest.fixture
def make_stack(api, tmp_path, settings) -> Iterator[Callable[[PrivateRedis], Stack]]:
    stacks: list[Stack] = []

    def make(redis_server: PrivateRedis) -> Stack:
        settings.REDIS_URL = redis_server.url
        (tmp_path / "images").mkdir(exist_ok=True)
        node = WorkerNode.objects.create(
            name=f"e2e-{uuid.uuid4().hex[:8]}",
            listen="127.0.0.1:10809",
            storage_root=str(tmp_path / "images"),
            tls_policy=TLSPolicy.objects.create(name=f"e2e-{uuid.uuid4().hex[:8]}"),
        )
        stack = Stack(redis_server, node, api, tmp_path)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        if stack.worker is not None:
            stack.worker.stop()


@pytest.fixture
def stack(make_stack, shared_redis) -> Stack:
    return make_stack(shared_redis)


def fill(export: Export) -> None:
    """Write the block pattern over the export's whole image."""
    with open(export.absolute_image_path, "r+b") as f:
        for block in range(export.size // BLOCK):
            f.write(pattern(block))


class Reader:
    """nbdsh reading random blocks of one export over one connection until told to stop;
    any wrong byte or lost connection makes it exit non-zero."""

    SCRIPT = """
import os, random, struct, sys
n = 0
while not os.path.exists({stop!r}):
    i = random.randrange({blocks})
    if h.pread({block}, i * {block}) != struct.pack('>Q', i) * {words}:
        print('MISMATCH', i, flush=True)
        sys.exit(1)
    n += 1
    if n % 50 == 0:
        print('reads', n, flush=True)
print('done', n, flush=True)
"""

    def __init__(self, uri: str, blocks: int, workdir: Path) -> None:
        self.stop_file = workdir / f"stop-{uuid.uuid4().hex[:6]}"
        script = self.SCRIPT.format(
            stop=str(self.stop_file), blocks=blocks, block=BLOCK, words=BLOCK // 8
        )
        self.proc = subprocess.Popen(
            [require_tool("nbdsh"), "-u", uri, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(),
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # blocks until 50 reads went through
        assert first.startswith("reads"), first + self.proc.stderr.read()

    def finish(self) -> int:
        """Stop; return the number of reads, failing if any went wrong."""
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, f"reader failed: {out[-500:]} {err[-2000:]}"
        return int(out.strip().splitlines()[-1].split()[1])


# -- tests ---------------------------------------------------------------------------------------


def test_api_changes_reach_nbdinfo_while_another_client_reads_undisturbed(stack) -> None:
    steady = stack.create("steady")
    fill(steady)
    stack.start_worker()
    assert stack.listing() == {"steady": ""}
    reader = Reader(stack.worker.uri("steady"), steady.size // BLOCK, stack.tmp)

    alpha = stack.create("alpha", description="first")
    stack.wait_listing(lambda names: names.get("alpha") == "first", "alpha to appear")
    stack.patch(alpha, description="second")
    stack.wait_listing(lambda names: names.get("alpha") == "second", "alpha's new description")
    stack.delete(alpha)
    stack.wait_listing(lambda names: "alpha" not in names, "alpha to go")

    assert reader.finish() >= 50
    assert "ending the connection" not in stack.worker.log


def test_disabling_an_export_in_use_answers_in_flight_reads_then_disconnects(stack) -> None:
    busy = stack.create("busy", size=16 * MiB)
    fill(busy)
    stack.start_worker()
    # More than the worker's reply buffer (16 MiB) holds: when the change lands, some reads are
    # answered, some are in flight, and the last ones are still unread in the socket.
    count, length = 256, 256 * 1024
    with RawClient.open(stack.worker.host, stack.worker.port, "busy") as c:
        offsets = {}
        for i in range(count):
            offset = (i * length) % busy.size
            offsets[c.request(Command.READ, offset, length)] = offset
        stack.patch(busy, enabled=False)
        stack.worker.wait_for_log(r"export 'busy': export removed, disabled or refused: ending")
        answered = shut = 0
        for _ in range(count):
            reply = c.read_simple()  # replies may come in any order: match them by cookie
            offset = offsets.pop(reply.cookie)
            if reply.error == 0:
                data = c.recv_exact(length)
                first = offset // BLOCK
                assert data == b"".join(pattern(b) for b in range(first, first + length // BLOCK))
                answered += 1
            else:
                assert reply.error == Errno.ESHUTDOWN
                shut += 1
        assert answered >= 1
        assert shut >= 1
        assert c.closed_by_server()
    assert "busy" not in stack.listing()
    # The data is intact: enabled again, a new client reads the pattern back.
    stack.patch(busy, enabled=True)
    stack.wait_listing(lambda names: "busy" in names, "busy to return")
    with RawClient.open(stack.worker.host, stack.worker.port, "busy") as c:
        for block in (0, 1, 2047, 4095):
            assert c.read(block * BLOCK, BLOCK).data == pattern(block)


def test_forged_and_older_entries_are_ignored(stack) -> None:
    stack.create("real")
    worker = stack.start_worker()
    r = stack.redis.client()
    node, key = stack.node.name, node_key(stack.node.name)
    current = read_head(r, node, key)
    genuine_head = r.get(head_key(node))

    # A head and an entry signed with another key.
    forged_field = "export:999999"
    forged, _ = sign_entry(node, forged_field, current.generation + 1000, {"name": "x"}, "k")
    r.hset(entries_key(node), forged_field, forged)
    r.set(
        head_key(node),
        sign_head(
            Head(node, current.generation + 1000, current.generation, 9, 0, (forged_field,)), "k"
        ),
    )
    r.publish(config_channel(node), f"{node}:{current.generation + 1000}")
    worker.wait_for_log(r"config from Redis rejected: signed with another key")
    r.hdel(entries_key(node), forged_field)

    # An older head put back after a genuine change.
    stack.create("second")
    stack.wait_listing(lambda names: set(names) == {"real", "second"}, "the second export")
    r.set(head_key(node), genuine_head)
    r.publish(config_channel(node), f"{node}:{current.generation + 2000}")
    worker.wait_for_log(r"config from Redis rejected: generation \d+ is older")
    assert set(stack.listing()) == {"real", "second"}

    # A genuine change after the refusals still goes through.
    stack.create("later")
    stack.wait_listing(lambda names: set(names) == {"real", "second", "later"}, "the change")


def test_an_entry_naming_a_path_outside_the_storage_roots_is_refused(stack, tmp_path) -> None:
    stack.create("inside")
    worker = stack.start_worker()
    outside = tmp_path / "elsewhere" / "secret.img"
    outside.parent.mkdir()
    outside.write_bytes(b"s" * 4096)
    r = stack.redis.client()
    # Correctly signed: only the worker's own storage roots stand in the way.
    head = publish_entries(
        r,
        stack.node.name,
        node_key(stack.node.name),
        {
            "export:900001": {"name": "evil", "backend": "file", "path": str(outside)},
            "export:900002": {"name": "passwd", "backend": "file", "path": "/etc/passwd"},
        },
    )
    worker.wait_for_log(rf"export 'evil' refused: {outside} is not under a storage root")
    worker.wait_for_log(r"export 'passwd' refused: /etc/passwd is not under a storage root")
    worker.wait_for_log(rf"config generation {head.generation} applied: 1 export")
    assert stack.listing() == {"inside": ""}


def test_an_image_replaced_by_another_file_in_the_root_is_not_served(stack) -> None:
    """The attack: anyone who can write into the storage root renames another file over an
    exported image; the next time the worker opens the image (a config change, a restart) it
    served the impostor. The snapshot now carries the identity the job recorded, and the worker
    checks it on the descriptor it opened: refused, logged, and a client cannot select it."""
    victim = stack.create("victim")
    fill(victim)
    worker = stack.start_worker()
    with RawClient.open(worker.host, worker.port, "victim") as c:
        assert c.read(0, BLOCK).data == pattern(0)
    impostor = stack.storage_root / "impostor.img"
    impostor.write_bytes(b"IMPOSTOR" * (victim.size // 8))
    os.rename(impostor, victim.absolute_image_path)
    start = worker.log_lines()
    stack.patch(victim, description="opened again")  # any change makes the worker reopen it
    worker.wait_for_log(
        r"export 'victim' refused: .* is not the image nbdweb recorded \(device:inode", start=start
    )
    with RawClient(worker.host, worker.port) as c:
        c.greet()
        assert c.refused_go("victim").reply == Reply.ERR_UNKNOWN


def test_kick_a_session_through_the_api(stack) -> None:
    export = stack.create("kickme")
    fill(export)
    stack.start_worker()
    with RawClient.open(stack.worker.host, stack.worker.port, "kickme") as c:
        assert c.read(0, BLOCK).data == pattern(0)

        def live() -> list[dict]:
            response = stack.api.get(
                "/api/v1/sessions/", {"node": stack.node.name, "export": "kickme"}
            )
            assert response.status_code == 200, response.content
            return response.json()["results"]

        # A heartbeat taken between GO and the read lists the session with no reads yet.
        session = poll(
            lambda: [s for s in live() if s["reads"]], "the session to be listed with its read"
        )[0]
        assert session["client"].startswith("127.0.0.1:")
        assert (session["reads"], session["bytes_read"], session["tls"]) == (1, BLOCK, False)
        response = stack.api.delete(f"/api/v1/sessions/{session['id']}/")
        assert response.status_code == 202, response.content
        assert c.closed_by_server()
    stack.worker.wait_for_log(rf"session {session['id']} on export 'kickme' ended")
    poll(lambda: live() == [], "the session to leave the list")
    node = stack.api.get(f"/api/v1/nodes/{stack.node.pk}/").json()
    assert node["status"]["status"] == "online"
    assert node["status"]["current"] is True


def test_redis_restart_the_worker_serves_throughout_and_reconverges(make_stack, tmp_path) -> None:
    with private_redis(tmp_path / "own-redis") as redis_server:
        stack = make_stack(redis_server)
        steady = stack.create("steady")
        fill(steady)
        worker = stack.start_worker()
        reader = Reader(worker.uri("steady"), steady.size // BLOCK, stack.tmp)
        # Subscribed first: Redis stopped before that is "still unreachable", not "lost".
        worker.wait_for_log(r"following nbdweb:config-changed")

        redis_server.stop()
        worker.wait_for_log(r"Redis connection lost")
        # Made while Redis is down: the request succeeds, the publish waits for Redis.
        stack.create("born-in-outage")
        redis_server.start()
        stack.wait_listing(
            lambda names: set(names) == {"steady", "born-in-outage"}, "the outage's change"
        )
        assert reader.finish() >= 50

        def current() -> bool:
            status = stack.api.get(f"/api/v1/nodes/{stack.node.pk}/").json()["status"]
            return status["status"] == "online" and status["current"] is True

        poll(current, "the node to report the latest generation")


def test_worker_started_with_redis_down_serves_the_cached_config(make_stack, tmp_path) -> None:
    with private_redis(tmp_path / "own-redis") as redis_server:
        stack = make_stack(redis_server)
        cached = stack.create("cached")
        fill(cached)
        stack.start_worker()
        assert stack.listing() == {"cached": ""}
        stack.worker.stop()

        redis_server.stop()
        worker = stack.start_worker()
        assert "Redis unreachable at start" in worker.log
        assert stack.listing() == {"cached": ""}
        with RawClient.open(worker.host, worker.port, "cached") as c:
            assert c.read(BLOCK, BLOCK).data == pattern(1)

        # Once Redis is back the worker follows it again.
        redis_server.start()
        worker.wait_for_log(r"following nbdweb:config-changed", timeout=40)
        stack.create("after")
        stack.wait_listing(lambda names: set(names) == {"cached", "after"}, "the new export")
