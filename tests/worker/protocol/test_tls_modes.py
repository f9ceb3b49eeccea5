"""Every cell of the option x mode x before/after-TLS table (fact sheet section 4.3)."""

from __future__ import annotations

import struct

import pytest

from nbdworker.protocol import ClientFlag, Info, Option, OptionHandled, Reply, TLSMode
from tests.support.nbdclient import (
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    parse_server,
)

from .helpers import Driver, outcome

N, OB, OA, FB, FA, SB, SA = "N", "OB", "OA", "FB", "FA", "SB", "SA"
COLUMNS = {
    N: (TLSMode.NOTLS, False),
    OB: (TLSMode.OPTIONALTLS, False),
    OA: (TLSMode.OPTIONALTLS, True),
    FB: (TLSMode.FORCEDTLS, False),
    FA: (TLSMode.FORCEDTLS, True),
    SB: (TLSMode.SELECTIVETLS, False),
    SA: (TLSMode.SELECTIVETLS, True),
}


def _scenarios() -> dict[str, bytes]:
    info = encode_info_request
    meta = encode_meta_context_request
    return {
        "starttls": encode_option(Option.STARTTLS),
        "starttls_with_data": encode_option(Option.STARTTLS, b"x"),
        "abort": encode_option(Option.ABORT),
        "export_name_plain": encode_option(Option.EXPORT_NAME, b"disk"),
        "export_name_tls_only": encode_option(Option.EXPORT_NAME, b"secret"),
        "export_name_unknown": encode_option(Option.EXPORT_NAME, b"nope"),
        "list": encode_option(Option.LIST),
        "info_plain": info(Option.INFO, "disk", [Info.NAME]),
        "info_tls_only": info(Option.INFO, "secret"),
        "info_unknown": info(Option.INFO, "nope"),
        "go_plain": info(Option.GO, "disk"),
        "go_tls_only": info(Option.GO, "secret"),
        "go_unknown": info(Option.GO, "nope"),
        "structured_reply": encode_option(Option.STRUCTURED_REPLY),
        "extended_headers": encode_option(Option.EXTENDED_HEADERS),
        "list_meta_plain": meta(Option.LIST_META_CONTEXT, "disk"),
        "list_meta_tls_only": meta(Option.LIST_META_CONTEXT, "secret"),
        "set_meta_without_structured": meta(Option.SET_META_CONTEXT, "disk", ["base:allocation"]),
        "set_meta_plain": encode_option(Option.STRUCTURED_REPLY)
        + meta(Option.SET_META_CONTEXT, "disk", ["base:allocation"]),
        "set_meta_tls_only": encode_option(Option.STRUCTURED_REPLY)
        + meta(Option.SET_META_CONTEXT, "secret", ["base:allocation"]),
        "unknown_option": encode_option(0x1234, b"some data"),
        "peek_export": encode_option(Option.PEEK_EXPORT),
        "malformed_info": encode_option(Option.INFO, b"\0\0\0\x09abc"),
        "malformed_list": encode_option(Option.LIST, b"junk"),
    }


