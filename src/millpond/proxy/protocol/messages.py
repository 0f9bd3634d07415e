"""PostgreSQL v3 message constants and builders for the messages the proxy writes.

Every builder returns the complete message as ``bytes`` (type byte, length, payload),
ready to be written to a socket. Strings are encoded as UTF-8 with
``surrogateescape``, so text decoded by :mod:`millpond.proxy.protocol.parsers` survives
a round trip byte for byte even when it is not valid UTF-8.

Builders are called by millpond's own code, so a bad argument (a NUL inside a string,
a malformed SQLSTATE, a row of the wrong width) is a programming error and raises
``ValueError``; :class:`~millpond.errors.ProtocolError` is reserved for bytes a peer sent.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum

# -- message type bytes, frontend (client -> server) --------------------------------

BIND = b"B"
CLOSE = b"C"
COPY_DATA = b"d"
COPY_DONE = b"c"
COPY_FAIL = b"f"
DESCRIBE = b"D"
EXECUTE = b"E"
FLUSH = b"H"
FUNCTION_CALL = b"F"
PARSE = b"P"
PASSWORD_MESSAGE = b"p"
QUERY = b"Q"
SYNC = b"S"
TERMINATE = b"X"
# These share the 'p' byte with PasswordMessage; the auth exchange tells them apart.
SASL_INITIAL_RESPONSE = PASSWORD_MESSAGE
SASL_RESPONSE = PASSWORD_MESSAGE
GSS_RESPONSE = PASSWORD_MESSAGE

# -- message type bytes, backend (server -> client) ---------------------------------

AUTHENTICATION = b"R"
BACKEND_KEY_DATA = b"K"
BIND_COMPLETE = b"2"
CLOSE_COMPLETE = b"3"
COMMAND_COMPLETE = b"C"
COPY_IN_RESPONSE = b"G"
COPY_OUT_RESPONSE = b"H"
COPY_BOTH_RESPONSE = b"W"
DATA_ROW = b"D"
EMPTY_QUERY_RESPONSE = b"I"
ERROR_RESPONSE = b"E"
FUNCTION_CALL_RESPONSE = b"V"
NEGOTIATE_PROTOCOL_VERSION = b"v"
NO_DATA = b"n"
NOTICE_RESPONSE = b"N"
NOTIFICATION_RESPONSE = b"A"
PARAMETER_DESCRIPTION = b"t"
PARAMETER_STATUS = b"S"
PARSE_COMPLETE = b"1"
PORTAL_SUSPENDED = b"s"
READY_FOR_QUERY = b"Z"
ROW_DESCRIPTION = b"T"

# -- values carried inside messages --------------------------------------------------

TX_IDLE = b"I"
"""ReadyForQuery status: not in a transaction block."""
TX_IN_TRANSACTION = b"T"
"""ReadyForQuery status: inside a transaction block."""
TX_FAILED = b"E"
"""ReadyForQuery status: inside a failed transaction block (queries rejected until rollback)."""
TX_STATUSES = TX_IDLE + TX_IN_TRANSACTION + TX_FAILED

TARGET_STATEMENT = b"S"
"""Describe/Close target: a prepared statement."""
TARGET_PORTAL = b"P"
"""Describe/Close target: a portal."""

SSL_ACCEPTED = b"S"
"""The single byte a server answers an SSLRequest/GSSENCRequest with to go ahead."""
SSL_REJECTED = b"N"
"""The single byte a server answers an SSLRequest/GSSENCRequest with to refuse."""

TEXT_OID = 25
INT8_OID = 20

# -- protocol constants --------------------------------------------------------------

PROTOCOL_VERSION = 196608
"""Protocol 3.0 as sent in a StartupMessage (major in the high 16 bits, minor low)."""
PROTOCOL_VERSION_3_2 = 196610
"""Protocol 3.2 (PostgreSQL 18): same framing, variable-length cancel keys."""
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

MAX_MESSAGE_LENGTH = 0x3FFFFFFF
"""Largest length field accepted by default (1 GiB - 1, PostgreSQL's own limit)."""
MAX_STARTUP_PACKET_LENGTH = 10000
"""Largest startup packet accepted by default (PostgreSQL's own limit)."""
MIN_CANCEL_KEY_LENGTH = 4
MAX_CANCEL_KEY_LENGTH = 256


class AuthCode(IntEnum):
    """The request code in an Authentication ('R') message."""

    OK = 0
    KERBEROS_V5 = 2
    CLEARTEXT_PASSWORD = 3
    MD5_PASSWORD = 5
    GSS = 7
    GSS_CONTINUE = 8
    SSPI = 9
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_TWO_I32 = struct.Struct("!ii")
_COLUMN = struct.Struct("!IhIhih")
_NULL_VALUE = _I32.pack(-1)
_TYPE_SIZES = {16: 1, 21: 2, 23: 4, INT8_OID: 8, 700: 4, 701: 8}

# -- low-level helpers ---------------------------------------------------------------


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """Wrap ``payload`` in a message header: the type byte and the Int32 length."""
    if len(kind) != 1:
        raise ValueError(f"a message type is exactly one byte, got {kind!r}")
    return kind + _I32.pack(len(payload) + 4) + payload


def cstring(text: str) -> bytes:
    """Encode ``text`` as a NUL-terminated protocol string."""
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"a protocol string cannot contain a NUL character: {text!r}")
    return raw + b"\0"


