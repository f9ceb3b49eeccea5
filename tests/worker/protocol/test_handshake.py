"""Handshake behaviour per option, bad input and limits (TLS modes: test_tls_modes.py)."""

from __future__ import annotations

import struct

import pytest

from nbdworker.protocol import (
    BASE_ALLOCATION_ID,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_STRING,
    NEED_DATA,
    OPTIONS_PER_LISTED_EXPORT,
    ClientFlag,
    Closed,
    ExportView,
    HandshakeLimits,
    Info,
    LocalProtocolError,
    Option,
    OptionHandled,
    Ready,
    Reply,
    TransmissionFlag,
)
from tests.support.nbdclient import (
    decode_export_name_reply,
    decode_greeting,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    parse_info,
    parse_meta_context,
    parse_server,
)

from .helpers import ALL_FLAGS, DISK, EXPORTS, MIB, RO, Driver, outcome

F = TransmissionFlag
U32 = struct.Struct(">I")


def info_items(result):
    return [parse_info(r.data) for r in result.replies if r.reply == Reply.INFO]


def meta_replies(result):
    return [parse_meta_context(r.data) for r in result.replies if r.reply == Reply.META_CONTEXT]


# --- greeting and client flags -----------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    driver = Driver(client_flags=None)
    assert driver.greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    assert decode_greeting(driver.greeting) == 3


@pytest.mark.parametrize(
    "flags",
    [0x4, 0x80000000, 0xFFFFFFFF, ClientFlag.C_FIXED_NEWSTYLE | 0x100],
    ids=hex,
)
def test_unknown_client_flags_close_the_connection(flags):
    driver = Driver(client_flags=None)
    result = driver.feed(U32.pack(flags))
    assert result.closed is not None and result.closed.error
    assert result.raw == b""


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_are_accepted(flags):
    driver = Driver(client_flags=flags)
    assert driver.hs.next_event() is NEED_DATA


def test_client_flags_split_across_reads_are_assembled():
    driver = Driver(client_flags=None)
    assert driver.feed(b"\0\0").events == []
    assert driver.feed(b"\0\3").events == []
    assert outcome(driver.option(Option.STRUCTURED_REPLY)) == "ACK"


def test_eof_before_client_flags_is_a_quiet_close():
    result = Driver(client_flags=None).eof()
    assert result.closed == Closed("EOF during negotiation", error=False)


def test_eof_inside_client_flags_is_an_error():
    driver = Driver(client_flags=None)
    driver.feed(b"\0\0")
    assert driver.eof().closed.error


# --- framing, EOF and limits -------------------------------------------------------------------


def test_bad_option_magic_closes_the_connection():
    result = Driver().feed(struct.pack(">QII", 0x1122334455667788, Option.LIST, 0))
    assert result.closed is not None and result.closed.error
    assert "magic" in result.closed.reason


def test_eof_between_options_is_a_quiet_close():
    driver = Driver()
    driver.option(Option.STRUCTURED_REPLY)
    assert driver.eof().closed.error is False


@pytest.mark.parametrize(
    "partial",
    [
        encode_option(Option.LIST)[:10],
        encode_info_request(Option.INFO, "disk")[:20],
        encode_option(0x999, b"x" * 100)[:50],  # inside discarded data
    ],
    ids=["mid-header", "mid-data", "mid-discard"],
)
def test_eof_in_the_middle_of_an_option_is_an_error(partial):
    driver = Driver()
    assert driver.feed(partial).events == []
    result = driver.eof()
    assert result.closed is not None and result.closed.error
    assert result.raw == b""


def test_option_longer_than_the_limit_is_dropped_from_its_header():
    driver = Driver()
    header = struct.pack(">QII", IHAVEOPT, Option.INFO, MAX_OPTION_LENGTH + 1)
    result = driver.feed(header)
    assert result.closed is not None and result.closed.error
    assert driver.hs.buffered == 0


def test_option_of_exactly_the_limit_is_accepted():
    limits = HandshakeLimits(max_option_length=1000)
    driver = Driver(limits=limits)
    result = driver.feed(encode_option(0x77, b"z" * 1000) + encode_option(Option.LIST, b"z" * 1001))
    assert [r.reply for r in result.replies] == [Reply.ERR_UNSUP]
    assert result.closed is not None and result.closed.error


