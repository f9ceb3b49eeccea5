"""Idempotency keys for the API's POSTs (creating objects, starting jobs).

`begin(user, key, digest)` reserves the key for the request, or says what to do instead: replay
the stored answer (the same request, within KEY_LIFETIME), refuse it (the same key with another
request: 422; the first request still running: 409). `finish` stores a success's answer;
`abandon` frees the key after a failure (a 4xx or 5xx answer, or an unhandled exception), so
the client can try again. A key whose request never finished (its process was killed) is
taken over by a retry after IN_PROGRESS_LIMIT. Expired keys are purged whenever a key is used.

Each claim is fenced by its `created` time (a takeover sets a new one): a request whose key was
taken over, and that ends after all, neither frees nor overwrites its successor's claim (else a
failing first request would delete the successor's stored answer, and the next retry would run
the POST again).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from exports_app.models import IdempotencyKey

__all__ = [
    "IN_PROGRESS_LIMIT",
    "KEY_LIFETIME",
    "MAX_KEY_LENGTH",
    "Outcome",
    "abandon",
    "begin",
    "digest",
    "finish",
]

KEY_LIFETIME = timedelta(hours=24)
# Longer than requests run: a key still unfinished after this most likely belongs to a request
# that died with its process. Not surely (gunicorn's gthread workers do not kill a slow request
# at GUNICORN_TIMEOUT), hence the fencing of finish and abandon.
IN_PROGRESS_LIMIT = timedelta(minutes=5)
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Outcome:
    """What `begin` found: `record` to finish (a new request), or `replay` / `mismatch` /
    `in_progress` for a key used before."""

    record: IdempotencyKey | None = None
    replay: IdempotencyKey | None = None
    mismatch: bool = False
    in_progress: bool = False


def digest(method: str, path: str, body: bytes) -> str:
    """The request's identity: method, path and body (JSON re-serialised so key order and
    whitespace do not matter)."""
    try:
        canonical = json.dumps(json.loads(body or b"null"), sort_keys=True).encode()
    except ValueError:
        canonical = body
    return hashlib.sha256(b"\0".join([method.encode(), path.encode(), canonical])).hexdigest()


def begin(user, key: str, request_digest: str) -> Outcome:
    now = timezone.now()
    IdempotencyKey.objects.filter(expires__lte=now).delete()
    try:
        with transaction.atomic():
            record = IdempotencyKey.objects.create(
                user=user, key=key, request_digest=request_digest, expires=now + KEY_LIFETIME
            )
        return Outcome(record=record)
    except IntegrityError:
        pass
    found = IdempotencyKey.objects.filter(user=user, key=key).first()
    if found is None:  # freed between the two statements: the client may simply retry
        return Outcome(in_progress=True)
    if found.request_digest != request_digest:
        return Outcome(mismatch=True)
    if found.status_code is None:
        taken_over = IdempotencyKey.objects.filter(
            pk=found.pk, status_code=None, created__lte=now - IN_PROGRESS_LIMIT
        ).update(created=now, expires=now + KEY_LIFETIME)
        if taken_over:
            found.refresh_from_db()
            return Outcome(record=found)
        return Outcome(in_progress=True)
    return Outcome(replay=found)


def _own_claim(record: IdempotencyKey):
    """`record`'s row while it is still this request's claim (not taken over since)."""
    return IdempotencyKey.objects.filter(pk=record.pk, created=record.created, status_code=None)


def finish(record: IdempotencyKey, status_code: int, body: object) -> None:
    _own_claim(record).update(status_code=status_code, response_body=body)


def abandon(record: IdempotencyKey) -> None:
    _own_claim(record).delete()