def _untyped(payload: bytes) -> bytes:
    """Frame a startup-phase packet, which has a length but no type byte."""
    return _I32.pack(len(payload) + 4) + payload


def _cancel_secret(key: int | bytes) -> bytes:
    """Encode a cancel key: an Int32 (protocol 3.0) or 4..256 raw bytes (3.2)."""
    if isinstance(key, int):
        if not -(2**31) <= key < 2**32:
            raise ValueError(f"a 32-bit cancel key is out of range: {key}")
        return _U32.pack(key & 0xFFFFFFFF)
    if not MIN_CANCEL_KEY_LENGTH <= len(key) <= MAX_CANCEL_KEY_LENGTH:
        raise ValueError(f"a cancel key is 4 to 256 bytes, got {len(key)}")
    return bytes(key)


# -- backend messages ----------------------------------------------------------------


def _authentication(code: AuthCode, data: bytes = b"") -> bytes:
    return frame(AUTHENTICATION, _I32.pack(code) + data)


@functools.cache
def authentication_ok() -> bytes:
    """AuthenticationOk: the client is in (the same bytes every time: built once)."""
    return _authentication(AuthCode.OK)


def authentication_cleartext_password() -> bytes:
    """AuthenticationCleartextPassword: ask for the password in clear text."""
    return _authentication(AuthCode.CLEARTEXT_PASSWORD)


def authentication_md5_password(salt: bytes) -> bytes:
    """AuthenticationMD5Password: ask for the MD5 hash salted with these 4 bytes."""
    if len(salt) != 4:
        raise ValueError(f"an MD5 salt is exactly 4 bytes, got {len(salt)}")
    return _authentication(AuthCode.MD5_PASSWORD, bytes(salt))


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    """AuthenticationSASL: offer these SASL mechanisms, most preferred first."""
    names = [cstring(name) for name in mechanisms]
    if not names or b"\0" in names:
        raise ValueError("AuthenticationSASL needs at least one non-empty mechanism name")
    return _authentication(AuthCode.SASL, b"".join(names) + b"\0")


def authentication_sasl_continue(data: bytes) -> bytes:
    """AuthenticationSASLContinue: a server challenge in the SASL exchange."""
    return _authentication(AuthCode.SASL_CONTINUE, bytes(data))


def authentication_sasl_final(data: bytes) -> bytes:
    """AuthenticationSASLFinal: the server's last SASL message (its signature)."""
    return _authentication(AuthCode.SASL_FINAL, bytes(data))


@functools.lru_cache(maxsize=1024)
def parameter_status(name: str, value: str) -> bytes:
    """ParameterStatus: report a run-time parameter's current value.

    Memoised: a proxy sends the same dozen to every client at login.
    """
    return frame(PARAMETER_STATUS, cstring(name) + cstring(value))


def backend_key_data(pid: int, key: int | bytes) -> bytes:
    """BackendKeyData: the process id and secret a client uses to cancel a query."""
    if type(key) is bytes and len(key) == 4:  # the proxy's own, at every login
        return _KEY_DATA_4 + _I32.pack(pid) + key
    return frame(BACKEND_KEY_DATA, _I32.pack(pid) + _cancel_secret(key))


_KEY_DATA_4 = BACKEND_KEY_DATA + _I32.pack(12)  # the header of a 4-byte key's message


@functools.lru_cache(maxsize=8)
def ready_for_query(status: bytes = TX_IDLE) -> bytes:
    """ReadyForQuery with a transaction status of ``I``, ``T`` or ``E`` (built once each)."""
    if len(status) != 1 or status not in TX_STATUSES:
        raise ValueError(f"transaction status must be one of b'I', b'T', b'E', got {status!r}")
    return frame(READY_FOR_QUERY, bytes(status))


