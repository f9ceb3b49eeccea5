"""exports_app/services/publishing.py, publisher.py and exports_app/signals.py against a private
Redis: what a node's snapshot holds for each model state, that it is published only after commit
(nothing on rollback), out of band, once per node per transaction, only for changes the worker
sees, signed, with a growing generation, and that a Redis outage never fails the change."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from django.db import transaction

from exports_app.choices import ClientVerification, ExportState, TLSMode
from exports_app.models import Export, PendingPublish, TLSPolicy, WorkerNode
from exports_app.services import ca, publisher, publishing
from exports_app.services.nodekeys import node_key
from nbdworker.contract.config import WorkerConfig
from nbdworker.contract.entries import (
    assemble,
    entries_key,
    head_key,
    verify_entry,
    verify_head,
)
from nbdworker.contract.snapshot import (
    config_channel,
    generation_key,
    heartbeat_key,
    published_key,
)
from tests.support.polling import poll
from tests.support.workerrecords import heartbeat_record

pytestmark = pytest.mark.django_db(transaction=True, serialized_rollback=True)


@pytest.fixture(autouse=True)
def use_private_redis(web_redis):
    yield
    publisher.drain()  # no publish of this test runs on into the next


@pytest.fixture
def r(redis_server, default_node):
    """The private Redis, emptied after the fixtures' own saves published."""
    client = redis_server.client()
    publisher.drain()
    client.flushdb()
    return client


def published(r, node: WorkerNode) -> WorkerConfig | None:
    """The node's snapshot once every committed change is published."""
    publisher.drain()
    return read_entries(r, node)


def read_entries(r, node: WorkerNode) -> WorkerConfig | None:
    """The config the node's entries in Redis make, verified as its worker does."""
    head = r.get(head_key(node.name))
    if head is None:
        return None
    key = node_key(node.name)
    entries = {
        field: verify_entry(value, key, node=node.name, field=field)
        for field, value in r.hgetall(entries_key(node.name)).items()
    }
    return assemble(verify_head(head, key, node=node.name), entries)


def make_export(node: WorkerNode, name: str, **kw) -> Export:
    kw.setdefault("size", 1 << 20)
    kw.setdefault("state", ExportState.READY)
    return Export.objects.create(node=node, name=name, **kw)


# -- content ------------------------------------------------------------------------------------


def test_snapshot_holds_ready_enabled_exports_with_their_rules(r, default_node) -> None:
    make_export(
        default_node,
        "served",
        read_only=True,
        trim=False,
        allowed_networks=["10.0.0.0/8"],
        allowed_clients=[{"common_name": "alice"}],
        max_connections=3,
        description="the one",
    )
    make_export(default_node, "off", enabled=False)
    make_export(default_node, "new", state=ExportState.PROVISIONING)
    make_export(default_node, "broken", state=ExportState.FAILED)
    config = published(r, default_node)
    assert config is not None
    assert [e.name for e in config.exports] == ["served"]
    export = config.exports[0]
    assert export.path == str(default_node.storage_root) + "/served.img"
    assert export.backend == "file"
    assert (export.read_only, export.trim, export.max_connections) == (True, False, 3)
    assert export.allowed_networks == ("10.0.0.0/8",)
    assert [c.to_dict() for c in export.allowed_clients] == [{"common_name": "alice"}]
    assert export.description == "the one"
    assert config.node == default_node.name
    assert config.tls.mode == "NOTLS"
    assert config.tls.key_pem == ""  # no key leaves the database without TLS


