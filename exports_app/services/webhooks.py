"""Webhook deliveries: URL rules, fan-out of an event, and one signed HTTP attempt.

A subscriber's URL is checked when it is saved and again at every attempt: its host is resolved
and every address must be globally routable (`is_global`, not multicast; an IPv4 address
embedded in an IPv4-mapped, 6to4 or NAT64 address must be too) unless
`settings.NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES` is on. An allow-list, not a deny-list: ranges
such as 100.64.0.0/10 (carrier-grade NAT) are neither "private" nor public. The attempt then
connects to the address it checked (never resolving the name a second time), so a DNS answer
that changes in between (DNS rebinding) cannot point a delivery at an internal service.
Redirects are not followed.

Each delivery is a POST of the event's JSON with

    X-Nbdweb-Event: <kind>
    X-Nbdweb-Delivery: <delivery id>
    X-Nbdweb-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

A 2xx answer is a success; anything else, or no answer within `TIMEOUT`, is retried by the
Celery task (`exports_app.tasks.deliver_webhook`) with exponential backoff.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.utils import timezone

from exports_app.models import WebhookDelivery, WebhookSubscription
from exports_app.models.webhooks import MAX_URL_LENGTH, DeliveryState
from exports_app.services import events

__all__ = [
    "TIMEOUT",
    "AttemptResult",
    "attempt_delivery",
    "fan_out",
    "retry_delay",
    "sign",
    "subscriptions_of",
    "validate_url",
]

log = logging.getLogger(__name__)

TIMEOUT = 10.0
USER_AGENT = "nbdweb-webhooks/1"


class AddressRefused(Exception):
    """The URL's host resolves to an address deliveries may not go to."""


NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # Python 3.11 calls ::ffff:100.64.0.1 global: judge the IPv4 address alone.
            candidates = [address.ipv4_mapped]
        if address.sixtofour is not None:
            candidates.append(address.sixtofour)
        if address in NAT64_PREFIX:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    # is_global counts multicast as global; deliveries are unicast HTTP.
    return all(c.is_global and not c.is_multicast for c in candidates)


def subscriptions_of(user, queryset: QuerySet[WebhookSubscription]) -> QuerySet:
    """The subscriptions `user` may see and change: their own; a superuser's, all. The model
    permissions say what a user may do with webhooks, not whose: a delivery log holds event
    payloads its owner may see, and its target URL receives them."""
    if user.is_superuser:
        return queryset
    return queryset.filter(owner=user)


def resolve(host: str, port: int) -> list[str]:
    """The addresses deliveries to `host` may use; AddressRefused when there are none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise AddressRefused(f"cannot resolve {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if settings.NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES:
        return addresses
    refused = [a for a in addresses if not _public(ipaddress.ip_address(a.split("%")[0]))]
    if refused:
        # One private answer refuses the whole name: which one a connection would use is not
        # ours to choose.
        raise AddressRefused(
            f"{host!r} resolves to a private or local address ({', '.join(refused)}); "
            "an administrator must allow those (NBDWEB_WEBHOOK_ALLOW_PRIVATE_ADDRESSES)"
        )
    return addresses


def _split(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        # "http://[::1/x", "http://]x/", "http://\u2100.com/" (NFKC-unsafe netloc).
        raise ValidationError("Not a valid URL.") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError("The URL must start with http:// or https://.")
    if parts.username is not None or parts.password is not None:
        raise ValidationError("Credentials in the URL are not allowed; sign with the secret.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValidationError("The URL's port is not a number from 1 to 65535.") from None
    if not hostname:
        raise ValidationError("The URL has no host.")
    if parts.fragment:
        raise ValidationError("The URL may not have a #fragment.")
    return parts.scheme, hostname, port


def validate_url(url: str) -> str:
    """The URL if deliveries may go to it; ValidationError naming the problem otherwise."""
    url = url.strip()
    if len(url) > MAX_URL_LENGTH or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise ValidationError("Not a valid URL.")
    _, host, port = _split(url)
    try:
        resolve(host, port)
    except AddressRefused as exc:
        raise ValidationError(str(exc)) from None
    return url


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones: doubling, capped."""
    base = settings.NBDWEB_WEBHOOK_RETRY_BASE_SECONDS
    return min(base * 2 ** (attempts - 1), settings.NBDWEB_WEBHOOK_RETRY_MAX_SECONDS)