def _notice_fields(
    severity: str, code: str, message: str, detail: str | None, hint: str | None
) -> bytes:
    if len(code) != 5 or not (code.isascii() and code.isalnum()) or code != code.upper():
        raise ValueError(f"a SQLSTATE is 5 digits or upper-case letters, got {code!r}")
    fields = [("S", severity), ("V", severity), ("C", code), ("M", message)]
    if detail is not None:
        fields.append(("D", detail))
    if hint is not None:
        fields.append(("H", hint))
    return b"".join(tag.encode() + cstring(value) for tag, value in fields) + b"\0"


def error_response(
    severity: str, code: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> bytes:
    """ErrorResponse with severity (sent as both 'S' and 'V'), SQLSTATE and message."""
    return frame(ERROR_RESPONSE, _notice_fields(severity, code, message, detail, hint))


def notice_response(
    severity: str, code: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> bytes:
    """NoticeResponse: the same fields as :func:`error_response`, but only a warning."""
    return frame(NOTICE_RESPONSE, _notice_fields(severity, code, message, detail, hint))


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str] = ()) -> bytes:
    """NegotiateProtocolVersion: the newest minor version served, and options ignored."""
    names = b"".join(cstring(name) for name in unrecognized)
    return frame(NEGOTIATE_PROTOCOL_VERSION, _TWO_I32.pack(newest_minor, len(unrecognized)) + names)


def row_description(columns: Sequence[str], type_oids: Sequence[int] | None = None) -> bytes:
    """RowDescription for text-format columns, of type ``text`` unless ``type_oids`` says."""
    oids = [TEXT_OID] * len(columns) if type_oids is None else list(type_oids)
    if len(oids) != len(columns):
        raise ValueError(f"{len(columns)} columns but {len(oids)} type oids")
    parts = [_I16.pack(len(columns))]
    for name, oid in zip(columns, oids, strict=True):
        parts.append(cstring(name) + _COLUMN.pack(0, 0, oid, _TYPE_SIZES.get(oid, -1), -1, 0))
    return frame(ROW_DESCRIPTION, b"".join(parts))


def _text_value(value: bytes | str | int | None) -> bytes | None:
    """Render one column value in PostgreSQL's text format."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int | str):
        return str(value).encode("utf-8", "surrogateescape")
    raise TypeError(f"a column value must be bytes, str, int or None, not {type(value).__name__}")


def data_row(values: Sequence[bytes | str | int | None]) -> bytes:
    """DataRow: one row, each value in text format; ``None`` is SQL NULL."""
    parts = [_I16.pack(len(values))]
    for value in values:
        raw = _text_value(value)
        parts.append(_NULL_VALUE if raw is None else _I32.pack(len(raw)) + raw)
    return frame(DATA_ROW, b"".join(parts))


def command_complete(tag: str) -> bytes:
    """CommandComplete with a command tag such as ``SELECT 3`` or ``SHOW``."""
    return frame(COMMAND_COMPLETE, cstring(tag))


def empty_query_response() -> bytes:
    """EmptyQueryResponse: the answer to a query string with no statement in it."""
    return frame(EMPTY_QUERY_RESPONSE)


def parse_complete() -> bytes:
    """ParseComplete: the answer to Parse."""
    return frame(PARSE_COMPLETE)


def bind_complete() -> bytes:
    """BindComplete: the answer to Bind."""
    return frame(BIND_COMPLETE)


def close_complete() -> bytes:
    """CloseComplete: the answer to Close."""
    return frame(CLOSE_COMPLETE)


def no_data() -> bytes:
    """NoData: Describe's answer for a statement or portal returning no rows."""
    return frame(NO_DATA)


def _column_type(rows: Sequence[Sequence[str | int | None]], index: int) -> int:
    """``int8`` when every non-NULL value in the column is an int, else ``text``."""
    values = [row[index] for row in rows if row[index] is not None]
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return INT8_OID
    return TEXT_OID


def result_set(
    columns: Sequence[str],
    rows: Iterable[Sequence[str | int | None]],
    command_tag: str = "SHOW",
) -> bytes:
    """RowDescription, one DataRow per row, then CommandComplete: a whole result.

    Integer-only columns are described as ``int8`` (psql right-aligns them); every
    other column is ``text``. Values are sent in text format.
    """
    table = list(rows)
    for number, row in enumerate(table):
        if len(row) != len(columns):
            raise ValueError(f"row {number} has {len(row)} values for {len(columns)} columns")
    oids = [_column_type(table, index) for index in range(len(columns))]
    parts = [row_description(columns, oids)]
    parts.extend(data_row(row) for row in table)
    parts.append(command_complete(command_tag))
    return b"".join(parts)


