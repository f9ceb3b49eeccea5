"""Property tests: arbitrary input only ever yields events or ProtocolError; codecs round-trip."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdworker.protocol import (
    IHAVEOPT,
    NEED_DATA,
    Closed,
    Command,
    Errno,
    ExportView,
    Handshake,
    HandshakeLimits,
    Option,
    OptionHandled,
    ProtocolError,
    Ready,
    Reply,
    Request,
    Session,
    StartTLS,
    TLSMode,
    Verdict,
    decode_request,
    encode_block_status,
    encode_error,
    encode_hole_chunk,
    encode_read_data_header,
    encode_read_data_header_into,
    encode_simple_reply,
    final_transmission_flags,
    read_data_header_size,
)
from tests.support.nbdclient import (
    Chunk,
    SimpleReply,
    decode_option_replies,
    decode_reply,
    encode_client_flags,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    encode_request,
    parse_block_status,
    parse_error_chunk,
    parse_hole,
    parse_offset_data,
)

from .helpers import ALL_FLAGS, EXPORTS, lookup_in

SMALL_LIMITS = HandshakeLimits(max_options=20, options_per_listed_export=2, max_option_length=256)
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
MODES = st.sampled_from(list(TLSMode))


def new_handshake(mode: TLSMode, limits: HandshakeLimits = SMALL_LIMITS) -> Handshake:
    return Handshake(
        lookup=lookup_in(EXPORTS),
        listing=lambda: list(EXPORTS.values()),
        tls_mode=mode,
        limits=limits,
    )


def run(hs: Handshake, chunks: list[bytes], limits: HandshakeLimits) -> list:
    """Feed chunks, draining events after each; check the buffering bound at every NEED_DATA."""
    events = []
    for chunk in [*chunks, b""]:
        hs.receive_data(chunk)
        while True:
            event = hs.next_event()
            if event is NEED_DATA:
                assert hs.buffered < 16 + limits.max_option_length
                break
            events.append(event)
            if isinstance(event, StartTLS):
                hs.tls_started()
                continue
            if isinstance(event, Ready | Closed):
                return events
    raise AssertionError("EOF did not end the handshake")  # pragma: no cover


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(
    mode=MODES,
    flags=st.sampled_from([0, 1, 2, 3, 4]),
    chunks=st.lists(st.binary(max_size=400), max_size=8),
)
def test_arbitrary_bytes_only_produce_events(mode, flags, chunks):
    hs = new_handshake(mode)
    hs.receive_data(encode_client_flags(flags))
    events = run(hs, chunks, SMALL_LIMITS)
    assert isinstance(events[-1], Ready | Closed)
    assert all(isinstance(e, OptionHandled | StartTLS | Ready | Closed) for e in events)


def _option_strategy():
    names = st.sampled_from(["", "disk", "secret", "ro", "nope"])
    infos = st.lists(st.integers(0, 5), max_size=4)
    queries = st.lists(st.sampled_from(["base:", "base:allocation", "qemu:x", "junk"]), max_size=3)
    return st.one_of(
        st.builds(encode_option, st.sampled_from(list(Option)) | U32, st.binary(max_size=40)),
        st.builds(encode_info_request, st.sampled_from([Option.INFO, Option.GO]), names, infos),
        st.builds(
            encode_meta_context_request,
            st.sampled_from([Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT]),
            names,
            queries,
        ),
        st.just(encode_option(Option.STRUCTURED_REPLY)),
        st.just(encode_option(Option.LIST)),
        st.just(encode_option(Option.STARTTLS)),
    )


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(mode=MODES, options=st.lists(_option_strategy(), max_size=12), split=st.integers(1, 64))
def test_well_framed_options_each_get_a_final_reply_echoing_their_code(mode, options, split):
    """Every option is answered (final ACK or error, code echoed) until one ends the handshake."""
    hs = new_handshake(mode, HandshakeLimits())
    hs.receive_data(encode_client_flags(3))
    stream = b"".join(options)
    chunks = [stream[i : i + split] for i in range(0, len(stream), split)]
    events = run(hs, chunks, HandshakeLimits())
    out = hs.data_to_send()[18:]  # skip the greeting
    handled = [e for e in events if isinstance(e, OptionHandled)]
    if isinstance(events[-1], Ready) and handled[-1].option == Option.EXPORT_NAME:
        out = out[: len(out) - 10]  # the EXPORT_NAME reply is not an option reply
    replies, used = decode_option_replies(out)
    assert used == len(out)
    finals = [r for r in replies if r.reply == Reply.ACK or Reply(r.reply).is_error]
    # EXPORT_NAME has no option reply, and plaintext pipelined after STARTTLS is a close
    # without a reply.
    answered = [
        e
        for e in handled
        if e.option != Option.EXPORT_NAME and e.detail != "data sent after STARTTLS"
    ]
    assert [int(r.option) for r in finals] == [int(e.option) for e in answered]
    assert [r.reply for r in finals] == [e.reply for e in answered]
    for position, option in enumerate(options[: len(answered)]):
        (code,) = struct.unpack_from(">I", option, 8)
        assert int(answered[position].option) == code
    if mode is TLSMode.NOTLS:
        assert all(r.reply != Reply.ERR_TLS_REQD for r in replies)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(
    mode=MODES,
    options=st.lists(_option_strategy(), min_size=1, max_size=8),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_corrupted_option_streams_only_produce_events(mode, options, edits, cut):
    """Well-framed streams with flipped bytes and a truncated tail reach deep parser states."""
    stream = bytearray(b"".join(options))
    for position, value in edits:
        stream[position % len(stream)] = value
    del stream[cut % (len(stream) + 1) :]
    hs = new_handshake(mode)
    hs.receive_data(encode_client_flags(3))
    events = run(hs, [bytes(stream)], SMALL_LIMITS)
    assert isinstance(events[-1], Ready | Closed)


@given(st.binary(max_size=64), st.integers(0, 40))
def test_decode_request_raises_only_protocol_error(data, pos):
    try:
        request = decode_request(data, pos)
    except ProtocolError:
        return
    assert isinstance(request, Request)


@given(flags=U16, command=U16, cookie=U64, offset=U64, length=U32)
def test_request_header_round_trip(flags, command, cookie, offset, length):
    raw = encode_request(command, flags=flags, cookie=cookie, offset=offset, length=length)
    assert len(raw) == 28
    assert decode_request(raw) == Request(flags, command, cookie, offset, length)


@st.composite
def sessions(draw):
    size = draw(st.integers(0, 2**63))
    flags = draw(st.integers(0, 0xFFFF))
    structured = draw(st.booleans())
    view = ExportView("x", "", size, flags, max_block=draw(st.integers(1, 2**32 - 1)))
    meta = {1: "base:allocation"} if draw(st.booleans()) else {}
    return Session(Ready(view, structured, meta, final_transmission_flags(view, structured), True))


@given(session=sessions(), flags=U16, command=U16, offset=U64, length=U32)
def test_session_check_is_total_and_consistent(session, flags, command, offset, length):
    verdict = session.check(Request(flags, command, 1, offset, length))
    assert isinstance(verdict, Verdict)
    if verdict.disconnect:
        assert verdict.payload == 0 and verdict.error
    elif command == Command.WRITE:
        assert verdict.payload == length  # a WRITE's payload is always consumed
    else:
        assert verdict.payload == 0
    if verdict.error:
        assert verdict.error in set(Errno)
    elif command not in (Command.DISC, Command.FLUSH):
        assert offset + length <= session.size  # nothing executes out of range
        assert command <= Command.BLOCK_STATUS


@given(cookie=U64, error=U32)
def test_simple_reply_round_trip(cookie, error):
    reply, end = decode_reply(encode_simple_reply(cookie, error))
    assert (reply, end) == (SimpleReply(error, cookie), 16)


@given(cookie=U64, offset=U64, data=st.binary(min_size=1, max_size=64), done=st.booleans())
def test_offset_data_round_trip(cookie, offset, data, done):
    raw = encode_read_data_header(cookie, offset, len(data), structured=True, done=done) + data
    chunk, end = decode_reply(raw)
    assert end == len(raw) and chunk.cookie == cookie and chunk.done == done
    assert parse_offset_data(chunk.payload) == (offset, data)


@given(cookie=U64, offset=U64, data=st.binary(min_size=1, max_size=64), structured=st.booleans())
def test_read_data_header_into_matches_the_encoder(cookie, offset, data, structured):
    buf = bytearray(read_data_header_size(structured)) + data
    size = encode_read_data_header_into(buf, cookie, offset, len(data), structured)
    assert bytes(buf) == encode_read_data_header(cookie, offset, len(data), structured) + data
    assert size == len(buf) - len(data)


@given(cookie=U64, offset=U64, length=st.integers(1, 2**32 - 1), done=st.booleans())
def test_hole_round_trip(cookie, offset, length, done):
    chunk, _ = decode_reply(encode_hole_chunk(cookie, offset, length, done))
    assert (chunk.cookie, chunk.done) == (cookie, done)
    assert parse_hole(chunk.payload) == (offset, length)


@given(
    cookie=U64,
    context=U32,
    extents=st.lists(st.tuples(st.integers(1, 2**32 - 1), U32), min_size=1, max_size=50),
    done=st.booleans(),
)
def test_block_status_round_trip(cookie, context, extents, done):
    chunk, _ = decode_reply(encode_block_status(cookie, context, extents, done))
    assert isinstance(chunk, Chunk) and chunk.done == done and chunk.cookie == cookie
    assert parse_block_status(chunk.payload) == (context, extents)


@given(
    cookie=U64,
    error=st.integers(1, 2**32 - 1),
    message=st.text(max_size=200),
    offset=st.none() | U64,
    done=st.booleans(),
)
def test_error_chunk_round_trip(cookie, error, message, offset, done):
    raw = encode_error(cookie, error, message, structured=True, offset=offset, done=done)
    chunk, end = decode_reply(raw)
    assert end == len(raw)
    decoded = parse_error_chunk(chunk)
    assert decoded == (error, message.encode("utf-8", "replace").decode(), offset)


@given(length=st.integers(0, 2**32 - 1))
def test_option_header_length_alone_decides_the_drop(length):
    limits = HandshakeLimits(max_option_length=4096)
    hs = new_handshake(TLSMode.NOTLS, limits)
    hs.receive_data(encode_client_flags(3) + struct.pack(">QII", IHAVEOPT, 0x4242, length))
    event = hs.next_event()
    if length > limits.max_option_length:
        assert isinstance(event, Closed) and event.error
    elif length:
        assert event is NEED_DATA
    else:
        assert isinstance(event, OptionHandled)


def test_all_flags_fixture_is_servable():
    assert final_transmission_flags(EXPORTS["disk"], False) == ALL_FLAGS