def test_tls_policy_brings_certificate_decrypted_key_cas_and_revocations(
    r, tls_node, server_certificate, client_certificate, authority
) -> None:
    node = tls_node(TLSMode.FORCEDTLS)
    policy = node.tls_policy
    policy.client_verification = ClientVerification.REQUIRED
    policy.save()
    config = published(r, node)
    assert config.tls.mode == "FORCEDTLS"
    assert config.tls.certificate_pem == server_certificate.certificate_pem
    assert config.tls.key_pem == server_certificate.private_key_pem()
    assert "PRIVATE KEY" in config.tls.key_pem
    assert config.tls.ca_pem == authority.certificate_pem
    assert config.tls.client_verification == "required"
    assert config.tls.revoked_serials == ()

    ca.revoke_certificate(client_certificate, "lost laptop")
    assert published(r, node).tls.revoked_serials == (client_certificate.serial,)


def test_the_redis_value_holds_no_pem_private_key(r, tls_node, server_certificate) -> None:
    """The server key travels sealed for the node's worker (nbdworker/contract/sealed.py):
    whoever reads Redis gets no private key; the worker, holding the config secret, does."""
    node = tls_node(TLSMode.FORCEDTLS)
    publisher.drain()
    raw = r.hget(entries_key(node.name), "tls")
    assert "PRIVATE KEY" not in raw
    assert "nbdweb-sealed-v1:" in raw
    assert not any("PRIVATE KEY" in value for value in r.hvals(entries_key(node.name)))
    assert published(r, node).tls.key_pem == server_certificate.private_key_pem()


def test_a_tls_required_export_left_under_optionaltls_is_published_and_flagged(
    r, tls_node, caplog
) -> None:
    # A row an older version accepted: the node's other exports must still reach the worker
    # (which refuses this one itself), and the web log says what will happen.
    node = tls_node(TLSMode.OPTIONALTLS)
    with caplog.at_level(logging.WARNING, logger="exports_app.publishing"):
        make_export(node, "plain")
        make_export(node, "legacy", tls_required=True)
    config = published(r, node)
    assert [e.name for e in config.exports] == ["plain", "legacy"]
    assert "export 'legacy' will be refused: tls_required" in caplog.text
    assert "'plain'" not in caplog.text


def test_each_node_hears_only_of_its_own_changes(r, default_node, storage_root) -> None:
    """One channel per node: a policy shared by two nodes sends one notice on each node's
    channel, naming that node; an export change reaches its own node's channel alone."""
    other = WorkerNode.objects.create(
        name="second",
        listen="127.0.0.1:10810",
        storage_root=str(storage_root),
        tls_policy=default_node.tls_policy,
    )
    publisher.drain()
    policy = default_node.tls_policy

    def policy_and_export() -> None:
        policy.min_tls_version = "1.3"
        policy.save()
        publisher.drain()
        make_export(other, "elsewhere")

    on_second: list[str] = []

    def watching_second() -> None:
        on_second.extend(notices_of(r, other, policy_and_export))

    on_default = notices_of(r, default_node, watching_second)
    assert [n.split(":")[0] for n in on_default] == [default_node.name]
    assert [n.split(":")[0] for n in on_second] == ["second", "second"]


def test_a_policy_change_republishes_every_node_using_it(r, default_node, storage_root) -> None:
    other = WorkerNode.objects.create(
        name="second",
        listen="127.0.0.1:10810",
        storage_root=str(storage_root),
        tls_policy=default_node.tls_policy,
    )
    lonely = WorkerNode.objects.create(
        name="third",
        listen="127.0.0.1:10811",
        storage_root=str(storage_root),
        tls_policy=TLSPolicy.objects.create(name="other-policy"),
    )
    publisher.drain()
    r.flushdb()
    policy = default_node.tls_policy
    policy.min_tls_version = "1.3"
    policy.save()
    assert published(r, default_node) is not None
    assert published(r, other) is not None
    assert published(r, lonely) is None


def test_snapshot_follows_changes_and_deletes(r, default_node) -> None:
    export = make_export(default_node, "disk")
    first = published(r, default_node)
    export.enabled = False
    export.save()
    second = published(r, default_node)
    assert second.exports == ()
    assert second.generation > first.generation
    export.enabled = True
    export.save()
    assert [e.name for e in published(r, default_node).exports] == ["disk"]
    export.delete()
    assert published(r, default_node).exports == ()
    assert int(r.get(published_key(default_node.name))) == published(r, default_node).generation