@pytest.mark.parametrize("code", [Option.ABORT, Option.EXPORT_NAME, 0x4242, Option.STARTTLS])
def test_huge_option_length_disconnects_for_every_option(code):
    result = Driver().feed(struct.pack(">QII", IHAVEOPT, code, 0xFFFFFFFF))
    assert result.closed is not None and result.closed.error


def test_discarded_option_data_is_not_buffered():
    driver = Driver()
    driver.feed(struct.pack(">QII", IHAVEOPT, 0x4242, MAX_OPTION_LENGTH))
    chunk = b"\xaa" * 65536
    for _ in range(MAX_OPTION_LENGTH // len(chunk) - 1):
        assert driver.feed(chunk).events == []
        assert driver.hs.buffered == 0
    result = driver.feed(chunk)
    assert [r.reply for r in result.replies] == [Reply.ERR_UNSUP]


def test_parsed_option_data_waits_for_the_whole_option():
    driver = Driver()
    data = encode_info_request(Option.INFO, "disk")
    for byte in data[:-1]:
        assert driver.feed(bytes([byte])).events == []
    assert outcome(driver.feed(data[-1:])) == "ACK"


def test_option_budget_closes_after_max_options():
    driver = Driver()
    for _ in range(MAX_OPTIONS):
        assert driver.option(0x4242).final.reply == Reply.ERR_UNSUP
    result = driver.option(0x4242)
    assert result.closed is not None and result.closed.error
    assert result.raw == b""
    assert "too many options" in result.closed.reason


def test_option_budget_grows_with_listed_exports():
    driver = Driver(limits=HandshakeLimits(max_options=2, options_per_listed_export=4))
    assert driver.option(Option.LIST).final.reply == Reply.ACK  # 3 exports: budget 2 + 12
    for _ in range(13):
        assert driver.option(0x4242).final.reply == Reply.ERR_UNSUP
    assert driver.option(0x4242).closed is not None


def test_repeated_list_does_not_accumulate_option_budget():
    driver = Driver(limits=HandshakeLimits(max_options=5, options_per_listed_export=1))
    replies = []
    for _ in range(8):  # budget is 5 + 3, however many LISTs are sent
        replies.append(outcome(driver.option(Option.LIST)))
    assert replies == ["ACK"] * 8
    assert outcome(driver.option(Option.LIST)) == "DROP"


def test_default_option_budget_fits_nbdinfo_list_of_many_exports():
    exports = {f"e{i}": ExportView(f"e{i}", "", MIB, ALL_FLAGS) for i in range(100)}
    driver = Driver(exports=exports)
    driver.option(Option.STRUCTURED_REPLY)
    assert outcome(driver.option(Option.LIST)) == "ACK"
    for name in exports:
        assert outcome(driver.feed(encode_info_request(Option.INFO, name))) == "ACK"
        meta = encode_meta_context_request(Option.LIST_META_CONTEXT, name)
        assert outcome(driver.feed(meta)) == "ACK"
    assert outcome(driver.option(Option.ABORT)) == "ACK+CLOSE"
    assert MAX_OPTIONS + OPTIONS_PER_LISTED_EXPORT * 100 > 2 * 100 + 3


def test_next_event_after_close_repeats_closed_and_ignores_input():
    driver = Driver()
    result = driver.option(Option.ABORT)
    closed = result.closed
    driver.hs.receive_data(b"more")
    assert driver.hs.next_event() == closed
    assert driver.hs.data_to_send() == b""


def test_receive_data_after_eof_is_a_local_error():
    driver = Driver()
    driver.hs.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        driver.hs.receive_data(b"x")


# --- EXPORT_NAME -------------------------------------------------------------------------------


def test_export_name_reply_without_zeroes_is_ten_bytes():
    result = Driver().option(Option.EXPORT_NAME, b"disk")
    assert len(result.raw) == 10
    size, flags = decode_export_name_reply(result.raw, no_zeroes=True)
    assert size == DISK.size
    assert flags == ALL_FLAGS
    assert result.ready.no_zeroes is True


def test_export_name_reply_with_zeroes_is_134_bytes():
    driver = Driver(client_flags=ClientFlag.C_FIXED_NEWSTYLE)
    result = driver.option(Option.EXPORT_NAME, b"disk")
    assert len(result.raw) == 134
    assert decode_export_name_reply(result.raw, no_zeroes=False) == (DISK.size, ALL_FLAGS)
    assert result.ready.no_zeroes is False


def test_export_name_empty_opens_the_default_export():
    result = Driver().option(Option.EXPORT_NAME)
    assert result.ready.export is DISK


def test_export_name_unknown_closes_without_reply():
    result = Driver().option(Option.EXPORT_NAME, b"nope")
    assert result.raw == b""
    assert result.closed.error
    assert result.handled == [
        OptionHandled(Option.EXPORT_NAME, Reply.ERR_UNKNOWN, "unknown export 'nope'")
    ]


def test_export_name_empty_without_default_export_closes():
    result = Driver(default=None).option(Option.EXPORT_NAME)
    assert result.closed is not None and result.closed.error


def test_export_name_over_4096_bytes_is_dropped_without_buffering():
    driver = Driver()
    result = driver.feed(struct.pack(">QII", IHAVEOPT, Option.EXPORT_NAME, MAX_STRING + 1))
    assert result.closed is not None and result.closed.error
    assert result.handled[0].reply == Reply.ERR_INVALID


def test_export_name_of_4096_bytes_is_looked_up():
    name = "n" * MAX_STRING
    exports = {name: ExportView(name, "", MIB, ALL_FLAGS)}
    result = Driver(exports=exports).option(Option.EXPORT_NAME, name.encode())
    assert result.ready is not None


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"di\0sk"], ids=["bad-utf8", "nul"])
def test_export_name_that_is_not_a_string_closes(raw):
    result = Driver().option(Option.EXPORT_NAME, raw)
    assert result.closed is not None and result.closed.error


