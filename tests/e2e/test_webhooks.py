"""Webhooks end to end: events emitted by a real Celery worker's job and by the API reach a
real HTTP receiver on 127.0.0.1 through the delivery task, signed, retried with backoff after
an error answer, and given up after the last attempt; the delivery log has every response code.

Deliveries to 127.0.0.1 need NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES (set here for the test
process and the worker); tests/web/test_webhooks.py proves the refusal without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

from exports_app.models import TLSPolicy, WebhookDelivery, WebhookSubscription, WorkerNode
from tests.support.celery import RunningCelery, database_url, start_celery_worker
from tests.support.polling import poll
from tests.support.webhookreceiver import webhook_receiver

# serialized_rollback, like every transactional test of the suite: a plain one's flush makes
# the content types anew under other ids, and the next serialized test then fails to load.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

SECRET = "e2e-webhook-secret-0123"
MAX_ATTEMPTS = 3


@pytest.fixture
def node_name() -> str:
    return f"wh-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def worker(node_name: str, settings, tmp_path: Path) -> Iterator[RunningCelery]:
    queue = f"node.{node_name}"
    (tmp_path / "images").mkdir()
    settings.NBDWEB_EVENTS_QUEUE = queue
    settings.NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True
    running = start_celery_worker(
        queue,
        env={
            "DATABASE_URL": database_url(connection.settings_dict),
            "DATABASE_CONN_MAX_AGE": "0",
            # The jobs touch images only under this host's storage roots.
            "NBDWORKER_STORAGE_ROOTS": str(tmp_path / "images"),
            "NBDWEB_EVENTS_QUEUE": queue,
            "NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "1",
            "NBDWEB_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
            "NBDWEB_WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        },
    )
    yield running
    running.stop()


@pytest.fixture
def node(worker, node_name: str, tmp_path: Path) -> WorkerNode:
    return WorkerNode.objects.create(
        name=node_name,
        listen="127.0.0.1:10809",
        storage_root=str(tmp_path / "images"),
        tls_policy=TLSPolicy.objects.create(name=f"p-{node_name}"),
    )


@contextlib.contextmanager
def shows_log_on_failure(worker: RunningCelery) -> Iterator[None]:
    try:
        yield
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\ncelery worker log:\n{worker.log_tail(40)}")


def subscribe(api, url: str, kinds: list[str]) -> WebhookSubscription:
    response = api.post(
        "/api/v1/webhooks/",
        {"name": f"h-{uuid.uuid4().hex[:6]}", "target_url": url, "event_types": kinds,
         "secret": SECRET},
    )  # fmt: skip
    assert response.status_code == 201, response.content
    return WebhookSubscription.objects.get(pk=response.json()["id"])


def verify_signature(headers: dict[str, str], body: bytes) -> None:
    stamp, signature = headers["x-nbdweb-signature"].split(",")
    message = f"{stamp.removeprefix('t=')}.".encode() + body
    expected = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, f"v1={expected}")


def finished(subscription: WebhookSubscription) -> WebhookDelivery | None:
    return subscription.deliveries.exclude(state="pending").first()


def test_a_job_outcome_is_delivered_after_a_retry(api, node, worker) -> None:
    with webhook_receiver([500, 200]) as receiver:
        subscription = subscribe(api, receiver.url, ["job.succeeded"])
        response = api.post("/api/v1/exports/", {"name": "hooked", "size": "1M", "node": node.pk})
        assert response.status_code == 201, response.content
        with shows_log_on_failure(worker):
            first, second = receiver.wait_for(2, timeout=60)
        delivery = poll(lambda: finished(subscription), "the delivery to finish", 30)
    assert first.body == second.body  # the same event, sent again
    assert first.headers["x-nbdweb-delivery"] == second.headers["x-nbdweb-delivery"]
    for request in (first, second):
        verify_signature(request.headers, request.body)
    event = json.loads(second.body)
    assert event["kind"] == "job.succeeded"
    assert event["data"]["export"] == response.json()["id"]
    assert delivery.state == "succeeded" and delivery.attempts == 2
    assert [a["response_code"] for a in delivery.attempt_log] == [500, 200]
    assert len(receiver.requests) == 2


def test_a_revocation_from_the_api_is_delivered(api, node, worker, client_cert) -> None:
    with webhook_receiver([204]) as receiver:
        subscription = subscribe(api, receiver.url, ["certificate.revoked"])
        assert api.post(f"/api/v1/certificates/{client_cert}/revoke/", {}).status_code == 200
        (request,) = receiver.wait_for(1, timeout=60)
        delivery = poll(lambda: finished(subscription), "the delivery to finish", 30)
    verify_signature(request.headers, request.body)
    assert json.loads(request.body)["object"]["id"] == client_cert
    assert request.headers["x-nbdweb-event"] == "certificate.revoked"
    assert delivery.state == "succeeded" and delivery.response_code == 204


def test_a_delivery_gives_up_after_the_last_attempt(api, node, worker, client_cert) -> None:
    with webhook_receiver([500]) as receiver:
        subscription = subscribe(api, receiver.url, ["certificate.revoked"])
        api.post(f"/api/v1/certificates/{client_cert}/revoke/", {})
        delivery = poll(lambda: finished(subscription), "the delivery to give up", 60)
        assert len(receiver.requests) == MAX_ATTEMPTS
    assert delivery.state == "failed" and delivery.attempts == MAX_ATTEMPTS
    assert [a["response_code"] for a in delivery.attempt_log] == [500] * MAX_ATTEMPTS
    assert delivery.error == "HTTP 500"


@pytest.fixture
def client_cert(api) -> int:
    authority = api.post(
        "/api/v1/authorities/", {"name": f"ca-{uuid.uuid4().hex[:6]}", "common_name": "hooks CA"}
    )
    assert authority.status_code == 201, authority.content
    response = api.post(
        "/api/v1/certificates/",
        {"name": f"c-{uuid.uuid4().hex[:6]}", "authority": authority.json()["id"],
         "kind": "client", "common_name": "alice"},
    )  # fmt: skip
    assert response.status_code == 201, response.content
    return response.json()["id"]
