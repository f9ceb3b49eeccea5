"""Safe retries and races for the API. Idempotency keys: see IdempotentPostsMixin. Optimistic
concurrency: every object answer carries an `ETag`, and a PATCH or
DELETE with `If-Match` goes ahead only while the object is still that version (RFC 9110
§13.1.1), else 412. The check and the write run in one transaction with the row locked, so
two clients that read the same version cannot both change it. A GET whose `If-None-Match`
names the current ETag answers 304 (Django's ConditionalGetMiddleware, which also gives lists
an ETag of their body).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from django.db import models, transaction
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.response import Response

from exports_app.services import idempotency
from exports_app.validators import parse_object_id

__all__ = [
    "READ_WITH_ANSWER",
    "ETagMixin",
    "IdempotentPostsMixin",
    "KeyInUse",
    "PreconditionFailed",
    "UnprocessableKey",
    "if_match_allows",
    "representation_etag",
]

# Actions whose answer is one object: they send its ETag.
OBJECT_ACTIONS = frozenset(
    {"retrieve", "create", "partial_update", "update", "resize", "verify", "revoke", "retry"}
)
PRECONDITION_METHODS = frozenset({"PATCH", "PUT", "DELETE"})
# Serializer context flag: the object was read from the viewset's queryset for this very answer,
# so its annotations (an export's latest job) are current and need no query of their own.
READ_WITH_ANSWER = "read_with_answer"


class PreconditionFailed(APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_detail = "The object changed since it was read (If-Match does not match its ETag)."
    default_code = "precondition_failed"


def representation_etag(
    model: type[models.Model], representation: Any, ignored: Iterable[str] = ()
) -> str:
    """A strong ETag of an object's API answer: a digest of its body but the `ignored` fields.
    A saved change shows in it (every answer has the object's fields and `last_updated`), and
    so does a change from elsewhere (the node's name, the latest job) that a 304 must not
    hide."""
    kept = {k: v for k, v in representation.items() if k not in ignored}
    body = json.dumps(kept, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{model._meta.label}\0{body}".encode())
    return f'"{digest.hexdigest()[:32]}"'


def if_match_allows(header: str | None, etag: str) -> bool:
    """Whether an If-Match header lets a change of the object with `etag` go ahead. No header
    or `*`: always (the object exists). Weak tags never match (strong comparison)."""
    if header is None or header.strip() == "":
        return True
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or etag in tags


class ETagMixin:
    """For model viewsets: ETag on each answer that is one object; If-Match on PATCH, PUT and
    DELETE, checked in get_object on the row locked for the rest of the transaction (the
    viewset runs its update and destroy in one)."""

    # Fields of the answer that are a live report, not the object (a node's `status`, from its
    # worker's heartbeat every 2 s): left out of the version, or every read would be stale.
    etag_ignored_fields: tuple[str, ...] = ()

    def get_object(self):
        if self.request.method not in PRECONDITION_METHODS:
            return super().get_object()
        if transaction.get_connection().in_atomic_block:
            # Lock, then read: nobody can change the row between the check and the write.
            self._lock_requested_row()
        obj = super().get_object()
        header = self.request.headers.get("If-Match")
        # The ETag costs a serialization: only when a header names one.
        needs_etag = header is not None and header.strip() not in ("", "*")
        if needs_etag and not if_match_allows(header, self.current_etag(obj)):
            raise PreconditionFailed()
        return obj

    def _lock_requested_row(self) -> None:
        """Lock the row the URL names (nothing when it names none: get_object answers 404).
        Only that row (of="self", no ordering join): locking its node's row as well would
        queue every change of the node's other exports behind this one."""
        lookup = self.kwargs.get(self.lookup_url_kwarg or self.lookup_field)
        object_id = parse_object_id(lookup) if self.lookup_field == "pk" else None
        if object_id is None:
            return
        model = self.get_queryset().model
        rows = model._default_manager.select_for_update(of=("self",)).filter(pk=object_id)
        list(rows.order_by().values("pk"))

    def representation_of_read(self, obj: models.Model) -> dict:
        """The answer body of `obj`, just read from get_queryset() (its annotations current)."""
        context = {**self.get_serializer_context(), READ_WITH_ANSWER: True}
        return self.get_serializer(obj, context=context).data

    def current_etag(self, obj: models.Model) -> str:
        return representation_etag(
            type(obj), self.representation_of_read(obj), self.etag_ignored_fields
        )

    def current_answer(self, serializer, status_code: int = status.HTTP_200_OK) -> Response:
        """The object `serializer` saved, as a GET reads it now and serialized once: the body
        and its ETag (set in finalize_response from this body) are the version a later
        If-Match names."""
        obj = self.get_queryset().filter(pk=serializer.instance.pk).first()
        if obj is None:  # gone already (a service deleted it): the serializer's view of it
            return Response(serializer.data, status=status_code)
        data = self.representation_of_read(obj)
        # A create names the new object's address (Location), as DRF's create does.
        headers = self.get_success_headers(data) if status_code == status.HTTP_201_CREATED else None
        response = Response(data, status=status_code, headers=headers)
        response.etag_of_body = True
        return response

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        data = getattr(response, "data", None)
        if (
            getattr(self, "action", None) in OBJECT_ACTIONS
            and 200 <= response.status_code < 300
            and isinstance(data, dict)
            and "id" in data
        ):
            model = self.get_queryset().model
            if request.method in ("GET", "HEAD") or getattr(response, "etag_of_body", False):
                # The answer is the object as it is: its body is the version.
                response["ETag"] = representation_etag(model, data, self.etag_ignored_fields)
                return response
            # Read again (as a GET reads it): a service may have changed the row after the
            # serializer saw it.
            obj = self.get_queryset().filter(pk=data["id"]).first()
            if obj is not None:
                response["ETag"] = self.current_etag(obj)
        return response


class UnprocessableKey(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "This Idempotency-Key was used with a different request."
    default_code = "idempotency_key_reused"


class KeyInUse(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "A request with this Idempotency-Key is still running; retry later."
    default_code = "idempotency_key_in_use"


class IdempotentPostsMixin:
    """POSTs with an `Idempotency-Key` header: a retry within 24 h gets the first answer (its
    status and body) and changes nothing; see exports_app.services.idempotency."""

    idempotent_posts = True

    def initial(self, request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)
        self._idempotency_record = None
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or key is None:
            return
        if not key or len(key) > idempotency.MAX_KEY_LENGTH or not key.isprintable():
            raise ValidationError({"Idempotency-Key": ["1 to 255 printable characters."]})
        request_digest = idempotency.digest(request.method, request.path, request.body)
        outcome = idempotency.begin(request.user, key, request_digest)
        if outcome.mismatch:
            raise UnprocessableKey()
        if outcome.in_progress:
            raise KeyInUse()
        if outcome.replay is not None:
            stored = outcome.replay
            # The handler is replaced: the answer is the stored one and nothing runs again.
            self.post = lambda *a, **k: Response(stored.response_body, status=stored.status_code)
            return
        self._idempotency_record = outcome.record

    def handle_exception(self, exc):
        try:
            return super().handle_exception(exc)
        except BaseException:
            # Unhandled (a 500 follows, and finalize_response never runs): free the key, or
            # every retry would be told the request still runs.
            self._release_idempotency_key(succeeded=False)
            raise

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        self._release_idempotency_key(
            succeeded=200 <= response.status_code < 300, response=response
        )
        return response

    def _release_idempotency_key(self, succeeded: bool, response=None) -> None:
        record = getattr(self, "_idempotency_record", None)
        if record is None:
            return
        self._idempotency_record = None
        if succeeded:
            idempotency.finish(record, response.status_code, response.data)
        else:
            # Nothing was done (or it was rolled back): the same key may try again.
            idempotency.abandon(record)
