"""Decoders read what the builders write, and refuse malformed payloads precisely."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from millpond.errors import ProtocolError
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol import parsers as p


def payload(message: bytes) -> bytes:
    """The payload of one built message, checking its header on the way."""
    assert int.from_bytes(message[1:5], "big") == len(message) - 1
    return message[5:]


# -- round trips ---------------------------------------------------------------------


def test_error_response_round_trip() -> None:
    built = m.error_response("FATAL", "28P01", "password authentication failed", detail="d")
    decoded = p.decode_error_response(payload(built))
    assert decoded.severity == "FATAL"
    assert decoded.code == "28P01"
    assert decoded.message == "password authentication failed"
    assert decoded.detail == "d"
    assert decoded.hint is None
    assert dict(decoded.fields) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": "password authentication failed",
        "D": "d",
    }


def test_notice_falls_back_to_localized_severity() -> None:
    raw = b"SATTENTION\x00C01000\x00Mhi\x00\x00"
    decoded = p.decode_notice_response(raw)
    assert (decoded.severity, decoded.code, decoded.message) == ("ATTENTION", "01000", "hi")
    assert p.decode_notice_response(b"\x00").severity == ""


def test_parameter_status_round_trip() -> None:
    built = m.parameter_status("application_name", "psql")
    assert p.decode_parameter_status(payload(built)) == p.ParameterStatus(
        "application_name", "psql"
    )


def test_backend_key_data_round_trip() -> None:
    decoded = p.decode_backend_key_data(payload(m.backend_key_data(99, 0xCAFEBABE)))
    assert decoded == p.BackendKeyData(99, struct.pack("!I", 0xCAFEBABE))
    assert decoded.key == 0xCAFEBABE
    long_key = p.decode_backend_key_data(payload(m.backend_key_data(7, bytes(range(32)))))
    assert long_key.secret == bytes(range(32))
    # a 4-byte key given as bytes (the proxy's own): the same message as the int
    assert m.backend_key_data(99, struct.pack("!I", 0xCAFEBABE)) == m.backend_key_data(
        99, 0xCAFEBABE
    )
    short = p.decode_backend_key_data(payload(m.backend_key_data(-5, b"\x00\x01\x02\x03")))
    assert short == p.BackendKeyData(-5, b"\x00\x01\x02\x03")


@pytest.mark.parametrize("status", [b"I", b"T", b"E"])
def test_ready_for_query_round_trip(status: bytes) -> None:
    assert p.decode_ready_for_query(payload(m.ready_for_query(status))).status == status


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (m.authentication_ok(), p.Authentication(m.AuthCode.OK)),
        (m.authentication_cleartext_password(), p.Authentication(m.AuthCode.CLEARTEXT_PASSWORD)),
        (
            m.authentication_md5_password(b"\x01\x02\x03\x04"),
            p.Authentication(m.AuthCode.MD5_PASSWORD, salt=b"\x01\x02\x03\x04"),
        ),
        (
            m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
            p.Authentication(m.AuthCode.SASL, mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        ),
        (
            m.authentication_sasl_continue(b"r=x,s=y,i=4096"),
            p.Authentication(m.AuthCode.SASL_CONTINUE, data=b"r=x,s=y,i=4096"),
        ),
        (
            m.authentication_sasl_final(b"v=sig"),
            p.Authentication(m.AuthCode.SASL_FINAL, data=b"v=sig"),
        ),
        (m.frame(b"R", struct.pack("!i", 2)), p.Authentication(m.AuthCode.KERBEROS_V5)),
        (m.frame(b"R", struct.pack("!i", 7)), p.Authentication(m.AuthCode.GSS)),
        (
            m.frame(b"R", struct.pack("!i", 8) + b"tok"),
            p.Authentication(m.AuthCode.GSS_CONTINUE, data=b"tok"),
        ),
        (m.frame(b"R", struct.pack("!i", 9)), p.Authentication(m.AuthCode.SSPI)),
    ],
)
def test_authentication_round_trip(built: bytes, expected: p.Authentication) -> None:
    assert p.decode_authentication(payload(built)) == expected


def test_command_complete_round_trip_and_row_counts() -> None:
    decoded = p.decode_command_complete(payload(m.command_complete("INSERT 0 3")))
    assert (decoded.tag, decoded.command, decoded.rows) == ("INSERT 0 3", "INSERT", 3)
    select = p.CommandComplete("SELECT 12")
    assert (select.command, select.rows) == ("SELECT", 12)
    create = p.CommandComplete("CREATE TABLE")
    assert (create.command, create.rows) == ("CREATE TABLE", None)
    assert p.CommandComplete("SHOW").rows is None


def test_row_description_and_data_rows_of_a_result_set() -> None:
    from millpond.proxy.protocol.codec import MessageReader

    reader = MessageReader()
    reader.feed(m.result_set(["db", "size"], [["a", 1], [None, 22]], "SHOW"))
    described, *rows, done = list(reader)
    columns = p.decode_row_description(described.payload)
    assert columns.names == ("db", "size")
    assert [c.type_oid for c in columns.columns] == [m.TEXT_OID, m.INT8_OID]
    assert columns.columns[1] == p.Column("size", 0, 0, m.INT8_OID, 8, -1, 0)
    assert [p.decode_data_row(row.payload).values for row in rows] == [
        (b"a", b"1"),
        (None, b"22"),
    ]
    assert p.decode_command_complete(done.payload).tag == "SHOW"


def test_negotiate_protocol_version_round_trip() -> None:
    built = m.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"])
    decoded = p.decode_negotiate_protocol_version(payload(built))
    assert decoded == p.NegotiateProtocolVersion(0, ("_pq_.a", "_pq_.b"))


def test_frontend_round_trips() -> None:
    assert p.decode_query(payload(m.query("SELECT 1;"))) == p.Query("SELECT 1;")
    assert p.decode_password_message(payload(m.password_message("pw"))).password == "pw"
    assert p.decode_sasl_initial_response(
        payload(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    ) == p.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert p.decode_sasl_initial_response(
        payload(m.sasl_initial_response("X", None))
    ) == p.SASLInitialResponse("X", None)
    assert p.decode_sasl_response(payload(m.sasl_response(b"c=biws"))).data == b"c=biws"
    assert p.decode_parse(payload(m.parse("s1", "SELECT $1, $2", [23, 0]))) == p.Parse(
        "s1", "SELECT $1, $2", (23, 0)
    )
    assert p.decode_parse(payload(m.parse("", "SELECT 1"))) == p.Parse("", "SELECT 1", ())
    assert p.decode_describe(payload(m.describe(b"S", "s1"))) == p.Describe(b"S", "s1")
    assert p.decode_close(payload(m.close(b"P", "c1"))) == p.Close(b"P", "c1")
    assert p.decode_execute(payload(m.execute("c1", 50))) == p.Execute("c1", 50)


def test_parse_reads_large_oids_unsigned() -> None:
    assert p.decode_parse(payload(m.parse("", "q", [4_000_000_000]))).param_types == (
        4_000_000_000,
    )


def test_bind_keeps_raw_payload_and_can_be_renamed() -> None:
    built = m.bind("portal", "s1", [b"1", None, b""], param_formats=[1], result_formats=[0, 1])
    decoded = p.decode_bind(payload(built))
    assert (decoded.portal, decoded.statement) == ("portal", "s1")
    assert decoded.payload == payload(built)
    renamed = decoded.renamed("millpond_7")
    expected = m.bind(
        "portal", "millpond_7", [b"1", None, b""], param_formats=[1], result_formats=[0, 1]
    )
    assert renamed == expected
    assert decoded.tail == payload(expected)[len(b"portal\0millpond_7\0") :]


def test_strings_survive_invalid_utf8() -> None:
    raw = b"\xff\xfeselect\x00"
    decoded = p.decode_query(raw)
    assert payload(m.query(decoded.text)) == raw


def test_decoders_accept_memoryview_and_bytearray() -> None:
    raw = payload(m.parameter_status("a", "b"))
    assert p.decode_parameter_status(memoryview(raw)) == p.decode_parameter_status(bytearray(raw))


# -- malformed payloads --------------------------------------------------------------

Decoder = Callable[[bytes], object]


@pytest.mark.parametrize(
    ("decoder", "raw", "message"),
    [
        (p.decode_error_response, b"SERROR\x00", r"needs 1 more byte"),
        (p.decode_error_response, b"SERROR", r"no NUL terminator"),
        (p.decode_error_response, b"Mx\x00\x00junk", r"4 unexpected byte"),
        (p.decode_parameter_status, b"name\x00", r"no NUL terminator"),
        (p.decode_parameter_status, b"a\x00b\x00c", r"1 unexpected byte"),
        (p.decode_backend_key_data, b"\x00\x00\x00\x01\x00\x00\x00", r"cancel key is 3 bytes"),
        (p.decode_backend_key_data, b"\x00\x00\x00\x01" + b"k" * 257, r"cancel key is 257"),
        (p.decode_ready_for_query, b"", r"needs 1 more byte"),
        (p.decode_ready_for_query, b"Q", r"unknown transaction status b'Q'"),
        (p.decode_ready_for_query, b"II", r"1 unexpected byte"),
        (p.decode_authentication, b"\x00\x00\x00", r"needs 4 more byte"),
        (p.decode_authentication, b"\x00\x00\x00\x04", r"unknown authentication request code 4"),
        (p.decode_authentication, b"\x00\x00\x00\x00x", r"1 unexpected byte"),
        (p.decode_authentication, b"\x00\x00\x00\x05ab", r"needs 4 more byte"),
        (p.decode_authentication, b"\x00\x00\x00\x0a\x00", r"lists no mechanisms"),
        (p.decode_authentication, b"\x00\x00\x00\x0aSCRAM\x00", r"no NUL terminator"),
        (p.decode_command_complete, b"SELECT 1", r"no NUL terminator"),
        (p.decode_row_description, b"\x00\x01abc\x00" + bytes(16), r"needs 18 more byte"),
        (p.decode_row_description, b"\xff\xff", r"column count -1"),
        (p.decode_row_description, b"\x01\x00", r"column count 256 does not fit"),
        (p.decode_data_row, b"\x00\x01\xff\xff\xff\xfe", r"value length -2"),
        (p.decode_data_row, b"\x00\x01\x00\x00\x00\x05ab", r"needs 5 more byte"),
        (p.decode_data_row, b"\x00\x02\xff\xff\xff\xff", r"value count 2 does not fit"),
        (p.decode_negotiate_protocol_version, b"\x00\x00\x00\x00\x00\x00\x00\x09", r"count 9"),
        (p.decode_password_message, b"pw", r"no NUL terminator"),
        (p.decode_password_message, b"pw\x00\x00", r"1 unexpected byte"),
        (p.decode_sasl_initial_response, b"M\x00\x00\x00", r"needs 4 more byte"),
        (p.decode_sasl_initial_response, b"M\x00\x00\x00\x00\x09ab", r"needs 9 more byte"),
        (p.decode_query, b"", r"no NUL terminator"),
        (p.decode_parse, b"s\x00q\x00\x00\x02\x00\x00\x00\x17", r"parameter type count 2"),
        (p.decode_parse, b"s\x00q\x00", r"needs 2 more byte"),
        (p.decode_bind, b"\x00s\x00\x00\x01", r"parameter format count 1 does not fit in 0"),
        (p.decode_bind, b"\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x09x", r"needs 9 more"),
        (p.decode_bind, b"\x00s\x00\x00\x00\x00\x00\x00\x00\x01", r"1 unexpected byte"),
        (p.decode_describe, b"Xname\x00", r"target kind b'X'"),
        (p.decode_describe, b"", r"needs 1 more byte"),
        (p.decode_close, b"Sname", r"no NUL terminator"),
        (p.decode_execute, b"p\x00\x00\x00", r"needs 4 more byte"),
    ],
)
def test_malformed_payloads_raise_protocol_error(
    decoder: Decoder, raw: bytes, message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        decoder(raw)


def test_error_names_the_message() -> None:
    with pytest.raises(ProtocolError, match=r"^malformed Bind message: "):
        p.decode_bind(b"")


@pytest.mark.parametrize(
    ("decoder", "built"),
    [
        (p.decode_error_response, m.error_response("ERROR", "XX000", "m", hint="h")),
        (p.decode_parameter_status, m.parameter_status("k", "v")),
        (p.decode_backend_key_data, m.backend_key_data(1, 2)),
        (p.decode_ready_for_query, m.ready_for_query()),
        (p.decode_authentication, m.authentication_sasl(["A", "B"])),
        (p.decode_authentication, m.authentication_md5_password(b"salt")),
        (p.decode_command_complete, m.command_complete("SELECT 1")),
        (p.decode_row_description, m.row_description(["a", "b"])),
        (p.decode_data_row, m.data_row([b"x", None, b"yz"])),
        (p.decode_password_message, m.password_message("pw")),
        (p.decode_sasl_initial_response, m.sasl_initial_response("M", b"data")),
        (p.decode_query, m.query("SELECT 1")),
        (p.decode_parse, m.parse("s", "q", [1, 2])),
        (p.decode_bind, m.bind("p", "s", [b"1"], result_formats=[1])),
        (p.decode_describe, m.describe(b"S", "s")),
        (p.decode_close, m.close(b"S", "s")),
        (p.decode_execute, m.execute("p", 1)),
        (p.decode_negotiate_protocol_version, m.negotiate_protocol_version(0, ["_pq_.x"])),
    ],
)
def test_every_truncation_is_refused(decoder: Decoder, built: bytes) -> None:
    whole = payload(built)
    decoder(whole)
    for cut in range(len(whole)):
        with pytest.raises(ProtocolError):
            decoder(whole[:cut])