# scenario: {column: expected outcome}; columns left out expect the "normal" value.
TABLE: dict[str, tuple[str, dict[str, str]]] = {
    "starttls": (
        "STARTTLS",
        {N: "ERR_POLICY", OA: "ERR_INVALID", FA: "ERR_INVALID", SA: "ERR_INVALID"},
    ),
    "starttls_with_data": ("ERR_INVALID", {}),
    "abort": ("ACK+CLOSE", {}),
    "export_name_plain": ("READY", {FB: "DROP"}),
    "export_name_tls_only": ("READY", {FB: "DROP", SB: "DROP"}),
    "export_name_unknown": ("DROP", {}),
    "list": ("ACK", {FB: "ERR_TLS_REQD"}),
    "info_plain": ("ACK", {FB: "ERR_TLS_REQD"}),
    "info_tls_only": ("ACK", {FB: "ERR_TLS_REQD", SB: "ERR_TLS_REQD"}),
    "info_unknown": ("ERR_UNKNOWN", {FB: "ERR_TLS_REQD"}),
    "go_plain": ("READY", {FB: "ERR_TLS_REQD"}),
    "go_tls_only": ("READY", {FB: "ERR_TLS_REQD", SB: "ERR_TLS_REQD"}),
    "go_unknown": ("ERR_UNKNOWN", {FB: "ERR_TLS_REQD"}),
    "structured_reply": ("ACK", {FB: "ERR_TLS_REQD"}),
    "extended_headers": ("ERR_UNSUP", {FB: "ERR_TLS_REQD"}),
    "list_meta_plain": ("ACK", {FB: "ERR_TLS_REQD"}),
    "list_meta_tls_only": ("ACK", {FB: "ERR_TLS_REQD", SB: "ERR_UNKNOWN"}),
    "set_meta_without_structured": ("ERR_INVALID", {FB: "ERR_TLS_REQD"}),
    "set_meta_plain": ("ACK", {FB: "ERR_TLS_REQD"}),
    "set_meta_tls_only": ("ACK", {FB: "ERR_TLS_REQD", SB: "ERR_UNKNOWN"}),
    "unknown_option": ("ERR_UNSUP", {FB: "ERR_TLS_REQD"}),
    "peek_export": ("ERR_UNSUP", {FB: "ERR_TLS_REQD"}),
    "malformed_info": ("ERR_INVALID", {FB: "ERR_TLS_REQD"}),
    "malformed_list": ("ERR_INVALID", {FB: "ERR_TLS_REQD"}),
}

CELLS = [
    pytest.param(scenario, column, overrides.get(column, normal), id=f"{scenario}-{column}")
    for scenario, (normal, overrides) in TABLE.items()
    for column in COLUMNS
]


def _driver(column: str) -> Driver:
    mode, after = COLUMNS[column]
    driver = Driver(mode)
    if after:
        driver.start_tls()
    return driver


def test_table_covers_every_scenario():
    assert set(TABLE) == set(_scenarios())


@pytest.mark.parametrize(("scenario", "column", "expected"), CELLS)
def test_option_reply_per_tls_mode(scenario, column, expected):
    driver = _driver(column)
    result = driver.feed(_scenarios()[scenario])
    assert outcome(result) == expected
    mode, after = COLUMNS[column]
    sent = {reply.reply for reply in result.replies}
    if after or mode is TLSMode.NOTLS or mode is TLSMode.OPTIONALTLS:
        # TLS_REQD is forbidden once TLS is up, in NOTLS, and in OPTIONALTLS.
        assert Reply.ERR_TLS_REQD not in sent
    if mode is not TLSMode.FORCEDTLS and mode is not TLSMode.SELECTIVETLS:
        assert not any(e.reply == Reply.ERR_TLS_REQD for e in result.handled)


@pytest.mark.parametrize("scenario", sorted(TABLE))
def test_every_option_reply_echoes_the_option_code(scenario):
    data = _scenarios()[scenario]
    # The last option of the scenario is the one under test (set_meta_* send SR first).
    split = _last_option_offset(data)
    (code,) = struct.unpack_from(">I", data, split + 8)
    for column in COLUMNS:
        driver = _driver(column)
        driver.feed(data[:split])
        result = driver.feed(data[split:])
        assert all(reply.option == code for reply in result.replies)


def _last_option_offset(data: bytes) -> int:
    pos = 0
    while True:
        (length,) = struct.unpack_from(">I", data, pos + 12)
        if pos + 16 + length >= len(data):
            return pos
        pos += 16 + length


def test_forcedtls_rejects_go_before_starttls():
    driver = Driver(TLSMode.FORCEDTLS)
    result = driver.feed(encode_info_request(Option.GO, "disk", [Info.BLOCK_SIZE]))
    assert [r.reply for r in result.replies] == [Reply.ERR_TLS_REQD]
    assert result.ready is None


