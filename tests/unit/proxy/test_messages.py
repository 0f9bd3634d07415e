"""Builders produce exactly the bytes the PostgreSQL protocol documentation describes."""

from __future__ import annotations

import struct

import pytest

from millpond.proxy.protocol import messages as m


def _i32(value: int) -> bytes:
    return struct.pack("!i", value)


def test_protocol_constants() -> None:
    assert m.PROTOCOL_VERSION == 3 << 16 == 196608
    assert m.PROTOCOL_VERSION_3_2 == (3 << 16) | 2
    assert m.SSL_REQUEST_CODE == (1234 << 16) | 5679 == 80877103
    assert m.GSSENC_REQUEST_CODE == (1234 << 16) | 5680 == 80877104
    assert m.CANCEL_REQUEST_CODE == (1234 << 16) | 5678 == 80877102
    assert m.MAX_MESSAGE_LENGTH == 2**30 - 1
    assert m.MAX_STARTUP_PACKET_LENGTH == 10000


def test_type_bytes_are_single_bytes() -> None:
    names = [
        name
        for name in dir(m)
        if name[0].isalpha() and name.isupper() and isinstance(getattr(m, name), bytes)
    ]
    assert len(names) > 40
    for name in names:
        if name != "TX_STATUSES":
            assert len(getattr(m, name)) == 1, name


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (m.authentication_ok(), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
        (m.authentication_cleartext_password(), b"R\x00\x00\x00\x08\x00\x00\x00\x03"),
        (m.authentication_md5_password(b"abcd"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"),
        (
            m.authentication_sasl(["SCRAM-SHA-256"]),
            b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
        ),
        (m.authentication_sasl_continue(b"r=1"), b"R\x00\x00\x00\x0b\x00\x00\x00\x0br=1"),
        (m.authentication_sasl_final(b"v=2"), b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=2"),
        (m.parameter_status("a", "b"), b"S\x00\x00\x00\x08a\x00b\x00"),
        (m.backend_key_data(42, 7), b"K\x00\x00\x00\x0c\x00\x00\x00\x2a\x00\x00\x00\x07"),
        (m.backend_key_data(1, b"k" * 32), b"K" + _i32(40) + _i32(1) + b"k" * 32),
        (m.ready_for_query(), b"Z\x00\x00\x00\x05I"),
        (m.ready_for_query(b"E"), b"Z\x00\x00\x00\x05E"),
        (
            m.error_response("ERROR", "42P01", "x"),
            b"E\x00\x00\x00\x1dSERROR\x00VERROR\x00C42P01\x00Mx\x00\x00",
        ),
        (
            m.notice_response("NOTICE", "00000", "m", detail="d", hint="h"),
            b"N\x00\x00\x00\x25SNOTICE\x00VNOTICE\x00C00000\x00Mm\x00Dd\x00Hh\x00\x00",
        ),
        (m.command_complete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00"),
        (m.empty_query_response(), b"I\x00\x00\x00\x04"),
        (m.parse_complete(), b"1\x00\x00\x00\x04"),
        (m.bind_complete(), b"2\x00\x00\x00\x04"),
        (m.close_complete(), b"3\x00\x00\x00\x04"),
        (m.no_data(), b"n\x00\x00\x00\x04"),
        (m.data_row([b"1", None]), b"D\x00\x00\x00\x0f\x00\x02\x00\x00\x00\x011\xff\xff\xff\xff"),
        (
            m.data_row(["é", 7, True]),
            b"D"
            + _i32(22)
            + b"\x00\x03"
            + b"\x00\x00\x00\x02\xc3\xa9"
            + b"\x00\x00\x00\x017"
            + b"\x00\x00\x00\x01t",
        ),
        (
            m.row_description(["a"]),
            b"T\x00\x00\x00\x1a\x00\x01a\x00"
            + b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00",
        ),
        (
            m.negotiate_protocol_version(0, ["_pq_.x"]),
            b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00",
        ),
        (m.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00"),
        (m.terminate(), b"X\x00\x00\x00\x04"),
        (m.sync(), b"S\x00\x00\x00\x04"),
        (m.flush(), b"H\x00\x00\x00\x04"),
        (m.password_message("secret"), b"p\x00\x00\x00\x0bsecret\x00"),
        (m.password_message(b"md5ab"), b"p\x00\x00\x00\x0amd5ab\x00"),
        (m.sasl_initial_response("M", b"xy"), b"p\x00\x00\x00\x0cM\x00\x00\x00\x00\x02xy"),
        (m.sasl_initial_response("M", None), b"p\x00\x00\x00\x0aM\x00\xff\xff\xff\xff"),
        (m.sasl_response(b"c=biws"), b"p\x00\x00\x00\x0ac=biws"),
        (
            m.parse("s1", "SELECT $1", [23]),
            b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17",
        ),
        (
            m.bind("", "s1", [b"5", None], param_formats=[0], result_formats=[1]),
            b"B\x00\x00\x00\x1b\x00s1\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x015"
            + b"\xff\xff\xff\xff\x00\x01\x00\x01",
        ),
        (m.describe(b"S", "s1"), b"D\x00\x00\x00\x08Ss1\x00"),
        (m.close(b"P", ""), b"C\x00\x00\x00\x06P\x00"),
        (m.execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
        (m.execute("p", 10), b"E\x00\x00\x00\x0ap\x00\x00\x00\x00\x0a"),
    ],
)
def test_builder_bytes(built: bytes, expected: bytes) -> None:
    assert built == expected
    assert int.from_bytes(built[1:5], "big") == len(built) - 1


def test_startup_phase_packets_have_no_type_byte() -> None:
    assert m.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert m.gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert m.cancel_request(1234, 5678) == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + struct.pack("!ii", 1234, 5678)
    )
    assert m.cancel_request(1, b"s" * 32) == _i32(44) + _i32(m.CANCEL_REQUEST_CODE) + _i32(1) + (
        b"s" * 32
    )
    assert m.startup_message({"user": "u"}) == b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00"
    two = m.startup_message({"user": "u", "database": "d"}, protocol=m.PROTOCOL_VERSION_3_2)
    assert two == _i32(27) + _i32(196610) + b"user\x00u\x00database\x00d\x00\x00"


def test_cancel_key_as_int_accepts_signed_and_unsigned_32_bit() -> None:
    assert m.backend_key_data(1, -1) == m.backend_key_data(1, 0xFFFFFFFF)
    assert m.cancel_request(1, -(2**31)) == m.cancel_request(1, 2**31)


def test_result_set_is_description_rows_and_tag() -> None:
    built = m.result_set(["name", "n"], [["a", 1], [None, None]], "SHOW")
    assert built == (
        m.row_description(["name", "n"], [m.TEXT_OID, m.INT8_OID])
        + m.data_row(["a", 1])
        + m.data_row([None, None])
        + m.command_complete("SHOW")
    )


def test_result_set_types_integer_columns_as_int8_only_when_all_ints() -> None:
    mixed = m.result_set(["c"], [[1], ["x"]])
    assert mixed.startswith(m.row_description(["c"], [m.TEXT_OID]))
    flags = m.result_set(["c"], [[True]])
    assert flags.startswith(m.row_description(["c"], [m.TEXT_OID]))
    empty = m.result_set(["c"], [])
    assert empty == m.row_description(["c"]) + m.command_complete("SHOW")


def test_row_description_sizes_known_types() -> None:
    built = m.row_description(["n"], [m.INT8_OID])
    assert built.endswith(b"\x00\x00\x00\x14\x00\x08\xff\xff\xff\xff\x00\x00")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: m.query("a\0b"), "NUL"),
        (lambda: m.query("\ud800"), "surrogates not allowed"),
        (lambda: m.frame(b"QQ", b""), "exactly one byte"),
        (lambda: m.authentication_md5_password(b"abc"), "4 bytes"),
        (lambda: m.authentication_sasl([]), "at least one"),
        (lambda: m.authentication_sasl([""]), "at least one"),
        (lambda: m.ready_for_query(b"X"), "transaction status"),
        (lambda: m.ready_for_query(b"IT"), "transaction status"),
        (lambda: m.error_response("ERROR", "4201", "x"), "SQLSTATE"),
        (lambda: m.error_response("ERROR", "42p01", "x"), "SQLSTATE"),
        (lambda: m.error_response("ERROR", "42-01", "x"), "SQLSTATE"),
        (lambda: m.backend_key_data(1, 2**32), "out of range"),
        (lambda: m.backend_key_data(1, b"abc"), "4 to 256"),
        (lambda: m.cancel_request(1, b"x" * 257), "4 to 256"),
        (lambda: m.row_description(["a"], [25, 25]), "type oids"),
        (lambda: m.result_set(["a", "b"], [["x"]]), "row 0 has 1 values"),
        (lambda: m.startup_message({"database": "d"}), "user"),
        (lambda: m.startup_message({"user": ""}), "user"),
        (lambda: m.startup_message({"user": "u", "": "x"}), "empty"),
        (lambda: m.password_message(b"a\0b"), "NUL"),
        (lambda: m.describe(b"X", "s"), "target kind"),
        (lambda: m.close(b"", "s"), "target kind"),
    ],
)
def test_builders_reject_bad_arguments(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


def test_data_row_rejects_other_value_types() -> None:
    with pytest.raises(TypeError, match="float"):
        m.data_row([1.5])  # type: ignore[list-item]


def test_auth_codes() -> None:
    assert [int(code) for code in m.AuthCode] == [0, 2, 3, 5, 7, 8, 9, 10, 11, 12]
