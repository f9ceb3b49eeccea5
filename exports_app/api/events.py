"""nbdweb's events over HTTP: `/api/v1/events/` (the recent ones, JSON) and
`/api/v1/events/stream/` (server-sent events, for tools that hold a connection open).

Both read the stream that exports_app.services.events writes, and show a user only the kinds
whose objects they may view (`events.EVENT_KINDS`). The stream resumes after `Last-Event-ID`
(the header EventSource sends when it reconnects, or `?last_event_id=`); without one it starts
with the next event. A stream holds one gunicorn thread, so it ends after
settings.NBDWEB_EVENT_STREAM_MAX_SECONDS; the client reconnects with the last ID it saw and
loses nothing still in the stream (about NBDWEB_EVENTS_MAX_LENGTH events).

Both need permission to view at least one kind of event (403 otherwise). Open streams are
capped per user (NBDWEB_EVENT_STREAMS_PER_USER) and in all (NBDWEB_EVENT_STREAMS_TOTAL), so
streams cannot take every gunicorn thread: one more is a 429 with Retry-After. The slots are
members of Redis sorted sets scored by when they lapse, so a web process that dies with streams
open frees its slots once they lapse.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache

import redis
from django import db
from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from redis.exceptions import RedisError
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, Throttled, ValidationError
from rest_framework.permissions import BasePermission
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from exports_app.services import events
from exports_app.services.publishing import REDIS_CONNECT_TIMEOUT
from nbdworker.contract.redisconn import connect

__all__ = ["EventListView", "EventSerializer", "EventStreamView", "SeesSomeEvents"]

LIST_LIMIT = 100
# XREAD blocks this long at most; a comment line then keeps proxies from closing the connection.
KEEPALIVE_SECONDS = 15.0
# How often an open stream looks for new events (the delay an event may take to reach it).
STREAM_POLL_SECONDS = 0.25
# Milliseconds EventSource waits before it reconnects.
RECONNECT_MS = 1000
STREAM_SLOTS_KEY = "nbdweb:event-streams"
# A slot lapses this long after its stream's own end, should the stream's process die.
SLOT_GRACE_SECONDS = 30


class EventsUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Redis is unreachable: the events cannot be read."
    default_code = "unavailable"


class EventObjectSerializer(serializers.Serializer):
    type = serializers.CharField(help_text="export, job, certificate, workernode or session.")
    id = serializers.JSONField(help_text="The object's ID (a string for a session).")
    name = serializers.CharField(allow_null=True)


class EventSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="Stream ID: events are ordered by it.")
    kind = serializers.ChoiceField(choices=list(events.EVENT_KINDS), help_text="What happened.")
    time = serializers.DateTimeField(help_text="When it happened.")
    object = EventObjectSerializer(help_text="What it happened to.")
    data = serializers.DictField(help_text="Details; the keys depend on the kind.")


def _start_id(value: str | None, name: str) -> str | None:
    if value is None or value == "":
        return None
    try:
        return events.parse_event_id(value)
    except ValueError as exc:
        raise ValidationError({name: [str(exc)]}) from None


class SeesSomeEvents(BasePermission):
    """Authenticated and allowed to view at least one kind of event."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(
            user
            and user.is_authenticated
            and any(events.visible_to(user, kind) for kind in events.EVENT_KINDS)
        )


class EventListView(APIView):
    permission_classes = [SeesSomeEvents]

    @extend_schema(
        parameters=[
            OpenApiParameter("after", OpenApiTypes.STR, description="Only events after this ID."),
            OpenApiParameter(
                "limit", OpenApiTypes.INT, description=f"At most this many (1-{LIST_LIMIT})."
            ),
        ],
        responses=EventSerializer(many=True),
    )
    def get(self, request) -> Response:
        """The events after `after` (default: the oldest kept), oldest first, that you may
        view. Resume with the last ID you got."""
        after = _start_id(request.query_params.get("after"), "after") or "0-0"
        raw_limit = request.query_params.get("limit", str(LIST_LIMIT))
        if not (raw_limit.isascii() and raw_limit.isdigit() and 1 <= int(raw_limit) <= LIST_LIMIT):
            raise ValidationError({"limit": [f"A number from 1 to {LIST_LIMIT}."]})
        try:
            found = events.read_after(after, int(raw_limit))
        except RedisError:
            raise EventsUnavailable() from None
        visible = [e.as_dict() for e in found if events.visible_to(request.user, e.kind)]
        return Response(EventSerializer(visible, many=True).data)