def fan_out(event: events.Event) -> list[WebhookDelivery]:
    """A delivery row and a Celery task for each enabled subscription that wants `event` and
    whose owner may see it. A subscription whose owner was deleted gets nothing: no one's
    permissions bound what it may receive."""
    # Imported here: the tasks module imports the services.
    from exports_app.tasks import deliver_webhook

    deliveries = []
    subscriptions = WebhookSubscription.objects.filter(
        enabled=True, owner__isnull=False, owner__is_active=True
    ).select_related("owner")
    for subscription in subscriptions:
        if not subscription.wants(event.kind):
            continue
        if not events.visible_to(subscription.owner, event.kind):
            continue
        deliveries.append(
            WebhookDelivery.objects.create(
                subscription=subscription,
                event_id=event.id,
                event_kind=event.kind,
                payload=event.as_dict(),
            )
        )
    for delivery in deliveries:
        deliver_webhook.apply_async((delivery.pk,), queue=settings.NBDWEB_EVENTS_QUEUE)
    return deliveries


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    response_code: int | None
    error: str


def _post(url: str, headers: dict[str, str], body: bytes) -> int:
    scheme, host, port = _split(url)
    address = resolve(host, port)[0]
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if ":" not in host else f"[{host}]"
    if parts.port:
        host_header += f":{port}"
    timeout = urllib3.Timeout(connect=TIMEOUT, read=TIMEOUT)
    if scheme == "https":
        # Connect to the checked address; the certificate is verified against the host name.
        pool = urllib3.HTTPSConnectionPool(
            address, port, timeout=timeout, retries=False, server_hostname=host,
            assert_hostname=host, cert_reqs="CERT_REQUIRED",
        )  # fmt: skip
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
    with pool:
        response = pool.urlopen(
            "POST",
            target,
            body=body,
            headers={**headers, "Host": host_header},
            redirect=False,
            preload_content=False,
        )
        # The answer's body is not ours to keep: at most a little of it is read, then dropped.
        response.read(4096)
        response.release_conn()
        return response.status


def attempt_delivery(delivery: WebhookDelivery) -> AttemptResult:
    """POST `delivery` once and record the attempt on it (not its final state)."""
    subscription = delivery.subscription
    body = json.dumps(delivery.payload, separators=(",", ":"), default=str).encode()
    timestamp = int(time.time())
    code, error = None, ""
    try:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Nbdweb-Event": delivery.event_kind,
            "X-Nbdweb-Delivery": str(delivery.pk),
            "X-Nbdweb-Signature": sign(subscription.secret(), timestamp, body),
        }
        code = _post(subscription.target_url, headers, body)
        if not 200 <= code < 300:
            error = f"HTTP {code}"
    except (AddressRefused, ValidationError) as exc:
        error = " ".join(getattr(exc, "messages", [str(exc)]))
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # KeyDecryptionError and the like: recorded, never a crash loop
        log.exception("webhook delivery %s", delivery.pk)
        error = f"{type(exc).__name__}: {exc}"
    delivery.attempts += 1
    delivery.response_code = code
    delivery.error = error[:2000]
    delivery.attempt_log = [
        *delivery.attempt_log,
        {"at": timezone.now().isoformat(), "response_code": code, "error": error[:500]},
    ]
    delivery.save(update_fields=["attempts", "response_code", "error", "attempt_log"])
    return AttemptResult(ok=not error, response_code=code, error=error)


def finish(delivery: WebhookDelivery, state: str) -> None:
    delivery.state = state
    delivery.finished = timezone.now()
    delivery.save(update_fields=["state", "finished"])
    if state == DeliveryState.FAILED:
        log.warning(
            "webhook %s: delivery %s of %s failed after %d attempts: %s",
            delivery.subscription.name, delivery.pk, delivery.event_kind, delivery.attempts,
            delivery.error,
        )  # fmt: skip