# -- after commit, once --------------------------------------------------------------------------


def test_nothing_is_published_before_commit(r, default_node) -> None:
    with transaction.atomic():
        make_export(default_node, "pending")
        assert r.get(head_key(default_node.name)) is None
    assert [e.name for e in published(r, default_node).exports] == ["pending"]


def test_a_rolled_back_transaction_publishes_nothing(r, default_node) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        make_export(default_node, "never")
        raise Abort
    assert not PendingPublish.objects.exists()
    assert r.get(head_key(default_node.name)) is None
    assert r.get(generation_key(default_node.name)) is None
    # The next transaction still publishes.
    make_export(default_node, "later")
    assert [e.name for e in published(r, default_node).exports] == ["later"]


def test_a_rolled_back_savepoint_does_not_lose_the_outer_change(r, default_node) -> None:
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            make_export(default_node, "inner")
            raise RuntimeError
        make_export(default_node, "outer")
    assert [e.name for e in published(r, default_node).exports] == ["outer"]


def test_one_publish_per_node_per_transaction(r, default_node) -> None:
    def one_transaction() -> None:
        with transaction.atomic():
            for i in range(5):
                make_export(default_node, f"d{i}")
            default_node.storage_root = default_node.storage_root + "/"
            default_node.save()

    notices = notices_of(r, default_node, one_transaction)
    config = published(r, default_node)
    assert notices == [f"{default_node.name}:{config.generation}"]
    assert len(config.exports) == 5


def test_generation_grows_even_after_redis_lost_its_counter(r, default_node) -> None:
    make_export(default_node, "a")
    before = published(r, default_node).generation
    r.flushdb()  # Redis restarted without its data
    make_export(default_node, "b")
    assert published(r, default_node).generation > before


# -- Redis outage ---------------------------------------------------------------------------------


def test_redis_outage_fails_no_request_and_the_change_is_published_when_redis_is_back(
    r, default_node, api, settings, caplog, redis_server
) -> None:
    redis_server.stop()
    try:
        with caplog.at_level(logging.ERROR, logger="exports_app.publishing"):
            response = api.post(
                "/api/v1/nodes/",
                {"name": "other", "listen": "127.0.0.1:10812", "storage_root": "/srv/other"},
            )
            assert response.status_code == 201, response.content
            make_export(default_node, "during-outage")
            # The markers stay until a publish has stored what they mark.
            other = WorkerNode.objects.get(name="other")
            assert PendingPublish.objects.filter(node__in=[default_node, other]).count() == 2
            # Named as operators know the node (operations.md quotes this line), not by its id.
            retrying = f"node {default_node.name!r}: config not published, retrying"
            # A publisher thread left backing off by an earlier test tries within its longest
            # backoff.
            poll(lambda: retrying in caplog.text, "the retry logged", 3 * publisher.RETRY_MAX_DELAY)
    finally:
        redis_server.start()  # the module's other tests need it, whatever happened here
    # No further change: the publisher thread tries again and publishes both once Redis answers.
    poll(
        lambda: not PendingPublish.objects.exists(),
        "the publisher caught up",
        3 * publisher.RETRY_MAX_DELAY,
    )
    assert [e.name for e in published(r, default_node).exports] == ["during-outage"]
    assert published(r, other) is not None