class EventStreamRenderer(BaseRenderer):
    """Lets content negotiation accept `Accept: text/event-stream`; errors are one event."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        return f"event: error\ndata: {json.dumps(data)}\n\n".encode()


@lru_cache(maxsize=4)
def _blocking_client(url: str) -> redis.Redis:
    # Its own pool: XREAD BLOCK outlasts the web side's 3 s socket timeout.
    return connect(
        redis,
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=KEEPALIVE_SECONDS + 5,
        decode_responses=True,
    )


def _frame(event: events.Event) -> str:
    data = json.dumps(event.as_dict(), separators=(",", ":"), default=str)
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


def event_frames(allowed: set[str], after: str, max_seconds: float) -> Iterator[str]:
    """The text of the stream: events of the `allowed` kinds after `after`, keepalives, until
    `max_seconds` pass or Redis fails."""
    # The stream needs no database: this thread's connection is not held for minutes.
    for connection in db.connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()
    client = _blocking_client(settings.REDIS_URL)
    deadline = time.monotonic() + max_seconds
    quiet_since = time.monotonic()
    yield f"retry: {RECONNECT_MS}\n\n"
    while True:
        now = time.monotonic()
        if now >= deadline:
            return
        try:
            # Polled, not XREAD BLOCK: XREAD sends each new entry whole, and anyone who can
            # write to Redis can add a giant one (events.read_entries reads within bounds).
            entries = events.read_entries(after, 100, client)
        except RedisError:
            yield 'event: error\ndata: {"detail": "Redis is unreachable."}\n\n'
            return
        if entries:
            after = entries[-1][0]
            quiet_since = now
            for event in events.parse_entries(entries):
                if event.kind in allowed:
                    yield _frame(event)
            continue
        if now - quiet_since >= KEEPALIVE_SECONDS:
            quiet_since = now
            yield ": keepalive\n\n"
        # Waiting for the next event: nothing to be notified by that is bounded.
        time.sleep(min(STREAM_POLL_SECONDS, deadline - now))


class StreamSlot:
    """One open stream's place in the per-user and global counts; iterating it yields the
    stream's frames, closing it (Django closes the response) gives the place back."""

    def __init__(self, client: redis.Redis, user_id: int, max_seconds: float) -> None:
        self._client = client
        self._keys = (STREAM_SLOTS_KEY, f"{STREAM_SLOTS_KEY}:user:{user_id}")
        self._member = uuid.uuid4().hex
        self._lapses = time.time() + max_seconds + SLOT_GRACE_SECONDS
        self._frames: Iterator[str] = iter(())
        self._held = False

    def acquire(self, total: int, per_user: int) -> bool:
        now = time.time()
        pipe = self._client.pipeline()
        for key in self._keys:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {self._member: self._lapses})
            pipe.zcard(key)
            pipe.expireat(key, int(self._lapses) + 1, gt=True)
        replies = pipe.execute()
        self._held = True
        if replies[2] > total or replies[6] > per_user:
            self.close()
            return False
        return True

    def stream(self, frames: Iterator[str]) -> StreamSlot:
        self._frames = frames
        return self

    def __iter__(self) -> Iterator[str]:
        return self._frames

    def close(self) -> None:
        close_frames = getattr(self._frames, "close", None)
        if close_frames is not None:
            close_frames()
        if self._held:
            self._held = False
            try:
                pipe = self._client.pipeline()
                for key in self._keys:
                    pipe.zrem(key, self._member)
                pipe.execute()
            except RedisError:
                pass  # the slot lapses by itself


class EventStreamView(APIView):
    permission_classes = [SeesSomeEvents]
    renderer_classes = [EventStreamRenderer, JSONRenderer]

    # Left out of the OpenAPI schema: a generated client cannot use a stream that never ends,
    # and schema-driven fuzzers would hold it open. docs/api.md documents it.
    @extend_schema(exclude=True)
    def get(self, request) -> StreamingHttpResponse:
        after = _start_id(request.headers.get("Last-Event-ID"), "Last-Event-ID") or _start_id(
            request.query_params.get("last_event_id"), "last_event_id"
        )
        if after is None:
            try:
                after = events.latest_id(_blocking_client(settings.REDIS_URL))
            except RedisError:
                raise EventsUnavailable() from None
        allowed = {kind for kind in events.EVENT_KINDS if events.visible_to(request.user, kind)}
        max_seconds = settings.NBDWEB_EVENT_STREAM_MAX_SECONDS
        slot = StreamSlot(_blocking_client(settings.REDIS_URL), request.user.pk, max_seconds)
        try:
            acquired = slot.acquire(
                settings.NBDWEB_EVENT_STREAMS_TOTAL, settings.NBDWEB_EVENT_STREAMS_PER_USER
            )
        except RedisError:
            raise EventsUnavailable() from None
        if not acquired:
            raise Throttled(
                wait=settings.NBDWEB_EVENT_STREAM_RETRY_AFTER_SECONDS,
                detail="Too many event streams are open; retry later or poll /api/v1/events/.",
            )
        response = StreamingHttpResponse(
            slot.stream(event_frames(allowed, after, max_seconds)),
            content_type="text/event-stream; charset=utf-8",
        )
        response["Cache-Control"] = "no-cache"
        # Proxies (nginx) must pass each event on at once.
        response["X-Accel-Buffering"] = "no"
        return response
