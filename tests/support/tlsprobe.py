"""What the TLS tests share: worker configs built on a test PKI, client TLS contexts, and a
raw-socket NBD client that can upgrade to TLS after STARTTLS (``Probe``).

Workers are started with `tests.support.worker.run_worker`; tests read their log to check that
refusals are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from nbdworker.contract.config import WorkerConfig
from nbdworker.protocol import ChunkType, ClientFlag, Option, Reply
from nbdworker.protocol.constants import SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC
from nbdworker.server import NBDServer
from nbdworker.settings import WorkerSettings, parse_listen
from tests.support.nbdclient import (
    GREETING_SIZE,
    OptionReply,
    decode_greeting,
    decode_option_reply,
    encode_client_flags,
    encode_info_request,
    encode_option,
    encode_request,
)
from tests.support.pki import PKI, tls_config_dict
from tests.support.worker import RunningWorker

__all__ = [
    "MODES",
    "InProcessServer",
    "PipelinedTLS",
    "Probe",
    "client_context",
    "export_table",
    "serve_in_process",
    "wait_for_line",
    "worker_config",
]

MODES = ("NOTLS", "OPTIONALTLS", "FORCEDTLS", "SELECTIVETLS")
EXPORT_SIZE = 4 << 20
# Generous: a deadline for a loaded CI machine, never a synchronisation sleep.
DEADLINE = 20.0


def export_table(mode: str) -> list[dict]:
    """The exports every TLS test worker is given (all in memory). Under OPTIONALTLS the worker
    refuses "secret" (``tls_required`` cannot be enforced there) and serves the others."""
    exports: list[dict] = [{"name": "plain", "backend": "memory", "size": EXPORT_SIZE}]
    if mode != "NOTLS":
        exports += [
            {"name": "secret", "backend": "memory", "size": EXPORT_SIZE, "tls_required": True},
            {
                "name": "alice-only",
                "backend": "memory",
                "size": EXPORT_SIZE,
                "allowed_clients": [{"common_name": "alice"}],
            },
            {
                "name": "bob-only",
                "backend": "memory",
                "size": EXPORT_SIZE,
                "allowed_clients": [{"san": "DNS:bob.clients.example"}],
            },
            {
                "name": "lan-only",
                "backend": "memory",
                "size": EXPORT_SIZE,
                "allowed_networks": ["10.0.0.0/8"],
            },
        ]
    return exports


def worker_config(pki: PKI, mode: str, generation: int = 1, **tls) -> dict:
    cfg: dict = {"version": 1, "generation": generation, "exports": export_table(mode)}
    if mode != "NOTLS":
        cfg["tls"] = tls_config_dict(pki, mode, **tls)
    return cfg


def wait_for_line(worker: RunningWorker, *parts: str, timeout: float = DEADLINE) -> str:
    """Wait until one line of the worker's log contains every one of `parts` (in any order)."""
    pattern = "".join(f"(?=.*{re.escape(part)})" for part in parts)
    return worker.wait_for_log(pattern, timeout=timeout).string


def client_context(
    pki: PKI, name: str | None = "alice", maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A Python (OpenSSL) client context trusting the test CA, with client `name`'s credentials."""
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem)
    if name is not None:
        d = pki.client_dir(name)
        ctx.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
    if maximum is not None:
        if maximum < ssl.TLSVersion.TLSv1_2:
            # Debian's OpenSSL will not even offer TLS < 1.2 by default; the refusal under test
            # must come from the server, so let the client try.
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.maximum_version = maximum
    return ctx


_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_REST = struct.Struct(">HHQI")  # a structured chunk header after its magic


