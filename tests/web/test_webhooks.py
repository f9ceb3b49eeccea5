"""Webhook subscriptions through the API and the admin, the URL rules (no private, loopback or
link-local address unless an administrator allows them, at save and again at delivery), and
one signed delivery attempt against a real HTTP receiver on 127.0.0.1.

The delivery task with its retries under a real Celery worker: tests/e2e/test_webhooks.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket

import pytest

from exports_app.models import WebhookDelivery, WebhookSubscription
from exports_app.services import webhooks
from tests.support.webhookreceiver import webhook_receiver

WEBHOOKS = "/api/v1/webhooks/"
SECRET = "s3cret-for-webhook-tests"


@pytest.fixture
def allow_private(settings):
    settings.NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True


def body(url: str, **extra) -> dict:
    return {"name": "ci", "target_url": url, "secret": SECRET, **extra}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_private_addresses_are_refused_by_default(api, url) -> None:
    response = api.post(WEBHOOKS, body(url))
    assert response.status_code == 400, response.content
    assert "private or local address" in response.json()["target_url"][0]
    assert not WebhookSubscription.objects.exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("http://user:pw@example.com/", "Credentials"),
        ("http:///nohost", "no host"),
        ("http://example.com:99999/", "port"),
        ("http://exa mple.com/", "Not a valid URL"),
        ("http://no-such-host.invalid/", "cannot resolve"),
    ],
)
def test_bad_urls_are_field_errors(api, allow_private, url, message) -> None:
    response = api.post(WEBHOOKS, body(url))
    assert response.status_code == 400
    assert message in response.json()["target_url"][0]


def test_create_with_private_address_allowed(api, allow_private, superuser) -> None:
    response = api.post(WEBHOOKS, body("http://127.0.0.1:9/hook", event_types=["job.failed"]))
    assert response.status_code == 201, response.content
    data = response.json()
    assert "secret" not in data and "secret_encrypted" not in data
    assert data["event_types"] == ["job.failed"]
    assert data["owner"] == superuser.username
    subscription = WebhookSubscription.objects.get()
    assert subscription.secret() == SECRET
    assert SECRET not in subscription.secret_encrypted
    # Changing other fields keeps the secret; a new one replaces it.
    assert api.patch(data["url"], {"enabled": False}).status_code == 200
    subscription.refresh_from_db()
    assert subscription.secret() == SECRET and not subscription.enabled
    assert api.patch(data["url"], {"secret": "another-secret-1234"}).status_code == 200
    subscription.refresh_from_db()
    assert subscription.secret() == "another-secret-1234"


def test_create_needs_a_good_secret_and_known_kinds(api, allow_private) -> None:
    url = "http://127.0.0.1:9/hook"
    assert "secret" in api.post(WEBHOOKS, {"name": "a", "target_url": url}).json()
    assert "secret" in api.post(WEBHOOKS, body(url, secret="short")).json()
    assert "secret" in api.post(WEBHOOKS, body(url, secret="with space in it!!")).json()
    response = api.post(WEBHOOKS, body(url, event_types=["export.exploded"]))
    assert response.status_code == 400 and "event_types" in response.json()


def test_webhooks_need_their_model_permissions(make_user, token_client, allow_private) -> None:
    viewer = token_client(make_user("exports_app.view_webhooksubscription"))
    assert viewer.get(WEBHOOKS).status_code == 200
    assert viewer.post(WEBHOOKS, body("http://127.0.0.1:9/")).status_code == 403
    assert token_client(make_user()).get(WEBHOOKS).status_code == 403


def _subscription(url: str, **fields) -> WebhookSubscription:
    fields.setdefault("name", "receiver")
    subscription = WebhookSubscription(target_url=url, **fields)
    subscription.set_secret(SECRET)
    subscription.save()
    return subscription


def _delivery(subscription: WebhookSubscription) -> WebhookDelivery:
    return WebhookDelivery.objects.create(
        subscription=subscription,
        event_id="1-0",
        event_kind="node.online",
        payload={"id": "1-0", "kind": "node.online", "object": {"name": "n"}, "data": {}},
    )


def test_a_delivery_is_signed_and_logged(db, allow_private) -> None:
    with webhook_receiver([200]) as receiver:
        delivery = _delivery(_subscription(receiver.url))
        result = webhooks.attempt_delivery(delivery)
        assert result.ok and result.response_code == 200
        (request,) = receiver.wait_for(1)
    assert request.path == "/hook"
    assert request.headers["x-nbdweb-event"] == "node.online"
    assert request.headers["x-nbdweb-delivery"] == str(delivery.pk)
    stamp, signature = request.headers["x-nbdweb-signature"].split(",")
    timestamp = stamp.removeprefix("t=")
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256)
    assert signature == f"v1={expected.hexdigest()}"
    assert json.loads(request.body)["kind"] == "node.online"
    delivery.refresh_from_db()
    assert delivery.attempts == 1 and delivery.response_code == 200
    assert delivery.attempt_log[0]["response_code"] == 200


def test_a_non_2xx_answer_is_a_failed_attempt(db, allow_private) -> None:
    with webhook_receiver([503]) as receiver:
        delivery = _delivery(_subscription(receiver.url))
        result = webhooks.attempt_delivery(delivery)
    assert not result.ok and result.response_code == 503
    delivery.refresh_from_db()
    assert delivery.error == "HTTP 503"


def test_delivery_time_check_refuses_private_addresses(db, settings) -> None:
    """Saved while allowed (or before its name pointed inward): refused when sent."""
    with webhook_receiver([200]) as receiver:
        settings.NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True
        delivery = _delivery(_subscription(receiver.url))
        settings.NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
        result = webhooks.attempt_delivery(delivery)
        assert not result.ok and result.response_code is None
        assert "private or local address" in result.error
        assert receiver.requests == []


def test_a_name_rebound_to_a_private_address_is_refused_at_delivery(db, monkeypatch) -> None:
    """DNS rebinding: the name resolved to a public address when saved, to loopback later."""
    answers = {"hooks.example.com": "93.184.216.34"}
    real = socket.getaddrinfo

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    subscription = _subscription("http://hooks.example.com/hook")
    subscription.full_clean()
    answers["hooks.example.com"] = "127.0.0.1"
    result = webhooks.attempt_delivery(_delivery(subscription))
    assert not result.ok and "private or local address (127.0.0.1)" in result.error


def test_delivery_log_through_the_api(api, allow_private) -> None:
    subscription = _subscription("http://127.0.0.1:9/")
    _delivery(subscription)
    url = f"{WEBHOOKS}{subscription.pk}/deliveries/"
    (entry,) = api.get(url).json()
    assert entry["event_kind"] == "node.online" and entry["state"] == "pending"


def test_admin_adds_a_webhook_with_its_secret(client, superuser, allow_private) -> None:
    client.force_login(superuser)
    response = client.post(
        "/admin/exports_app/webhooksubscription/add/",
        {
            "name": "from-admin",
            "target_url": "http://127.0.0.1:9/hook",
            "event_types": '["node.offline"]',
            "enabled": "on",
            "secret": SECRET,
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    subscription = WebhookSubscription.objects.get(name="from-admin")
    assert subscription.secret() == SECRET and subscription.owner == superuser
    page = client.get(f"/admin/exports_app/webhooksubscription/{subscription.pk}/change/")
    assert SECRET.encode() not in page.content
    assert client.get("/admin/exports_app/webhookdelivery/").status_code == 200


def test_admin_refuses_a_private_url_without_the_setting(client, superuser) -> None:
    client.force_login(superuser)
    response = client.post(
        "/admin/exports_app/webhooksubscription/add/",
        {"name": "x", "target_url": "http://127.0.0.1/", "event_types": "[]", "secret": SECRET},
    )
    assert response.status_code == 200
    assert b"private or local address" in response.content
    assert not WebhookSubscription.objects.exists()


# Security review findings: whose subscriptions a user reaches, ranges that are neither private
# nor public, URLs urlsplit() refuses, and subscriptions that lost their owner.

WEBHOOK_PERMS = (
    "exports_app.view_webhooksubscription",
    "exports_app.change_webhooksubscription",
    "exports_app.delete_webhooksubscription",
)


def test_a_user_cannot_reach_another_users_webhook(
    make_user, token_client, superuser, allow_private
) -> None:
    admins = _subscription("http://127.0.0.1:9/admin", owner=superuser)
    _delivery(admins)
    mallory = make_user(*WEBHOOK_PERMS)
    own = _subscription("http://127.0.0.1:9/own", owner=mallory, name="mallory")
    client = token_client(mallory)
    assert [s["id"] for s in client.get(WEBHOOKS).json()["results"]] == [own.pk]
    detail = f"{WEBHOOKS}{admins.pk}/"
    assert client.get(f"{detail}deliveries/").status_code == 404
    assert client.get(detail).status_code == 404
    response = client.patch(detail, {"target_url": "http://127.0.0.1:9/mallory"}, format="json")
    assert response.status_code == 404
    assert client.delete(detail).status_code == 404
    admins.refresh_from_db()
    assert admins.target_url == "http://127.0.0.1:9/admin"
    # The superuser still manages every subscription.
    assert token_client(superuser).get(f"{detail}deliveries/").status_code == 200


def test_admin_shows_a_staff_user_only_their_own_webhooks(
    client, make_user, superuser, allow_private
) -> None:
    admins = _subscription("http://127.0.0.1:9/admin", owner=superuser)
    _delivery(admins)
    staff = make_user(*WEBHOOK_PERMS, "exports_app.view_webhookdelivery")
    staff.is_staff = True
    staff.save()
    client.force_login(staff)
    change = f"/admin/exports_app/webhooksubscription/{admins.pk}/change/"
    assert client.get(change).status_code == 302  # "does not exist" redirect
    assert b"127.0.0.1:9/admin" not in client.get("/admin/exports_app/webhooksubscription/").content
    deliveries = client.get("/admin/exports_app/webhookdelivery/")
    assert deliveries.status_code == 200 and deliveries.context["cl"].result_count == 0


def test_the_delivery_log_filter_names_no_one_elses_subscription(
    client, make_user, superuser, allow_private
) -> None:
    """The delivery log's subscription filter listed every subscription by name, also to a
    staff user who may see only the delivery log, and only their own deliveries."""
    theirs = _subscription("http://127.0.0.1:9/admin", owner=superuser, name="payroll-secret")
    _delivery(theirs)
    staff = make_user("exports_app.view_webhookdelivery")
    staff.is_staff = True
    staff.save()
    mine = _subscription("http://127.0.0.1:9/mine", owner=staff, name="my-own-hook")
    _delivery(mine)
    client.force_login(staff)
    page = client.get("/admin/exports_app/webhookdelivery/")
    assert page.status_code == 200 and page.context["cl"].result_count == 1
    assert b"payroll-secret" not in page.content
    assert b"my-own-hook" in page.content
    by_id = client.get(f"/admin/exports_app/webhookdelivery/?subscription__id__exact={theirs.pk}")
    assert b"payroll-secret" not in by_id.content


@pytest.mark.parametrize(
    "url",
    [
        "http://100.64.0.1/hook",  # carrier-grade NAT: is_private is False in Python 3.11
        "http://[::ffff:100.64.0.1]/hook",
        "http://[2002:7f00:1::1]/hook",  # 6to4 of 127.0.0.1
        "http://[64:ff9b::a00:1]/hook",  # NAT64 of 10.0.0.1
        "http://192.0.0.8/hook",
        "http://198.18.0.1/hook",  # benchmarking
        "http://224.0.0.1/hook",
    ],
)
def test_non_global_addresses_are_refused(api, url) -> None:
    response = api.post(WEBHOOKS, body(url))
    assert response.status_code == 400, response.content
    assert "private or local address" in response.json()["target_url"][0]


def test_global_addresses_are_accepted() -> None:
    import ipaddress

    for address in ("8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert webhooks._public(ipaddress.ip_address(address)), address


@pytest.mark.parametrize("url", ["http://[::1/x", "http://]x/", "http://\u2100.com/"])
def test_urls_urlsplit_refuses_are_field_errors(api, url) -> None:
    response = api.post(WEBHOOKS, body(url))
    assert response.status_code == 400, response.content
    assert "Not a valid URL" in response.json()["target_url"][0]


def test_a_webhook_whose_owner_was_deleted_gets_no_events(
    make_user, allow_private, monkeypatch
) -> None:
    from exports_app.services import events

    owner = make_user("exports_app.view_workernode")
    subscription = _subscription("http://127.0.0.1:9/", owner=owner)
    owner.delete()
    subscription.refresh_from_db()
    assert subscription.owner is None and subscription.enabled
    event = events.Event(id="1-0", kind="node.online", time="", object={"name": "n"}, data={})
    assert webhooks.fan_out(event) == []
    assert not WebhookDelivery.objects.exists()
