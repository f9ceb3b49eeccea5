"""A blocking raw-socket NBD client for tests that must send exactly the bytes they choose.

It uses the protocol package's client-side encoders and decoders, so tests can step outside
the protocol wherever they need to (bad magic, truncated options, huge lengths...).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from nbdworker.protocol import ChunkType, ClientFlag, Command, Option, Reply
from tests.support.nbdclient import (
    GREETING_SIZE,
    Chunk,
    OptionReply,
    SimpleReply,
    decode_greeting,
    encode_client_flags,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    encode_request,
    parse_block_status,
    parse_error_chunk,
    parse_hole,
    parse_info,
    parse_offset_data,
)

__all__ = ["RawClient", "ReadResult", "check_fresh_client"]

_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_SIMPLE = struct.Struct(">IIQ")
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF


@dataclass
class ReadResult:
    error: int
    data: bytes  # reassembled (holes as zeroes) when error == 0
    chunks: list[Chunk]
    message: str = ""


class RawClient:
    def __init__(
        self, host: str, port: int, timeout: float = 10.0, source: str | None = None
    ) -> None:
        """`source`: connect from this local address (e.g. 127.0.0.2, another loopback peer)."""
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self.size = 0
        self.flags = 0
        self.context_id: int | None = None
        self._cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes ----------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`.

        Any bytes that arrive first are discarded.
        """
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    # -- handshake ------------------------------------------------------------------------------

    def greet(self, flags: int = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES) -> int:
        """Read the greeting and send our client flags; return the server's handshake flags."""
        server_flags = decode_greeting(self.recv_exact(GREETING_SIZE))
        self.send(encode_client_flags(flags))
        return int(server_flags)

    def read_option_reply(self) -> OptionReply:
        magic, option, reply, length = _OPTION_REPLY_HEADER.unpack(self.recv_exact(20))
        assert magic == 0x0003E889045565A9, f"bad option reply magic {magic:#x}"
        data = self.recv_exact(length) if length else b""
        return OptionReply(option, reply, data)

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send one option; collect replies up to the final ACK or error."""
        self.send(encode_option(option, data))
        return self.collect_replies()

    def collect_replies(self) -> list[OptionReply]:
        replies = []
        while True:
            r = self.read_option_reply()
            replies.append(r)
            if r.reply == Reply.ACK or r.reply & 0x80000000:
                return replies

    def go(
        self,
        name: str = "",
        *,
        structured: bool = False,
        meta: bool = False,
        infos: tuple[int, ...] = (),
    ) -> None:
        """Negotiate and enter transmission (fixed newstyle, GO)."""
        if structured:
            r = self.option(Option.STRUCTURED_REPLY)
            assert r[-1].reply == Reply.ACK, r
            self.structured = True
        if meta:
            self.send(
                encode_meta_context_request(Option.SET_META_CONTEXT, name, ["base:allocation"])
            )
            replies = self.collect_replies()
            assert replies[-1].reply == Reply.ACK, replies
            contexts = [r for r in replies if r.reply == Reply.META_CONTEXT]
            assert len(contexts) == 1, replies
            self.context_id = struct.unpack(">I", contexts[0].data[:4])[0]
        self.send(encode_info_request(Option.GO, name, infos))
        replies = self.collect_replies()
        assert replies[-1].reply == Reply.ACK, f"GO failed: {replies}"
        self._take_export_info(replies)

    def try_go(self, name: str) -> bool:
        """GO `name`: True in transmission, False when refused (the handshake goes on)."""
        self.send(encode_info_request(Option.GO, name))
        replies = self.collect_replies()
        if replies[-1].reply != Reply.ACK:
            return False
        self._take_export_info(replies)
        return True

    def _take_export_info(self, replies: list[OptionReply]) -> None:
        for r in replies:
            if r.reply == Reply.INFO:
                kind, value = parse_info(r.data)
                if kind == 0:
                    self.size, self.flags = value  # type: ignore[misc]

    def refused_go(self, name: str) -> OptionReply:
        """Ask for `name` with GO and expect an error reply (the handshake goes on)."""
        self.send(encode_info_request(Option.GO, name))
        reply = self.collect_replies()[-1]
        assert reply.reply & 0x80000000, f"GO {name!r} was not refused: {reply}"
        return reply

    @classmethod
    def open(
        cls, host: str, port: int, name: str = "", source: str | None = None, **kw: bool
    ) -> RawClient:
        client = cls(host, port, source=source)
        client.greet()
        client.go(name, **kw)
        return client

    # -- transmission ---------------------------------------------------------------------------

    def next_cookie(self) -> int:
        self._cookie += 1
        return self._cookie

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        cookie: int | None = None,
    ) -> int:
        cookie = self.next_cookie() if cookie is None else cookie
        self.send(
            encode_request(command, flags=flags, cookie=cookie, offset=offset, length=length)
            + payload
        )
        return cookie

    def read_simple(self) -> SimpleReply:
        magic, error, cookie = _SIMPLE.unpack(self.recv_exact(16))
        assert magic == SIMPLE_MAGIC, f"expected a simple reply, magic {magic:#x}"
        return SimpleReply(error, cookie)

    def read_chunk(self) -> Chunk:
        magic, flags, kind, cookie, length = _CHUNK_HEADER.unpack(self.recv_exact(20))
        assert magic == STRUCTURED_MAGIC, f"expected a chunk, magic {magic:#x}"
        return Chunk(flags, kind, cookie, self.recv_exact(length) if length else b"")

    def read_any(self) -> tuple[int, int, object]:
        """Next reply of any kind: (cookie, error, SimpleReply | Chunk). READ data not read."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return cookie, error, SimpleReply(error, cookie)
        assert magic == STRUCTURED_MAGIC, f"bad reply magic {magic:#x}"
        flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        chunk = Chunk(flags, kind, cookie, self.recv_exact(length) if length else b"")
        error = parse_error_chunk(chunk)[0] if kind & 0x8000 else 0
        return cookie, error, chunk

    def reply_error(self) -> int:
        """The error of a non-READ reply, 0 for success.

        With structured replies the server may still answer with a simple reply.
        """
        error = 0
        while True:
            _cookie, err, reply = self.read_any()
            error = error or err
            if isinstance(reply, SimpleReply):
                return reply.error
            if reply.done:
                return error

    def read_reply(self, offset: int, length: int) -> ReadResult:
        """The reply to a READ of `length` bytes at `offset`."""
        if not self.structured:
            reply = self.read_simple()
            if reply.error:
                return ReadResult(reply.error, b"", [])
            return ReadResult(0, self.recv_exact(length), [])
        data = bytearray(length)
        chunks = []
        error, message = 0, ""
        while True:
            chunk = self.read_chunk()
            chunks.append(chunk)
            if chunk.type == ChunkType.OFFSET_DATA:
                off, payload = parse_offset_data(chunk.payload)
                data[off - offset : off - offset + len(payload)] = payload
            elif chunk.type == ChunkType.OFFSET_HOLE:
                off, n = parse_hole(chunk.payload)
                data[off - offset : off - offset + n] = bytes(n)
            elif chunk.type & 0x8000:
                error, message, _ = parse_error_chunk(chunk)
            if chunk.done:
                return ReadResult(error, bytes(data) if not error else b"", chunks, message)

    # -- conveniences ---------------------------------------------------------------------------

    def read(self, offset: int, length: int, flags: int = 0) -> ReadResult:
        self.request(Command.READ, offset, length, flags=flags)
        return self.read_reply(offset, length)

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        self.request(Command.WRITE, offset, len(data), flags=flags, payload=data)
        return self.reply_error()

    def command(self, command: int, offset: int = 0, length: int = 0, flags: int = 0) -> int:
        self.request(command, offset, length, flags=flags)
        return self.reply_error()

    def block_status(
        self, offset: int, length: int, flags: int = 0
    ) -> tuple[int, list[tuple[int, int]]]:
        """(error, extents) of a BLOCK_STATUS request."""
        self.request(Command.BLOCK_STATUS, offset, length, flags=flags)
        error, extents = 0, []
        while True:
            chunk = self.read_chunk()
            if chunk.type == ChunkType.BLOCK_STATUS:
                _, extents = parse_block_status(chunk.payload)
            elif chunk.type & 0x8000:
                error = parse_error_chunk(chunk)[0]
            if chunk.done:
                return error, extents

    def disconnect(self) -> None:
        self.request(Command.DISC)


def check_fresh_client(host: str, port: int, export: str = "", offset: int = 0) -> None:
    """A new client can connect, write and read back its data: the server is healthy."""
    pattern = os.urandom(4096)
    with RawClient.open(host, port, export, structured=True) as c:
        assert c.write(offset, pattern) == 0
        result = c.read(offset, 4096)
        assert result.error == 0
        assert result.data == pattern
        c.disconnect()
        assert c.closed_by_server()


def serves_fresh_client(host: str, port: int, export: str = "") -> bool:
    """`check_fresh_client` as a poll predicate: False while the server refuses or drops it."""
    try:
        check_fresh_client(host, port, export)
    except (EOFError, ConnectionError, AssertionError):
        return False
    return True