def test_forcedtls_sends_no_info_items_before_tls_required():
    result = Driver(TLSMode.FORCEDTLS).feed(encode_info_request(Option.INFO, "disk"))
    assert [r.reply for r in result.replies] == [Reply.ERR_TLS_REQD]


def test_forcedtls_serves_go_after_starttls():
    driver = Driver(TLSMode.FORCEDTLS)
    driver.start_tls()
    result = driver.feed(encode_info_request(Option.GO, "secret"))
    assert result.ready is not None
    assert result.ready.export.name == "secret"
    assert result.ready.tls is True


def test_forcedtls_drops_export_name_before_tls_without_reading_it():
    driver = Driver(TLSMode.FORCEDTLS)
    result = driver.feed(encode_option(Option.EXPORT_NAME, b"disk"))
    assert result.raw == b""
    assert result.closed is not None and result.closed.error
    assert result.handled[0].reply == Reply.ERR_TLS_REQD


def test_forcedtls_abort_is_acked_then_closed():
    result = Driver(TLSMode.FORCEDTLS).feed(encode_option(Option.ABORT))
    assert [r.reply for r in result.replies] == [Reply.ACK]
    assert result.closed is not None and not result.closed.error


def test_forcedtls_drains_gated_option_data_unparsed():
    driver = Driver(TLSMode.FORCEDTLS)
    # A malformed INFO followed by a good STARTTLS: the gate consumes exactly the data.
    result = driver.feed(encode_option(Option.INFO, b"\xff" * 300) + encode_option(Option.STARTTLS))
    assert [r.reply for r in result.replies] == [Reply.ERR_TLS_REQD, Reply.ACK]


def test_selectivetls_list_hides_tls_only_exports_until_tls():
    driver = Driver(TLSMode.SELECTIVETLS)
    before = driver.option(Option.LIST)
    names = [parse_server(r.data)[0] for r in before.replies if r.reply == Reply.SERVER]
    assert names == ["disk", "ro"]
    driver.start_tls()
    after = driver.option(Option.LIST)
    names = [parse_server(r.data)[0] for r in after.replies if r.reply == Reply.SERVER]
    assert names == ["disk", "secret", "ro"]


def test_optionaltls_lists_every_export_before_tls():
    result = Driver(TLSMode.OPTIONALTLS).option(Option.LIST)
    names = [parse_server(r.data)[0] for r in result.replies if r.reply == Reply.SERVER]
    assert names == ["disk", "secret", "ro"]


def test_selectivetls_go_for_plain_export_works_before_tls():
    result = Driver(TLSMode.SELECTIVETLS).feed(encode_info_request(Option.GO, "disk"))
    assert result.ready is not None and result.ready.tls is False


def test_starttls_with_data_is_invalid_and_data_consumed():
    driver = Driver(TLSMode.OPTIONALTLS)
    result = driver.feed(encode_option(Option.STARTTLS, b"abc") + encode_option(Option.STARTTLS))
    assert outcome(result) == "STARTTLS"
    assert [r.reply for r in result.replies] == [Reply.ERR_INVALID, Reply.ACK]


def test_starttls_after_tls_is_invalid():
    driver = Driver(TLSMode.FORCEDTLS)
    driver.start_tls()
    result = driver.option(Option.STARTTLS)
    assert result.final.reply == Reply.ERR_INVALID


# --- clients without C_FIXED_NEWSTYLE: TLS is impossible ---------------------------------------

NON_FIXED = ClientFlag.C_NO_ZEROES


@pytest.mark.parametrize("mode", list(TLSMode))
def test_non_fixed_client_cannot_start_tls(mode):
    result = Driver(mode, client_flags=NON_FIXED).option(Option.STARTTLS)
    assert result.final.reply == Reply.ERR_POLICY


def test_forcedtls_drops_export_name_from_non_fixed_client():
    result = Driver(TLSMode.FORCEDTLS, client_flags=NON_FIXED).option(Option.EXPORT_NAME, b"disk")
    assert result.closed is not None and result.closed.error
    assert result.raw == b""


