"""Middleware of the web side."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

__all__ = ["DatabaseUnavailableMiddleware"]

log = logging.getLogger(__name__)

# Seconds a client is asked to wait before it tries again.
RETRY_AFTER = 5


class DatabaseUnavailableMiddleware:
    """A request that fails because the database cannot be reached (stopped, restarting, out of
    connections, an SQLite lock held too long) gets 503 with Retry-After, not a 500: the request
    was fine, and the same request later will work."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        log.error("database unavailable for %s %s: %s", request.method, request.path, exception)
        response = JsonResponse(
            {"detail": "The database is unavailable; try again shortly."}, status=503
        )
        response["Retry-After"] = str(RETRY_AFTER)
        return response
