"""A real HTTP server on 127.0.0.1 that receives webhook deliveries, for tests.

    with webhook_receiver(statuses=[500, 200]) as receiver:
        receiver.url                      # http://127.0.0.1:PORT/hook
        receiver.requests                 # [Received(path, headers, body), ...]
        receiver.wait_for(2, timeout=30)  # the first two requests

It answers each POST with the next status of `statuses` (the last one once they run out).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.polling import poll

__all__ = ["Received", "WebhookReceiver", "webhook_receiver"]


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    def __init__(self, server: ThreadingHTTPServer, statuses: list[int]) -> None:
        self.server = server
        self.statuses = list(statuses)
        self.requests: list[Received] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def next_status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        poll(lambda: len(self.requests) >= count, f"{count} webhook request(s)", timeout)
        with self.lock:
            return list(self.requests)


@contextlib.contextmanager
def webhook_receiver(statuses: list[int] | None = None) -> Iterator[WebhookReceiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            status = receiver.next_status()
            with receiver.lock:
                receiver.requests.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = WebhookReceiver(server, statuses or [200])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