def test_a_node_that_keeps_failing_does_not_hold_back_another_nodes_publish(
    r, default_node, storage_root, monkeypatch
) -> None:
    failing = WorkerNode.objects.create(
        name="failing",
        listen="127.0.0.1:10813",
        storage_root=str(storage_root),
        tls_policy=default_node.tls_policy,
    )
    publisher.drain()
    # The next publisher thread starts afresh, with the long first backoff below.
    poll(lambda: publisher._publisher()._thread is None, "the publisher idle", 20)
    attempts: list[int] = []
    real_publish_node = publisher.publish_node

    def publish_node(node_id: int, **kwargs):
        if node_id == failing.pk:
            attempts.append(node_id)
            raise redis.ConnectionError("this node's publish fails")
        return real_publish_node(node_id, **kwargs)

    monkeypatch.setattr(publisher, "publish_node", publish_node)
    monkeypatch.setattr(publisher, "RETRY_FIRST_DELAY", 120.0)
    make_export(failing, "stuck")
    poll(lambda: attempts, "the failing node's publish tried", 20)
    make_export(default_node, "prompt")

    def prompt_published() -> bool:
        config = read_entries(r, default_node)
        return config is not None and [e.name for e in config.exports] == ["prompt"]

    poll(prompt_published, "the healthy node published during the other's backoff", 20)


def test_the_publisher_thread_survives_an_unexpected_error(r, default_node, monkeypatch) -> None:
    publisher.drain()
    failures: list[int] = []
    real_publish_each = publisher._publish_each

    def publish_each(node_ids):
        if not failures:
            failures.append(1)
            raise RuntimeError("something nobody expected")
        return real_publish_each(node_ids)

    monkeypatch.setattr(publisher, "_publish_each", publish_each)
    make_export(default_node, "first")
    poll(lambda: failures, "the unexpected error raised", 20)
    make_export(default_node, "second")

    def both_published() -> bool:
        config = read_entries(r, default_node)
        return config is not None and sorted(e.name for e in config.exports) == ["first", "second"]

    # By the publisher thread, not drain(): before, the thread died and no change of this
    # process was published again.
    poll(both_published, "both changes published by the thread", 3 * publisher.RETRY_MAX_DELAY)


def test_publish_config_command_republishes_every_node(r, default_node) -> None:
    from django.core.management import call_command

    make_export(default_node, "a")
    publisher.drain()
    r.flushdb()
    call_command("publish_config")
    assert [e.name for e in published(r, default_node).exports] == ["a"]


# -- out of band ---------------------------------------------------------------------------------


def hold_publisher_lock(r, node: WorkerNode, ttl_ms: int = 60_000) -> None:
    """Another publisher (of another process, or one that died) holds the node's lock."""
    deadline = time.monotonic() + 10
    # This process's publisher thread may be looking at the node's markers right now.
    while not r.set(publishing.lock_key(node.name), "someone-else", nx=True, px=ttl_ms):
        assert time.monotonic() < deadline, "the publisher lock stayed taken"
        time.sleep(0.01)


def notices_of(r, node: WorkerNode, action) -> list[str]:
    """The notices on `node`'s channel while `action()` runs and every change is published."""
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(config_channel(node.name))
    try:
        action()
        publisher.drain()
        # A sentinel published after the drain marks the end of what the change published.
        r.publish(config_channel(node.name), "end")
        notices = []
        while (message := pubsub.get_message(timeout=10)) is None or message["data"] != "end":
            if message is not None:
                notices.append(message["data"])
    finally:
        pubsub.close()
    return notices


def test_a_request_returns_without_waiting_for_its_publish(r, default_node, api) -> None:
    export = make_export(default_node, "disk")
    applied = published(r, default_node).generation
    # A worker running the latest published generation.
    beat = heartbeat_record(default_node.name, {"generation": applied})
    r.set(heartbeat_key(default_node.name), beat)
    assert api.get(f"/api/v1/nodes/{default_node.pk}/").json()["status"]["current"] is True
    hold_publisher_lock(r, default_node)
    try:
        response = api.patch(f"/api/v1/exports/{export.pk}/", {"read_only": True}, format="json")
        assert response.status_code == 200, response.content
        # Committed and answered while the node's publisher is busy: the change is marked,
        # the node reads as not current, the worker's config is still the old one.
        assert PendingPublish.objects.filter(node=default_node).exists()
        assert int(r.get(published_key(default_node.name))) == applied
        status = api.get(f"/api/v1/nodes/{default_node.pk}/").json()["status"]
        assert status["current"] is False
    finally:
        r.delete(publishing.lock_key(default_node.name))
    assert published(r, default_node).exports[0].read_only is True
    assert not PendingPublish.objects.exists()


