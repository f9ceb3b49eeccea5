"""The CLI's HTTP layer (nbdweb_cli.api) keeps the token on the configured origin: a redirect
is an error, not followed (to another host, or from https to http), and a pagination `next`
link on another origin is refused. Real HTTP servers on 127.0.0.1 stand in for the API and for
the host a hostile answer points at."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from nbdweb_cli.api import ApiClient, ApiError

TOKEN = "nbdweb_secret-token-for-cli-tests"


@contextmanager
def serving(answer) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server calling `answer(handler)` for each GET; yields its URL and the headers of
    every request it got."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            answer(self)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def json_answer(body: bytes):
    def answer(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


def redirect_to(location: str):
    def answer(handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


@pytest.mark.parametrize("other_host", ["localhost", "127.0.0.1"])
def test_a_redirect_is_an_error_and_the_token_stays(other_host) -> None:
    with serving(json_answer(b"{}")) as (elsewhere, stolen):
        target = elsewhere.replace("127.0.0.1", other_host) + "/steal"
        with (
            serving(redirect_to(target)) as (api_url, _),
            pytest.raises(ApiError, match="redirects to") as caught,
        ):
            ApiClient(api_url, TOKEN).get("exports/")
    assert caught.value.status == 302
    assert stolen == []


def test_a_next_link_on_another_origin_is_refused() -> None:
    with serving(json_answer(b'{"results": []}')) as (elsewhere, stolen):
        page = f'{{"results": [{{"id": 1}}], "next": "{elsewhere}/api/v1/exports/?page=2"}}'
        with (
            serving(json_answer(page.encode())) as (api_url, _),
            pytest.raises(ApiError, match="refusing to follow"),
        ):
            ApiClient(api_url, TOKEN).list("exports/")
    assert stolen == []


def test_a_next_link_on_the_same_origin_is_followed() -> None:
    pages = iter([None, b'{"results": [{"id": 2}], "next": null}'])

    def answer(handler) -> None:
        body = (
            next(pages)
            or (
                f'{{"results": [{{"id": 1}}], "next": "{api_url}/api/v1/exports/?page=2"}}'
            ).encode()
        )
        json_answer(body)(handler)

    with serving(answer) as (api_url, seen):
        items = ApiClient(api_url, TOKEN).list("exports/")
    assert [i["id"] for i in items] == [1, 2]
    assert all(h["Authorization"] == f"Token {TOKEN}" for h in seen)
