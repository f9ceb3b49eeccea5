"""Error pages: under /api/ a 404 is JSON in the API's error shape, like every other API error."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

__all__ = ["not_found"]


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    # A path no route matches (`/api/v1/exports/1.5/`, `/api/v1/nope/`) never reaches DRF,
    # whose own 404s are JSON; an API client must not get Django's HTML page instead.
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)