def test_changes_made_while_a_publish_runs_go_out_as_one(r, default_node) -> None:
    def five_changes() -> None:
        hold_publisher_lock(r, default_node)
        for i in range(5):  # five transactions
            make_export(default_node, f"d{i}")
        r.delete(publishing.lock_key(default_node.name))

    notices = notices_of(r, default_node, five_changes)
    config = published(r, default_node)
    assert notices == [f"{default_node.name}:{config.generation}"]
    assert len(config.exports) == 5


def test_a_publisher_that_died_holding_the_lock_delays_but_loses_nothing(r, default_node) -> None:
    hold_publisher_lock(r, default_node, ttl_ms=300)  # its holder is gone: the lock expires
    make_export(default_node, "survives")
    assert [e.name for e in published(r, default_node).exports] == ["survives"]


def test_the_beat_sweep_publishes_what_a_dead_process_left(r, default_node) -> None:
    # A process that committed its change and died before waking its publisher leaves only
    # the marker.
    Export.objects.filter(pk=make_export(default_node, "x", enabled=False).pk).update(enabled=True)
    PendingPublish.objects.create(node=default_node)
    from exports_app.tasks import publish_pending

    publish_pending()
    # Published by the sweep (or, had it found the lock taken, by the holder on release).
    deadline = time.monotonic() + 10
    while PendingPublish.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not PendingPublish.objects.exists()
    config = read_entries(r, default_node)
    assert [e.name for e in config.exports] == ["x"]


# -- only what the worker sees -----------------------------------------------------------------


def test_a_policy_description_edit_publishes_nothing(r, default_node) -> None:
    policy = default_node.tls_policy

    def edit() -> None:
        policy.description = "cosmetic"
        policy.save()
        default_node.description = "cosmetic too"
        default_node.save()

    assert notices_of(r, default_node, edit) == []
    assert r.get(head_key(default_node.name)) is None


def test_an_export_the_worker_does_not_serve_publishes_nothing(r, default_node) -> None:
    def edits() -> None:
        export = make_export(default_node, "off", enabled=False)
        export.description = "still off"
        export.save()
        make_export(default_node, "new", state=ExportState.PROVISIONING)
        export.delete()

    assert notices_of(r, default_node, edits) == []


def test_a_served_exports_description_and_size_publish(r, default_node) -> None:
    export = make_export(default_node, "disk")
    publisher.drain()

    def describe() -> None:
        export.description = "the worker serves this text"
        export.save()

    assert len(notices_of(r, default_node, describe)) == 1
    assert published(r, default_node).exports[0].description == "the worker serves this text"

    def grow() -> None:
        export.size = 2 << 20  # a resize job's end: the worker must read the new size
        export.save()

    assert len(notices_of(r, default_node, grow)) == 1


def test_a_create_publishes_once_when_its_image_is_ready(r, default_node) -> None:
    from exports_app.services import export_states

    def create_then_ready() -> None:
        export = make_export(default_node, "fresh", state=ExportState.PROVISIONING)
        publisher.drain()
        export_states.set_state(export, ExportState.READY)

    notices = notices_of(r, default_node, create_then_ready)
    assert len(notices) == 1
    assert [e.name for e in published(r, default_node).exports] == ["fresh"]


# -- cost follows the change ------------------------------------------------------------------


def stored_head(r, node: WorkerNode):
    return verify_head(r.get(head_key(node.name)), node_key(node.name), node=node.name)


def entry_generations(r, node: WorkerNode) -> dict[str, int]:
    key = node_key(node.name)
    return {
        field: verify_entry(value, key, node=node.name, field=field).generation
        for field, value in r.hgetall(entries_key(node.name)).items()
    }