class Probe:
    """A raw NBD client: every byte it sends is chosen by the test."""

    def __init__(
        self,
        port: int | str,
        flags: int = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES,
    ) -> None:
        """Connect to 127.0.0.1:`port`, or to the Unix socket at path `port`."""
        if isinstance(port, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(DEADLINE)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.flags = flags
        # What a test's STARTTLS step wraps the socket with.
        self.tls_context: ssl.SSLContext | None = None
        decode_greeting(self.recv_exact(GREETING_SIZE))
        self.send(encode_client_flags(flags))

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def reply(self) -> OptionReply:
        header = self.recv_exact(20)
        length = struct.unpack_from(">I", header, 16)[0]
        decoded = decode_option_reply(header + self.recv_exact(length))
        assert decoded is not None
        return decoded[0]

    def replies(self) -> list[OptionReply]:
        """Replies to one option: up to and including its ACK or error."""
        out = [self.reply()]
        while out[-1].reply not in (Reply.ACK,) and not (int(out[-1].reply) & 0x80000000):
            out.append(self.reply())
        return out

    def option(self, code: int, data: bytes = b"") -> list[OptionReply]:
        self.send(encode_option(code, data))
        return self.replies()

    def info(self, name: str, go: bool = False) -> list[OptionReply]:
        self.send(encode_info_request(Option.GO if go else Option.INFO, name))
        return self.replies()

    def starttls(self, ctx: ssl.SSLContext) -> None:
        """STARTTLS, expect the ACK, then run the TLS handshake (raises ssl.SSLError)."""
        (ack,) = self.option(Option.STARTTLS)
        assert ack.reply == Reply.ACK, ack
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def closed(self) -> bool:
        """True once the server has closed (EOF, reset, or a TLS alert), within the deadline.

        False if the server sent anything instead.
        """
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True

    def read(self, offset: int = 0, length: int = 512, cookie: int = 7) -> tuple[str, int, bytes]:
        """One READ: (``"simple"`` or ``"structured"``, NBD error, data)."""
        self.send(encode_request(0, cookie=cookie, offset=offset, length=length))
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, got_cookie = _SIMPLE_REPLY.unpack(
                magic.to_bytes(4, "big") + self.recv_exact(12)
            )
            assert got_cookie == cookie
            return "simple", error, b"" if error else self.recv_exact(length)
        assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
        data, error = bytearray(length), 0
        while True:
            flags, kind, got_cookie, size = _CHUNK_REST.unpack(self.recv_exact(_CHUNK_REST.size))
            assert got_cookie == cookie
            payload = self.recv_exact(size)
            if kind == ChunkType.OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                data[at - offset : at - offset + size - 8] = payload[8:]
            elif kind & 0x8000:
                (error,) = struct.unpack_from(">I", payload)
            if flags & 1:
                return "structured", error, bytes(data)
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)

    def block_status(self, length: int = 4096, cookie: int = 11) -> int:
        """One BLOCK_STATUS; the NBD error of its reply (0: answered with extents)."""
        self.send(encode_request(7, cookie=cookie, offset=0, length=length))
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, _ = _SIMPLE_REPLY.unpack(magic.to_bytes(4, "big") + self.recv_exact(12))
            return error
        error = 0
        while True:
            flags, kind, _, size = _CHUNK_REST.unpack(self.recv_exact(_CHUNK_REST.size))
            payload = self.recv_exact(size)
            if kind & 0x8000:
                (error,) = struct.unpack_from(">I", payload)
            if flags & 1:
                return error
            self.recv_exact(4)

    def disconnect(self) -> None:
        self.send(encode_request(2, cookie=8))


@dataclasses.dataclass
class InProcessServer:
    server: NBDServer
    loop: asyncio.AbstractEventLoop
    port: int

    def apply(self, config: dict) -> None:
        async def apply() -> None:
            self.server.apply_config(WorkerConfig.from_dict(config))

        asyncio.run_coroutine_threadsafe(apply(), self.loop).result(DEADLINE)


@contextlib.contextmanager
def serve_in_process(config: dict, tmp_path: Path) -> Iterator[InProcessServer]:
    """Run `NBDServer` on a standard-library asyncio loop in a thread (the worker's own event
    loop is uvloop when installed; this covers the other TLS implementation too)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nbdworker-loop", daemon=True)
    thread.start()
    settings = WorkerSettings(storage_roots=(str(tmp_path),), listen=(parse_listen("127.0.0.1:0"),))

    async def start() -> tuple[NBDServer, list[str]]:
        server = NBDServer(settings, WorkerConfig.from_dict(config), shutdown_timeout=5)
        return server, await server.start()

    server, addresses = asyncio.run_coroutine_threadsafe(start(), loop).result(DEADLINE)
    try:
        yield InProcessServer(server, loop, int(addresses[0].rsplit(":", 1)[1]))
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(DEADLINE)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE)
        loop.close()


class PipelinedTLS:
    """A TLS client over the probe's socket that sends `first` in the same flight as its
    Finished message, so the server decrypts it together with the end of the handshake."""

    def __init__(self, p: Probe, ctx: ssl.SSLContext, first: bytes) -> None:
        self.sock = p.sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self._fill()
        assert self.obj.version() == "TLSv1.3"
        self.obj.write(first)
        self.sock.sendall(self.outgoing.read())  # Finished + the option, one write

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                buf += self.obj.read(n - len(buf))
            except ssl.SSLWantReadError:
                if not self._fill():
                    raise EOFError from None
        return bytes(buf)