def test_export_name_with_structured_replies_advertises_df():
    driver = Driver()
    driver.option(Option.STRUCTURED_REPLY)
    result = driver.option(Option.EXPORT_NAME, b"disk")
    assert result.ready.structured
    _, flags = decode_export_name_reply(result.raw, no_zeroes=True)
    assert flags & F.SEND_DF
    assert result.ready.flags == flags


def test_export_name_trailing_bytes_become_transmission_data():
    driver = Driver()
    result = driver.feed(encode_option(Option.EXPORT_NAME, b"disk") + b"\x25\x60\x95\x13")
    assert result.ready is not None
    assert driver.hs.trailing_data() == b"\x25\x60\x95\x13"


# --- ABORT -------------------------------------------------------------------------------------


def test_abort_is_acked_with_empty_payload_then_closed_quietly():
    result = Driver().option(Option.ABORT)
    assert [(r.option, r.reply, r.data) for r in result.replies] == [(Option.ABORT, Reply.ACK, b"")]
    assert result.closed == Closed("client sent NBD_OPT_ABORT", error=False)


def test_abort_with_data_ignores_the_data():
    result = Driver().option(Option.ABORT, b"unexpected")
    assert outcome(result) == "ACK+CLOSE"


# --- LIST --------------------------------------------------------------------------------------


def test_list_sends_one_server_reply_per_export_then_ack():
    result = Driver().option(Option.LIST)
    servers = [parse_server(r.data) for r in result.replies[:-1]]
    assert [r.reply for r in result.replies] == [Reply.SERVER] * 3 + [Reply.ACK]
    assert servers == [("disk", "plain disk"), ("secret", "needs TLS"), ("ro", "read-only")]


def test_list_server_reply_length_counts_the_name_length_field():
    result = Driver().option(Option.LIST)
    first = result.replies[0].data
    assert len(first) == 4 + len("disk") + len("plain disk")
    assert U32.unpack_from(first)[0] == 4


def test_list_with_data_is_invalid_and_the_data_consumed():
    driver = Driver()
    result = driver.feed(encode_option(Option.LIST, b"xyz") + encode_option(Option.LIST))
    assert result.replies[0].reply == Reply.ERR_INVALID
    assert result.final.reply == Reply.ACK


def test_list_truncates_descriptions_to_4096_bytes():
    long = ExportView("long", "é" * 3000, MIB, ALL_FLAGS)
    result = Driver(exports={"long": long}).option(Option.LIST)
    _, description = parse_server(result.replies[0].data)
    assert len(description.encode()) <= MAX_STRING
    assert description == "é" * 2048


# --- INFO / GO ---------------------------------------------------------------------------------