def test_a_change_writes_only_the_entries_it_touches(r, default_node) -> None:
    exports = [make_export(default_node, f"d{i}") for i in range(5)]
    publisher.drain()
    before = stored_head(r, default_node)
    generations = entry_generations(r, default_node)

    exports[2].description = "only this one"
    exports[2].save()
    publisher.drain()
    head = stored_head(r, default_node)
    field = f"export:{exports[2].pk}"
    assert (head.previous, head.changed, head.count) == (before.generation, (field,), 6)
    after = entry_generations(r, default_node)
    assert after.pop(field) == head.generation
    generations.pop(field)
    assert after == generations  # no other entry was written

    policy = default_node.tls_policy
    policy.min_tls_version = "1.3"
    policy.save()
    publisher.drain()
    assert stored_head(r, default_node).changed == ("tls",)

    removed = exports[0].pk
    exports[0].delete()
    publisher.drain()
    head = stored_head(r, default_node)
    assert head.changed == (f"export:{removed}",) and head.count == 5
    assert [e.name for e in published(r, default_node).exports] == ["d1", "d2", "d3", "d4"]


def test_entries_damaged_in_redis_are_rewritten_whole_by_the_next_publish(r, default_node) -> None:
    exports = [make_export(default_node, f"d{i}") for i in range(3)]
    publisher.drain()
    r.hdel(entries_key(default_node.name), f"export:{exports[1].pk}")  # an attacker's HDEL
    exports[0].description = "changed"
    exports[0].save()
    publisher.drain()
    assert stored_head(r, default_node).changed is None  # a whole rewrite
    assert [e.name for e in published(r, default_node).exports] == ["d0", "d1", "d2"]


# -- hostile Redis: what the publisher reads back ------------------------------------------------


@pytest.mark.parametrize("key_of", [generation_key, published_key], ids=["generation", "published"])
@pytest.mark.parametrize("wrong_type", [False, True], ids=["text", "hash"])
def test_a_garbage_stored_generation_is_counted_and_overwritten_and_the_change_arrives(
    r, default_node, key_of, wrong_type
) -> None:
    make_export(default_node, "a")
    publisher.drain()
    refused = publishing.refused_values["generation"]
    r.delete(key_of(default_node.name))
    if wrong_type:
        r.hset(key_of(default_node.name), "not", "a string")
    else:
        r.set(key_of(default_node.name), "not a number")
    make_export(default_node, "b")
    assert [e.name for e in published(r, default_node).exports] == ["a", "b"]
    if key_of is generation_key:
        assert publishing.refused_values["generation"] > refused
    # else: the published generation is written for the status, never believed
    assert r.get(key_of(default_node.name)).isdigit()  # overwritten from the truth


@pytest.mark.parametrize("key_of", [generation_key, published_key], ids=["generation", "published"])
@pytest.mark.parametrize("forged", [10**19, 10**17, 2**63 - 1])
def test_a_forged_far_future_generation_is_not_believed_and_loses_no_change(
    r, default_node, key_of, forged
) -> None:
    make_export(default_node, "a")
    publisher.drain()
    before = stored_head(r, default_node).generation
    r.set(key_of(default_node.name), forged)
    make_export(default_node, "b")
    assert [e.name for e in published(r, default_node).exports] == ["a", "b"]
    assert not PendingPublish.objects.exists()
    generation = stored_head(r, default_node).generation
    # Above what the worker applied, and near the clock: a worker is never pushed out of reach.
    assert before < generation <= time.time_ns() // 1_000_000 + publishing.GENERATION_AHEAD_MS
    # The next change follows on from the real generation.
    make_export(default_node, "c")
    assert published(r, default_node).generation > generation


def sent_by_redis(r) -> int:
    return int(r.info("stats")["total_net_output_bytes"])


