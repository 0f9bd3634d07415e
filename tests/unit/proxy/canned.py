"""Canned PostgreSQL byte streams shared by the codec tests."""

from __future__ import annotations

from millpond.proxy.protocol import messages as m


def backend_stream() -> list[bytes]:
    """A server's side of a login, a SHOW, a failing query and an extended-protocol run."""
    return [
        m.authentication_sasl(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]),
        m.authentication_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"),
        m.authentication_sasl_final(b"v=c2lnbmF0dXJl"),
        m.authentication_ok(),
        m.parameter_status("client_encoding", "UTF8"),
        m.parameter_status("server_version", "16.2"),
        m.backend_key_data(4242, 0xDEADBEEF),
        m.ready_for_query(),
        m.result_set(["database", "pool_size", "comment"], [["db1", 20, None], ["db2", 5, "x"]]),
        m.ready_for_query(m.TX_IN_TRANSACTION),
        m.error_response("ERROR", "42P01", 'relation "nope" does not exist', hint="check it"),
        m.ready_for_query(m.TX_FAILED),
        m.parse_complete(),
        m.bind_complete(),
        m.no_data(),
        m.empty_query_response(),
        m.notice_response("WARNING", "01000", "careful"),
        m.close_complete(),
        m.ready_for_query(),
    ]


def frontend_stream() -> list[bytes]:
    """A client's side after startup: SCRAM, a simple query, an extended batch, goodbye."""
    return [
        m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=clientnonce"),
        m.sasl_response(b"c=biws,r=clientnonce,p=proof"),
        m.query("SHOW POOLS;"),
        m.parse("s1", "SELECT $1::int8", [20]),
        m.bind("", "s1", [b"42", None], param_formats=[0], result_formats=[1]),
        m.describe(m.TARGET_PORTAL, ""),
        m.execute("", 0),
        m.close(m.TARGET_STATEMENT, "s1"),
        m.flush(),
        m.sync(),
        m.password_message("md5" + "0" * 32),
        m.terminate(),
    ]


def split_messages(stream: bytes) -> list[tuple[bytes, bytes]]:
    """Reference framing, written the obvious way: (type, payload) per message."""
    out = []
    pos = 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 1 : pos + 5], "big")
        out.append((stream[pos : pos + 1], stream[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out