def test_info_always_sends_info_export_first():
    result = Driver().feed(encode_info_request(Option.INFO, "disk", [Info.BLOCK_SIZE, Info.NAME]))
    items = info_items(result)
    assert items[0] == (Info.EXPORT, (DISK.size, ALL_FLAGS))
    assert result.final.reply == Reply.ACK
    assert result.ready is None


def test_info_answers_name_description_and_block_size_when_asked():
    infos = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]
    result = Driver().feed(encode_info_request(Option.INFO, "", infos))
    assert info_items(result) == [
        (Info.EXPORT, (DISK.size, ALL_FLAGS)),
        (Info.NAME, "disk"),
        (Info.DESCRIPTION, "plain disk"),
        (Info.BLOCK_SIZE, (1, 4096, 32 * MIB)),
    ]


def test_info_without_requests_sends_only_info_export():
    result = Driver().feed(encode_info_request(Option.INFO, "disk"))
    assert [kind for kind, _ in info_items(result)] == [Info.EXPORT]


def test_info_ignores_unknown_and_duplicate_info_types():
    infos = [Info.NAME, 0x7777, Info.NAME, Info.EXPORT]
    result = Driver().feed(encode_info_request(Option.INFO, "disk", infos))
    assert [kind for kind, _ in info_items(result)] == [Info.EXPORT, Info.NAME]


def test_info_then_go_return_the_same_information():
    driver = Driver()
    request = [Info.NAME, Info.BLOCK_SIZE]
    info = driver.feed(encode_info_request(Option.INFO, "disk", request))
    go = driver.feed(encode_info_request(Option.GO, "disk", request))
    assert info_items(info) == info_items(go)
    assert go.ready is not None


def test_go_enters_transmission_with_nothing_after_the_ack():
    driver = Driver()
    result = driver.feed(encode_info_request(Option.GO, "disk", [Info.BLOCK_SIZE]) + b"REQ")
    assert result.raw.endswith(encode_ack(Option.GO))
    ready = result.ready
    assert ready == Ready(
        export=DISK,
        structured=False,
        meta_contexts={},
        flags=ALL_FLAGS,
        no_zeroes=True,
        tls=False,
        block_size_requested=True,
    )
    assert driver.hs.trailing_data() == b"REQ"
    assert driver.hs.next_event() == ready


def encode_ack(option):
    return struct.pack(">QIII", 0x0003E889045565A9, option, Reply.ACK, 0)


def test_go_on_read_only_export_reports_read_only_flag():
    result = Driver().feed(encode_info_request(Option.GO, "ro"))
    assert result.ready.flags & F.READ_ONLY
    assert result.ready.export is RO


def test_go_never_advertises_flags_the_protocol_cannot_honour():
    odd = ExportView(
        "odd", "", MIB, F.SEND_DF | F.SEND_RESIZE | F.BLOCK_STATUS_PAYLOAD | F.SEND_FAST_ZERO
    )
    result = Driver(exports={"odd": odd}).feed(encode_info_request(Option.GO, "odd"))
    assert result.ready.flags == F.HAS_FLAGS


def test_go_failure_lets_the_client_continue():
    driver = Driver()
    assert outcome(driver.feed(encode_info_request(Option.GO, "nope"))) == "ERR_UNKNOWN"
    assert outcome(driver.feed(encode_info_request(Option.GO, "disk"))) == "READY"


def test_unknown_export_gets_no_info_items_before_the_error():
    result = Driver().feed(encode_info_request(Option.INFO, "nope", [Info.NAME]))
    assert [r.reply for r in result.replies] == [Reply.ERR_UNKNOWN]


def _info_data(namelen_field, name, count_field, infos, extra=b""):
    return (
        U32.pack(namelen_field)
        + name
        + struct.pack(">H", count_field)
        + b"".join(struct.pack(">H", i) for i in infos)
        + extra
    )


MALFORMED_INFO = {
    "empty": b"",
    "five-bytes": b"\0\0\0\0\0",
    "namelen-past-end": _info_data(10, b"disk", 0, []),
    "namelen-leaves-no-count": U32.pack(4) + b"disk" + b"\0",
    "count-too-big": _info_data(4, b"disk", 2, [1]),
    "count-too-small": _info_data(4, b"disk", 0, [1]),
    "trailing-byte": _info_data(4, b"disk", 0, [], b"\0"),
    "name-over-4096": _info_data(MAX_STRING + 1, b"n" * (MAX_STRING + 1), 0, []),
    "name-not-utf8": _info_data(2, b"\xc3\x28", 0, []),
    "namelen-huge": _info_data(0xFFFFFFFF, b"disk", 0, []),
}


