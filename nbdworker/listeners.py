"""Listening sockets, bound once by the process that owns them.

The worker binds its listeners itself (rather than through `loop.create_server(host, port)`)
so that the same sockets can be served by this process or handed to serving processes
(nbdworker/supervisor.py) that inherit them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass

from nbdworker.settings import ListenAddress

__all__ = ["Listener", "bind_listeners", "close_listeners"]

log = logging.getLogger("nbdworker")

BACKLOG = 1024


@dataclass(eq=False)
class Listener:
    sock: socket.socket
    text: str  # printable address with the actual port, e.g. "127.0.0.1:10809", "unix:/run/x"
    unix_path: str | None = None


def _bind_unix(path: str) -> Listener:
    # A socket left behind by a worker that died is replaced; any other file is not.
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return Listener(sock, f"unix:{path}", path)


def _bind_tcp(host: str, port: int) -> list[Listener]:
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    out: list[Listener] = []
    seen = set()
    try:
        for family, type_, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            out.append(Listener(sock, ""))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Each family gets its own socket, as asyncio's create_server does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
            name = sock.getsockname()
            out[-1].text = (
                f"[{name[0]}]:{name[1]}" if family == socket.AF_INET6 else f"{name[0]}:{name[1]}"
            )
    except OSError:
        close_listeners(out)
        raise
    return out


def bind_listeners(addresses: tuple[ListenAddress, ...] | list[ListenAddress]) -> list[Listener]:
    """Bind and listen on every address; all or nothing (OSError names the failing one)."""
    bound: list[Listener] = []
    try:
        for addr in addresses:
            try:
                if addr.kind == "unix":
                    bound.append(_bind_unix(addr.path))
                else:
                    bound.extend(_bind_tcp(addr.host, addr.port))
            except OSError as exc:
                raise OSError(exc.errno, f"{addr}: {exc.strerror or exc}") from None
    except OSError:
        close_listeners(bound)
        raise
    for listener in bound:
        log.info("listening on %s", listener.text)
    return bound


def close_listeners(listeners: list[Listener], unlink: bool = True) -> None:
    for listener in listeners:
        listener.sock.close()
        if unlink and listener.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(listener.unix_path)