@pytest.mark.parametrize(("name", "expected"), [("disk", "READY"), ("secret", "DROP")])
def test_selectivetls_non_fixed_client_reaches_only_plain_exports(name, expected):
    driver = Driver(TLSMode.SELECTIVETLS, client_flags=NON_FIXED)
    assert outcome(driver.option(Option.EXPORT_NAME, name.encode())) == expected


@pytest.mark.parametrize("mode", [TLSMode.NOTLS, TLSMode.OPTIONALTLS])
def test_non_fixed_client_gets_export_name_in_plain_modes(mode):
    driver = Driver(mode, client_flags=0)
    result = driver.option(Option.EXPORT_NAME, b"secret")
    assert result.ready is not None
    assert len(result.raw) == 134  # no NO_ZEROES: padded reply


# --- STARTTLS mechanics ------------------------------------------------------------------------


def test_plaintext_pipelined_after_starttls_closes_with_error():
    driver = Driver(TLSMode.OPTIONALTLS)
    result = driver.feed(encode_option(Option.STARTTLS) + b"\x16\x03\x01")
    assert result.raw == b""  # no ACK: the client broke the protocol first
    assert result.closed is not None and result.closed.error
    assert "plaintext" in result.closed.reason


def test_plaintext_fed_while_tls_pending_closes_with_error():
    driver = Driver(TLSMode.OPTIONALTLS)
    assert outcome(driver.option(Option.STARTTLS)) == "STARTTLS"
    result = driver.feed(encode_option(Option.STRUCTURED_REPLY))
    assert result.closed is not None and result.closed.error
    assert result.raw == b""


def test_eof_while_tls_pending_closes_without_error():
    driver = Driver(TLSMode.OPTIONALTLS)
    driver.option(Option.STARTTLS)
    result = driver.eof()
    assert result.closed is not None and not result.closed.error


def test_tls_started_wipes_structured_replies_and_meta_contexts():
    driver = Driver(TLSMode.OPTIONALTLS)
    before = driver.feed(
        encode_option(Option.STRUCTURED_REPLY)
        + encode_meta_context_request(Option.SET_META_CONTEXT, "disk", ["base:allocation"])
    )
    assert [r.reply for r in before.replies] == [Reply.ACK, Reply.META_CONTEXT, Reply.ACK]
    driver.start_tls()
    result = driver.feed(encode_info_request(Option.GO, "disk"))
    assert result.ready is not None
    assert result.ready.structured is False
    assert result.ready.meta_contexts == {}
    assert not result.ready.flags & 0x80  # no SEND_DF without structured replies


def test_structured_reply_can_be_negotiated_again_after_tls():
    driver = Driver(TLSMode.OPTIONALTLS)
    driver.option(Option.STRUCTURED_REPLY)
    driver.start_tls()
    assert driver.option(Option.STRUCTURED_REPLY).final.reply == Reply.ACK


def test_set_meta_context_before_tls_does_not_survive_into_go_after_tls():
    driver = Driver(TLSMode.SELECTIVETLS)
    driver.feed(
        encode_option(Option.STRUCTURED_REPLY)
        + encode_meta_context_request(Option.SET_META_CONTEXT, "disk", ["base:allocation"])
    )
    driver.start_tls()
    driver.option(Option.STRUCTURED_REPLY)
    result = driver.feed(encode_info_request(Option.GO, "disk"))
    assert result.ready.structured is True
    assert result.ready.meta_contexts == {}


def test_tls_started_outside_starttls_is_a_local_error():
    from nbdworker.protocol import LocalProtocolError

    driver = Driver(TLSMode.OPTIONALTLS)
    with pytest.raises(LocalProtocolError):
        driver.hs.tls_started()


def test_starttls_emits_option_handled_before_start_tls():
    result = Driver(TLSMode.OPTIONALTLS).option(Option.STARTTLS)
    assert isinstance(result.events[0], OptionHandled)
    assert result.events[0].reply == Reply.ACK