# -- frontend messages ---------------------------------------------------------------


def startup_message(params: Mapping[str, str], *, protocol: int = PROTOCOL_VERSION) -> bytes:
    """StartupMessage with these parameters; ``user`` is required."""
    if not params.get("user"):
        raise ValueError("a StartupMessage needs a non-empty 'user' parameter")
    if "" in params:
        raise ValueError("a startup parameter name cannot be empty")
    pairs = b"".join(cstring(key) + cstring(value) for key, value in params.items())
    return _untyped(_I32.pack(protocol) + pairs + b"\0")


def ssl_request() -> bytes:
    """SSLRequest: ask the server to switch to TLS before the startup message."""
    return _untyped(_I32.pack(SSL_REQUEST_CODE))


def gssenc_request() -> bytes:
    """GSSENCRequest: ask the server for GSSAPI encryption."""
    return _untyped(_I32.pack(GSSENC_REQUEST_CODE))


def cancel_request(pid: int, key: int | bytes) -> bytes:
    """CancelRequest for the backend with this pid and cancel key (from BackendKeyData)."""
    return _untyped(_TWO_I32.pack(CANCEL_REQUEST_CODE, pid) + _cancel_secret(key))


def query(text: str) -> bytes:
    """Query: a simple-protocol query string."""
    return frame(QUERY, cstring(text))


def terminate() -> bytes:
    """Terminate: the client is leaving."""
    return frame(TERMINATE)


def sync() -> bytes:
    """Sync: end of an extended-protocol batch; the server answers ReadyForQuery."""
    return frame(SYNC)


def flush() -> bytes:
    """Flush: ask the server to send what it has buffered."""
    return frame(FLUSH)


def password_message(password: str | bytes) -> bytes:
    """PasswordMessage: a clear-text password or an ``md5...`` hash."""
    raw = cstring(password) if isinstance(password, str) else bytes(password) + b"\0"
    if b"\0" in raw[:-1]:
        raise ValueError("a password cannot contain a NUL byte")
    return frame(PASSWORD_MESSAGE, raw)


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    """SASLInitialResponse: the chosen mechanism and the client-first message."""
    body = b"" if data is None else bytes(data)
    length = -1 if data is None else len(body)
    return frame(SASL_INITIAL_RESPONSE, cstring(mechanism) + _I32.pack(length) + body)


def sasl_response(data: bytes) -> bytes:
    """SASLResponse: a later client message in the SASL exchange."""
    return frame(SASL_RESPONSE, bytes(data))


def parse(statement: str, query_text: str, param_types: Sequence[int] = ()) -> bytes:
    """Parse: prepare ``query_text`` as ``statement`` ("" is the unnamed statement)."""
    oids = b"".join(_U32.pack(oid) for oid in param_types)
    body = cstring(statement) + cstring(query_text) + _I16.pack(len(param_types)) + oids
    return frame(PARSE, body)


def _int16_list(values: Sequence[int]) -> bytes:
    return _I16.pack(len(values)) + b"".join(_I16.pack(value) for value in values)


def bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | None] = (),
    *,
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    """Bind ``params`` (already encoded; ``None`` is NULL) to a prepared statement."""
    values = [_NULL_VALUE if v is None else _I32.pack(len(v)) + bytes(v) for v in params]
    body = (
        cstring(portal)
        + cstring(statement)
        + _int16_list(param_formats)
        + _I16.pack(len(params))
        + b"".join(values)
        + _int16_list(result_formats)
    )
    return frame(BIND, body)


def _target(kind: bytes, name: str) -> bytes:
    if kind not in (TARGET_STATEMENT, TARGET_PORTAL):
        raise ValueError(f"target kind must be b'S' (statement) or b'P' (portal), got {kind!r}")
    return bytes(kind) + cstring(name)


def describe(kind: bytes, name: str) -> bytes:
    """Describe a statement (``b"S"``) or portal (``b"P"``)."""
    return frame(DESCRIBE, _target(kind, name))


def close(kind: bytes, name: str) -> bytes:
    """Close a statement (``b"S"``) or portal (``b"P"``)."""
    return frame(CLOSE, _target(kind, name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    """Execute a portal, returning at most ``max_rows`` rows (0 means all)."""
    return frame(EXECUTE, cstring(portal) + _I32.pack(max_rows))