@pytest.mark.parametrize("option", [Option.INFO, Option.GO])
@pytest.mark.parametrize("data", MALFORMED_INFO.values(), ids=MALFORMED_INFO.keys())
def test_malformed_info_go_is_invalid_and_stream_stays_in_sync(option, data):
    driver = Driver()
    result = driver.feed(encode_option(option, data) + encode_option(Option.STRUCTURED_REPLY))
    assert [(r.option, r.reply) for r in result.replies] == [
        (option, Reply.ERR_INVALID),
        (Option.STRUCTURED_REPLY, Reply.ACK),
    ]


def test_info_name_of_exactly_4096_bytes_is_looked_up():
    result = Driver().feed(encode_info_request(Option.INFO, "n" * MAX_STRING))
    assert result.final.reply == Reply.ERR_UNKNOWN


# --- authorization -----------------------------------------------------------------------------


def deny_disk(view):
    return "peer 10.0.0.9 not allowed" if view.name == "disk" else None


@pytest.mark.parametrize("option", [Option.INFO, Option.GO])
def test_unauthorized_info_go_gets_policy_without_revealing_the_reason(option):
    result = Driver(authorize=deny_disk).feed(encode_info_request(option, "disk"))
    assert [r.reply for r in result.replies] == [Reply.ERR_POLICY]
    assert result.final.data == b"access denied"
    assert result.handled == [
        OptionHandled(
            option, Reply.ERR_POLICY, "not authorized for export 'disk': peer 10.0.0.9 not allowed"
        )
    ]
    assert result.ready is None


def test_unauthorized_export_name_closes_and_reports_the_reason():
    result = Driver(authorize=deny_disk).option(Option.EXPORT_NAME, b"disk")
    assert result.raw == b""
    assert result.closed.error
    assert result.handled[0].reply == Reply.ERR_POLICY
    assert "peer 10.0.0.9" in result.handled[0].detail


def test_unauthorized_exports_are_hidden_from_list():
    result = Driver(authorize=deny_disk).option(Option.LIST)
    names = [parse_server(r.data)[0] for r in result.replies if r.reply == Reply.SERVER]
    assert names == ["secret", "ro"]


@pytest.mark.parametrize("option", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_unauthorized_export_is_unknown_to_meta_context_options(option):
    driver = Driver(authorize=deny_disk)
    driver.option(Option.STRUCTURED_REPLY)
    result = driver.feed(encode_meta_context_request(option, "disk", ["base:allocation"]))
    assert result.final.reply == Reply.ERR_UNKNOWN


def test_authorized_export_is_served_next_to_a_denied_one():
    result = Driver(authorize=deny_disk).feed(encode_info_request(Option.GO, "ro"))
    assert result.ready is not None


# --- STRUCTURED_REPLY --------------------------------------------------------------------------


def test_structured_reply_is_acked_once_then_invalid():
    driver = Driver()
    assert outcome(driver.option(Option.STRUCTURED_REPLY)) == "ACK"
    assert outcome(driver.option(Option.STRUCTURED_REPLY)) == "ERR_INVALID"
    assert driver.feed(encode_info_request(Option.GO, "disk")).ready.structured


def test_structured_reply_with_data_is_invalid_and_not_enabled():
    driver = Driver()
    assert outcome(driver.option(Option.STRUCTURED_REPLY, b"x")) == "ERR_INVALID"
    assert driver.feed(encode_info_request(Option.GO, "disk")).ready.structured is False


def test_structured_reply_adds_df_to_info_export_flags():
    driver = Driver()
    driver.option(Option.STRUCTURED_REPLY)
    result = driver.feed(encode_info_request(Option.INFO, "disk"))
    (_, (_size, flags)), *_ = info_items(result)
    assert flags == ALL_FLAGS | F.SEND_DF


# --- meta contexts -----------------------------------------------------------------------------


def structured_driver():
    driver = Driver()
    driver.option(Option.STRUCTURED_REPLY)
    return driver


def meta(option, name="disk", queries=()):
    return encode_meta_context_request(option, name, queries)


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], ["base:allocation"]),
        (["base:"], ["base:allocation"]),
        (["base:allocation"], ["base:allocation"]),
        (["base:allocation", "base:"], ["base:allocation"]),
        (["qemu:dirty-bitmap:x"], []),
        (["base:nosuchleaf"], []),
        (["nocolon"], []),
        (["x-vendor:thing", "base:allocation"], ["base:allocation"]),
    ],
)
def test_list_meta_context_matches_queries(queries, expected):
    result = structured_driver().feed(meta(Option.LIST_META_CONTEXT, "disk", queries))
    assert meta_replies(result) == [(0, name) for name in expected]
    assert result.final.reply == Reply.ACK


