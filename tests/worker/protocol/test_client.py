"""The client-side helpers used by raw-socket tests: framing and error cases."""

from __future__ import annotations

import struct

import pytest

from nbdworker.protocol import REPLY_MAGIC, ChunkType, Info, Option, ProtocolError, Reply
from tests.support.nbdclient import (
    Chunk,
    OptionReply,
    decode_chunk,
    decode_export_name_reply,
    decode_greeting,
    decode_option_replies,
    decode_option_reply,
    decode_reply,
    encode_info_request,
    encode_meta_context_request,
    parse_block_status,
    parse_error_chunk,
    parse_info,
    parse_meta_context,
    parse_server,
)


def option_reply(option, reply, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, option, reply, len(data)) + data


def test_decode_option_reply_waits_for_the_whole_reply():
    raw = option_reply(Option.LIST, Reply.SERVER, b"\0\0\0\1a")
    for cut in range(len(raw)):
        assert decode_option_reply(raw[:cut]) is None
    assert decode_option_reply(raw) == (OptionReply(Option.LIST, Reply.SERVER, b"\0\0\0\1a"), 25)


def test_decode_option_replies_keeps_unknown_codes_as_ints():
    raw = option_reply(0x4242, 0x80000063) + option_reply(Option.GO, Reply.ACK)
    replies, used = decode_option_replies(raw + b"\0")
    assert replies == [OptionReply(0x4242, 0x80000063, b""), OptionReply(Option.GO, Reply.ACK, b"")]
    assert used == len(raw)


def test_decode_option_reply_rejects_bad_magic():
    with pytest.raises(ProtocolError):
        decode_option_reply(b"\0" * 20)


def test_decode_greeting_rejects_oldstyle_and_short_input():
    with pytest.raises(ProtocolError):
        decode_greeting(b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53\x00\x00")
    with pytest.raises(ProtocolError):
        decode_greeting(b"NBDMAGIC")


def test_export_name_reply_padding_must_be_zero():
    raw = struct.pack(">QH", 512, 1) + b"\0" * 123 + b"\1"
    with pytest.raises(ProtocolError):
        decode_export_name_reply(raw, no_zeroes=False)
    assert decode_export_name_reply(raw[:10], no_zeroes=True) == (512, 1)
    assert decode_export_name_reply(raw[:100], no_zeroes=False) is None


def test_info_request_layout():
    raw = encode_info_request(Option.GO, "ab", [Info.NAME, Info.BLOCK_SIZE])
    assert raw[16:] == b"\0\0\0\2ab\0\2\0\1\0\3"


def test_meta_context_request_layout():
    raw = encode_meta_context_request(Option.SET_META_CONTEXT, "d", ["base:"])
    assert raw[16:] == b"\0\0\0\1d\0\0\0\1\0\0\0\5base:"


@pytest.mark.parametrize(
    ("parser", "data"),
    [
        (parse_info, b"\0"),
        (parse_info, b"\0\0" + b"\0" * 9),
        (parse_info, b"\0\3" + b"\0" * 11),
        (parse_server, b"\0\0\0"),
        (parse_server, b"\0\0\0\x09ab"),
        (parse_meta_context, b"\0\0\0\1"),
        (parse_block_status, b"\0\0\0\1"),
        (parse_block_status, b"\0\0\0\1" + b"\0" * 7),
    ],
)
def test_payload_parsers_reject_malformed_payloads(parser, data):
    with pytest.raises(ProtocolError):
        parser(data)


def test_unknown_info_types_are_returned_raw():
    assert parse_info(b"\0\x09xyz") == (9, b"xyz")


def test_error_chunk_with_wrong_message_length_is_rejected():
    chunk = Chunk(1, ChunkType.ERROR, 1, struct.pack(">IH", 5, 10) + b"short")
    with pytest.raises(ProtocolError):
        parse_error_chunk(chunk)


def test_decode_reply_rejects_unknown_magic_and_waits_for_more():
    with pytest.raises(ProtocolError):
        decode_reply(b"\xde\xad\xbe\xef" + b"\0" * 12)
    assert decode_reply(b"\x67\x44") is None
    assert decode_reply(b"\x67\x44\x66\x98\0\0") is None
    assert decode_chunk(b"\x66\x8e\x33\xef" + b"\0" * 10) is None