@pytest.mark.parametrize("wrong_type", [False, True], ids=["giant", "hash"])
def test_a_giant_head_is_not_read_whole_and_is_rewritten(r, default_node, wrong_type) -> None:
    make_export(default_node, "a")
    publisher.drain()
    r.delete(head_key(default_node.name))
    if wrong_type:
        r.hset(head_key(default_node.name), "not", "a string")
    else:
        r.setrange(head_key(default_node.name), 8 << 20, b"x")
    before = sent_by_redis(r)
    make_export(default_node, "b")
    publisher.drain()
    assert sent_by_redis(r) - before < 1 << 20
    assert [e.name for e in read_entries(r, default_node).exports] == ["a", "b"]


def test_a_giant_entry_is_not_read_whole_and_is_rewritten(r, default_node) -> None:
    export = make_export(default_node, "a")
    publisher.drain()
    r.hset(entries_key(default_node.name), f"export:{export.pk}", "x" * (8 << 20))
    before = sent_by_redis(r)
    export.description = "changed"
    export.save()
    publisher.drain()
    assert sent_by_redis(r) - before < 1 << 20
    assert [e.description for e in read_entries(r, default_node).exports] == ["changed"]


def test_publish_config_publishes_what_was_marked_while_it_held_the_lock(
    r, default_node, monkeypatch
) -> None:
    make_export(default_node, "a")
    publisher.drain()
    real = publishing._publish_one

    def publish_while_another_process_marks(client, node, scopes=None):
        # Another process changes the node now: its publisher finds the lock taken and leaves
        # the marker to the holder.
        if not Export.objects.filter(name="late").exists():
            make_export(default_node, "late")
        return real(client, node, scopes)

    monkeypatch.setattr(publishing, "_publish_one", publish_while_another_process_marks)
    # The other process's publisher is not this one's thread: nothing here publishes the mark.
    monkeypatch.setattr(publisher._Publisher, "wake", lambda self, ids: None)
    publishing.publish_nodes([default_node.pk])
    assert not PendingPublish.objects.exists()
    assert [e.name for e in read_entries(r, default_node).exports] == ["a", "late"]


# -- many nodes at once ---------------------------------------------------------------------------


def test_a_policy_shared_by_many_nodes_is_published_in_one_batch_of_constant_queries(
    r, default_node, storage_root, monkeypatch
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    nodes = [default_node] + [
        WorkerNode.objects.create(
            name=f"n{i}",
            listen=f"127.0.0.1:{10820 + i}",
            storage_root=str(storage_root),
            tls_policy=default_node.tls_policy,
        )
        for i in range(7)
    ]
    for node in nodes:
        make_export(node, f"disk-{node.name}")
    publisher.drain()
    hold_publisher_lock(r, nodes[-1])  # another process publishes this one: left to it
    before = {node.name: stored_head(r, node).generation for node in nodes}
    monkeypatch.setattr(publisher._Publisher, "wake", lambda self, ids: None)
    policy = default_node.tls_policy
    policy.min_tls_version = "1.3"
    policy.save()

    with CaptureQueriesContext(connection) as queries:
        publishing.publish_pending_batch([node.pk for node in nodes])
    # Nodes, markers, the policy's certificate, CAs and revocations, the markers' delete: the
    # same for 8 nodes as for 2.
    assert len(queries) <= 8, [q["sql"] for q in queries]
    for node in nodes[:-1]:
        head = stored_head(r, node)
        assert head.changed == ("tls",) and head.generation > before[node.name]
        assert entry_generations(r, node)["tls"] == head.generation
    assert stored_head(r, nodes[-1]).generation == before[nodes[-1].name]
    assert list(PendingPublish.objects.values_list("node__name", flat=True)) == [nodes[-1].name]
    r.delete(publishing.lock_key(nodes[-1].name))
    publisher.publish_pending()
    assert stored_head(r, nodes[-1]).changed == ("tls",)
    assert not PendingPublish.objects.exists()