def test_list_meta_context_works_without_structured_replies():
    result = Driver().feed(meta(Option.LIST_META_CONTEXT))
    assert meta_replies(result) == [(0, "base:allocation")]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        (["base:allocation"], [(BASE_ALLOCATION_ID, "base:allocation")]),
        (["base:"], []),
        ([], []),
        (["qemu:allocation-depth"], []),
    ],
)
def test_set_meta_context_selects_only_base_allocation(queries, expected):
    driver = structured_driver()
    result = driver.feed(meta(Option.SET_META_CONTEXT, "disk", queries))
    assert meta_replies(result) == expected
    ready = driver.feed(encode_info_request(Option.GO, "disk")).ready
    assert ready.meta_contexts == dict(expected)


def test_set_meta_context_before_structured_reply_is_invalid():
    result = Driver().feed(meta(Option.SET_META_CONTEXT, "disk", ["base:allocation"]))
    assert [r.reply for r in result.replies] == [Reply.ERR_INVALID]


def test_set_meta_context_for_unknown_export_is_unknown():
    result = structured_driver().feed(meta(Option.SET_META_CONTEXT, "nope", ["base:allocation"]))
    assert [r.reply for r in result.replies] == [Reply.ERR_UNKNOWN]


def test_list_meta_context_for_unknown_export_is_unknown():
    result = structured_driver().feed(meta(Option.LIST_META_CONTEXT, "nope"))
    assert [r.reply for r in result.replies] == [Reply.ERR_UNKNOWN]


def test_failed_set_meta_context_still_replaces_the_selection():
    driver = structured_driver()
    driver.feed(meta(Option.SET_META_CONTEXT, "disk", ["base:allocation"]))
    assert driver.feed(meta(Option.SET_META_CONTEXT, "nope", ["base:allocation"])).final.reply == (
        Reply.ERR_UNKNOWN
    )
    assert driver.feed(encode_info_request(Option.GO, "disk")).ready.meta_contexts == {}


def test_malformed_set_meta_context_still_replaces_the_selection():
    driver = structured_driver()
    driver.feed(meta(Option.SET_META_CONTEXT, "disk", ["base:allocation"]))
    assert driver.option(Option.SET_META_CONTEXT, b"\0").final.reply == Reply.ERR_INVALID
    assert driver.feed(encode_info_request(Option.GO, "disk")).ready.meta_contexts == {}


def test_meta_contexts_apply_only_to_the_export_named_in_set():
    driver = structured_driver()
    driver.feed(meta(Option.SET_META_CONTEXT, "ro", ["base:allocation"]))
    assert driver.feed(encode_info_request(Option.GO, "disk")).ready.meta_contexts == {}


def test_meta_contexts_for_the_default_name_apply_to_the_default_export():
    driver = structured_driver()
    driver.feed(meta(Option.SET_META_CONTEXT, "", ["base:allocation"]))
    ready = driver.feed(encode_info_request(Option.GO, "disk")).ready
    assert ready.meta_contexts == {BASE_ALLOCATION_ID: "base:allocation"}


def test_meta_contexts_carry_into_export_name():
    driver = structured_driver()
    driver.feed(meta(Option.SET_META_CONTEXT, "disk", ["base:allocation"]))
    ready = driver.option(Option.EXPORT_NAME, b"disk").ready
    assert ready.meta_contexts == {BASE_ALLOCATION_ID: "base:allocation"}


def _meta_data(name, count, queries, extra=b""):
    data = U32.pack(len(name)) + name + U32.pack(count)
    for q in queries:
        data += U32.pack(len(q)) + q
    return data + extra


