"""Large reads from a file export, pipelined far past what the socket buffers: the replies the
reply queue sends with sendfile, those that wait for a full socket, and those a partial
sendfile splits must all carry the right bytes, each reply whole and never interleaved with
another."""

from __future__ import annotations

import os
import struct

import pytest

from nbdworker.protocol import Command
from tests.support.fixtures import make_image
from tests.support.rawclient import SIMPLE_MAGIC, RawClient, parse_offset_data

MiB = 1 << 20
SIZE = 16 * MiB
_SIMPLE = struct.Struct(">IIQ")


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_large_reads_are_whole_and_correct(worker_factory, tmp_path, structured):
    data = os.urandom(SIZE)
    make_image(tmp_path / "images" / "disk.img", SIZE, data)
    w = worker_factory(
        {
            "version": 1,
            "exports": [
                {"name": "disk", "backend": "file", "path": str(tmp_path / "images" / "disk.img")}
            ],
        }
    )
    # Odd sizes and offsets, over the 64 KiB small-read limit; 96 requests (~24 MiB of replies)
    # sent before a single reply is read, so the socket fills up in the middle of a reply.
    requests = []
    for i in range(96):
        length = [256 * 1024, 65 * 1024 + 7, MiB, 300_001][i % 4]
        offset = (i * 1_234_567) % (SIZE - length)
        requests.append((offset, length))
    with RawClient.open(w.host, w.port, "disk", structured=structured) as c:
        cookies = {}
        for offset, length in requests:
            cookies[c.request(Command.READ, offset, length)] = (offset, length)
        got: dict[int, bytearray] = {}
        while len(got) < len(requests) or (structured and pending_chunks(got, cookies)):
            if structured:
                chunk = c.read_chunk()
                assert not chunk.type & 0x8000, chunk
                offset, length = cookies[chunk.cookie]
                off, payload = parse_offset_data(chunk.payload)
                buf = got.setdefault(chunk.cookie, bytearray())
                assert off == offset + len(buf)
                buf += payload
            else:
                magic, error, cookie = _SIMPLE.unpack(c.recv_exact(16))
                assert magic == SIMPLE_MAGIC and error == 0
                got[cookie] = bytearray(c.recv_exact(cookies[cookie][1]))
        for cookie, (offset, length) in cookies.items():
            assert bytes(got[cookie]) == data[offset : offset + length], (offset, length)
        # The stream is still in sync.
        result = c.read(SIZE - 4096, 4096)
        assert result.error == 0 and result.data == data[-4096:]


def pending_chunks(got: dict[int, bytearray], cookies: dict[int, tuple[int, int]]) -> bool:
    return any(len(got.get(cookie, b"")) < length for cookie, (_off, length) in cookies.items())
