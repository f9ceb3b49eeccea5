"""An NBDServer on its own event loop thread inside the test process, for tests that call the
server's methods (apply_config) while real clients are connected."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from nbdworker.contract.config import WorkerConfig
from nbdworker.server import NBDServer
from nbdworker.settings import WorkerSettings

__all__ = ["ServerThread", "serving"]


class ServerThread:
    def __init__(self, server: NBDServer, loop: asyncio.AbstractEventLoop, port: int) -> None:
        self.server, self.loop, self.port = server, loop, port

    def apply(self, config: dict) -> None:
        """`apply_config` on the server's loop; returns once it is done."""
        done = threading.Event()

        def swap() -> None:
            self.server.apply_config(WorkerConfig.from_dict(config))
            done.set()

        self.loop.call_soon_threadsafe(swap)
        assert done.wait(10)


@contextmanager
def serving(config: dict, tmp_path) -> Iterator[ServerThread]:
    """Serve `config` on 127.0.0.1 (a free port), storage root `tmp_path`, until the end."""
    settings = WorkerSettings.from_sources([str(tmp_path)], ["127.0.0.1:0"], environ={})
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    async def main() -> None:
        server = NBDServer(settings, WorkerConfig.from_dict(config), shutdown_timeout=5)
        holder["server"] = server
        holder["port"] = int((await server.start())[0].rpartition(":")[2])
        holder["stop"] = asyncio.Event()
        ready.set()
        await holder["stop"].wait()
        await server.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield ServerThread(holder["server"], loop, holder["port"])
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)
        loop.close()