MALFORMED_META = {
    "empty": b"",
    "seven-bytes": b"\0" * 7,
    "namelen-past-end": U32.pack(100) + b"disk" + U32.pack(0),
    "count-past-end": _meta_data(b"disk", 2, [b"base:allocation"]),
    "query-past-end": _meta_data(b"disk", 1, []) + U32.pack(50) + b"base:",
    "query-length-cut": _meta_data(b"disk", 1, []) + b"\0\0",
    "trailing-bytes": _meta_data(b"disk", 1, [b"base:allocation"], b"\0\0\0"),
    "query-over-4096": _meta_data(b"disk", 1, [b"b" * (MAX_STRING + 1)]),
    "name-over-4096": _meta_data(b"n" * (MAX_STRING + 1), 0, []),
    "query-not-utf8": _meta_data(b"disk", 1, [b"\xff"]),
    "count-huge": _meta_data(b"disk", 0xFFFFFFFF, [b"base:allocation"]),
}


@pytest.mark.parametrize("option", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
@pytest.mark.parametrize("data", MALFORMED_META.values(), ids=MALFORMED_META.keys())
def test_malformed_meta_context_is_invalid_and_stream_stays_in_sync(option, data):
    driver = structured_driver()
    result = driver.feed(encode_option(option, data) + encode_option(Option.LIST))
    assert result.replies[0].reply == Reply.ERR_INVALID
    assert result.final.reply == Reply.ACK


# --- unknown options and shutdown --------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 4, 11, 12, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_option_is_unsupported_and_echoes_the_code(code):
    result = Driver().option(code, b"payload")
    assert [(int(r.option), r.reply) for r in result.replies] == [(code, Reply.ERR_UNSUP)]
    assert result.handled[0].option == code


@pytest.mark.parametrize(
    "data",
    [
        encode_option(Option.LIST),
        encode_info_request(Option.GO, "disk"),
        encode_option(Option.STRUCTURED_REPLY),
        encode_option(Option.STARTTLS),
        encode_option(0x4242, b"x"),
    ],
)
def test_shutdown_answers_options_with_err_shutdown(data):
    driver = Driver()
    driver.hs.start_shutdown()
    result = driver.feed(data)
    assert [r.reply for r in result.replies] == [Reply.ERR_SHUTDOWN]


def test_shutdown_still_acks_abort():
    driver = Driver()
    driver.hs.start_shutdown()
    assert outcome(driver.option(Option.ABORT)) == "ACK+CLOSE"


def test_shutdown_closes_on_export_name():
    driver = Driver()
    driver.hs.start_shutdown()
    assert outcome(driver.option(Option.EXPORT_NAME, b"disk")) == "DROP"


def test_trailing_data_before_ready_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        Driver().hs.trailing_data()


def test_every_option_yields_exactly_one_option_handled_event():
    driver = Driver()
    data = (
        encode_option(Option.LIST)
        + encode_option(0x4242)
        + encode_option(Option.STRUCTURED_REPLY)
        + meta(Option.SET_META_CONTEXT, "disk", ["base:allocation"])
        + encode_info_request(Option.INFO, "disk")
        + encode_info_request(Option.GO, "disk")
    )
    result = driver.feed(data)
    assert [e.option for e in result.handled] == [
        Option.LIST,
        0x4242,
        Option.STRUCTURED_REPLY,
        Option.SET_META_CONTEXT,
        Option.INFO,
        Option.GO,
    ]
    assert isinstance(result.events[-1], Ready)
    assert all(isinstance(e, OptionHandled) for e in result.events[:-1])


def test_exports_fixture_is_unchanged():
    # Guards against a test mutating the shared views (they are frozen).
    assert EXPORTS["disk"] is DISK


# --- ExportView --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": -1},
        {"size": 1 << 64},
        {"flags": 0x10000},
        {"min_block": 0},
        {"preferred_block": 1 << 32},
        {"max_block": 0},
        {"name": "n" * (MAX_STRING + 1)},
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_export_view_rejects_values_the_wire_cannot_carry(kwargs):
    fields = {"name": "x", "description": "", "size": MIB, "flags": ALL_FLAGS, **kwargs}
    with pytest.raises(ValueError):
        ExportView(**fields)


def test_export_view_accepts_wire_extremes():
    view = ExportView("x", "", (1 << 64) - 1, F(0xFFFF), 1, 1, 0xFFFFFFFF)
    assert view.max_block == 0xFFFFFFFF
