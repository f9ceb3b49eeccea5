"""The CLI's one HTTP layer: JSON requests to the API with a token, errors made readable.

The token goes only to the configured origin: redirects are not followed (one is an error that
names where it pointed: fix the URL), and a page's `next` link is used only on that origin.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["ApiClient", "ApiError"]

TIMEOUT = 60.0
USER_AGENT = "nbdweb-cli/1"


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    # Returning None makes urllib raise the 3xx as an HTTPError instead of following it.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class ApiError(Exception):
    """The API answered with an error, or could not be reached; str() is for people."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _describe(status: int, body: Any) -> str:
    if isinstance(body, dict):
        if "detail" in body and len(body) <= 2:
            return f"HTTP {status}: {body['detail']}"
        parts = []
        for field, messages in body.items():
            if isinstance(messages, list):
                messages = " ".join(str(m) for m in messages)
            parts.append(f"{field}: {messages}")
        return f"HTTP {status}: " + "; ".join(parts)
    return f"HTTP {status}: {body}"


@dataclass
class ApiClient:
    base_url: str  # e.g. http://127.0.0.1:8000
    token: str

    def url(self, path: str, query: dict[str, Any] | None = None) -> str:
        if path.startswith(("http://", "https://")):
            # Absolute URLs come from the API's answers (pagination): never send the token to
            # another origin than the configured one.
            if _origin(path) != _origin(self.base_url):
                raise ApiError(f"refusing to follow {path}: not on {self.base_url}")
            url = path
        else:
            url = f"{self.base_url.rstrip('/')}/api/v1/{path.lstrip('/')}"
        if query:
            clean = {k: v for k, v in query.items() if v is not None}
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(clean)
        return url

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        idempotent: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path, query), data=data, method=method)
        # Unredirected: never copied onto a redirect's request, whatever handler follows one.
        request.add_unredirected_header("Authorization", f"Token {self.token}")
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", USER_AGENT)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if idempotent:
            # A retried request (the same key) creates nothing twice.
            request.add_header("Idempotency-Key", str(uuid.uuid4()))
        try:
            with _OPENER.open(request, timeout=TIMEOUT) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                where = exc.headers.get("Location", "?")
                raise ApiError(
                    f"HTTP {exc.code}: the API redirects to {where}; not followed "
                    "(the token stays with the URL you gave): use the final URL",
                    exc.code,
                ) from None
            payload = exc.read()
            try:
                parsed: Any = json.loads(payload)
            except ValueError:
                parsed = payload.decode("utf-8", "replace")[:500]
            raise ApiError(_describe(exc.code, parsed), exc.code, parsed) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"cannot reach {self.base_url}: {reason}") from None

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        _, _, payload = self.raw(method, path, body, **kwargs)
        return json.loads(payload) if payload else None

    def get(self, path: str, **query: Any) -> Any:
        return self.call("GET", path, query=query or None)

    def list(self, path: str, **query: Any) -> list[dict[str, Any]]:
        """Every item of a list endpoint, following its pages."""
        page = self.get(path, **query)
        if isinstance(page, list):
            return page
        items = list(page.get("results", []))
        while page.get("next"):
            page = self.call("GET", page["next"])
            items.extend(page.get("results", []))
        return items
