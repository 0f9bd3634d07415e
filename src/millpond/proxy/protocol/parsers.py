"""Decoders for the PostgreSQL v3 messages the proxy has to look inside.

Each ``decode_*`` function takes a message *payload* (the bytes after the 5-byte
header, e.g. :attr:`millpond.proxy.protocol.codec.Message.payload`) and returns a small
frozen dataclass. A payload that does not match the message's layout (too short, a
string without its NUL, a count that overruns, bytes left over at the end) raises
:class:`~millpond.errors.ProtocolError` naming the message and the rule broken.

Strings are decoded as UTF-8 with ``surrogateescape``: any bytes are accepted and
re-encode to exactly the same bytes in :mod:`millpond.proxy.protocol.messages`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from millpond.errors import ProtocolError
from millpond.proxy.protocol.messages import (
    BIND,
    MAX_CANCEL_KEY_LENGTH,
    MIN_CANCEL_KEY_LENGTH,
    TARGET_PORTAL,
    TARGET_STATEMENT,
    TX_STATUSES,
    AuthCode,
    cstring,
    frame,
)

Payload = bytes | bytearray | memoryview
"""Anything a decoder accepts as a payload."""

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_COLUMN = struct.Struct("!IhIhih")


def decode_text(raw: bytes) -> str:
    """Decode protocol text losslessly (UTF-8, undecodable bytes kept as surrogates)."""
    return raw.decode("utf-8", "surrogateescape")


class _Cursor:
    """Reads fields off a payload front to back, raising ProtocolError on overrun."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, payload: Payload, what: str) -> None:
        self._data = bytes(payload)
        self._pos = 0
        self._what = what

    def fail(self, problem: str) -> ProtocolError:
        return ProtocolError(f"malformed {self._what} message: {problem}")

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def raw(self, size: int) -> bytes:
        if size > self.remaining:
            left = self.remaining
            raise self.fail(f"needs {size} more byte(s) at offset {self._pos}, has {left}")
        start = self._pos
        self._pos += size
        return self._data[start : self._pos]

    def int16(self) -> int:
        value: int = _I16.unpack(self.raw(2))[0]
        return value

    def int32(self) -> int:
        value: int = _I32.unpack(self.raw(4))[0]
        return value

    def uint32(self) -> int:
        value: int = _U32.unpack(self.raw(4))[0]
        return value

    def count(self, what: str, item_size: int) -> int:
        """An Int16 item count, checked against the bytes left (each item >= item_size)."""
        number = self.int16()
        if number < 0 or number * item_size > self.remaining:
            raise self.fail(f"{what} count {number} does not fit in {self.remaining} bytes")
        return number

    def cstring(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise self.fail(f"string at offset {self._pos} has no NUL terminator")
        text = decode_text(self._data[self._pos : end])
        self._pos = end + 1
        return text

    def rest(self) -> bytes:
        return self.raw(self.remaining)

    def done(self) -> None:
        if self.remaining:
            raise self.fail(f"{self.remaining} unexpected byte(s) after the last field")


# -- backend messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """The fields of an ErrorResponse or NoticeResponse, keyed by field code.

    Field codes are single letters: ``S``/``V`` severity (localized / not),
    ``C`` SQLSTATE, ``M`` message, ``D`` detail, ``H`` hint, and so on.
    """

    fields: Mapping[str, str]

    @property
    def severity(self) -> str:
        """The non-localized severity ('V') when sent, else the localized one ('S')."""
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def code(self) -> str:
        """The SQLSTATE, e.g. ``08P01``."""
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


def decode_error_response(payload: Payload) -> ErrorResponse:
    """Decode ErrorResponse ('E') or NoticeResponse ('N') fields."""
    cursor = _Cursor(payload, "ErrorResponse/NoticeResponse")
    fields: dict[str, str] = {}
    while (code := cursor.raw(1)) != b"\0":
        fields[code.decode("latin-1")] = cursor.cstring()
    cursor.done()
    return ErrorResponse(MappingProxyType(fields))


decode_notice_response = decode_error_response


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    """A run-time parameter the server reports, e.g. ``client_encoding``."""

    name: str
    value: str


def decode_parameter_status(payload: Payload) -> ParameterStatus:
    """Decode ParameterStatus ('S' from the server)."""
    cursor = _Cursor(payload, "ParameterStatus")
    result = ParameterStatus(cursor.cstring(), cursor.cstring())
    cursor.done()
    return result


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """The backend's pid and cancel secret (4 bytes in 3.0, up to 256 in 3.2)."""

    pid: int
    secret: bytes

    @property
    def key(self) -> int:
        """The secret as an unsigned big-endian integer (the Int32 key in 3.0)."""
        return int.from_bytes(self.secret, "big")


def _check_cancel_secret(cursor: _Cursor, secret: bytes) -> None:
    if not MIN_CANCEL_KEY_LENGTH <= len(secret) <= MAX_CANCEL_KEY_LENGTH:
        raise cursor.fail(f"cancel key is {len(secret)} bytes, must be 4 to 256")


def decode_backend_key_data(payload: Payload) -> BackendKeyData:
    """Decode BackendKeyData ('K')."""
    cursor = _Cursor(payload, "BackendKeyData")
    pid = cursor.int32()
    secret = cursor.rest()
    _check_cancel_secret(cursor, secret)
    return BackendKeyData(pid, secret)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    """The server is idle; ``status`` is ``b"I"``, ``b"T"`` or ``b"E"``."""

    status: bytes


def decode_ready_for_query(payload: Payload) -> ReadyForQuery:
    """Decode ReadyForQuery ('Z')."""
    cursor = _Cursor(payload, "ReadyForQuery")
    status = cursor.raw(1)
    cursor.done()
    if status not in TX_STATUSES:
        raise cursor.fail(f"unknown transaction status {status!r}")
    return ReadyForQuery(status)


@dataclass(frozen=True, slots=True)
class Authentication:
    """An Authentication ('R') request.

    ``salt`` is set for MD5; ``mechanisms`` for SASL; ``data`` for SASLContinue,
    SASLFinal and GSSContinue. The other codes carry nothing.
    """

    code: AuthCode
    salt: bytes = b""
    mechanisms: tuple[str, ...] = ()
    data: bytes = b""


def _sasl_mechanisms(cursor: _Cursor) -> tuple[str, ...]:
    names: list[str] = []
    while name := cursor.cstring():
        names.append(name)
    if not names:
        raise cursor.fail("AuthenticationSASL lists no mechanisms")
    return tuple(names)


def decode_authentication(payload: Payload) -> Authentication:
    """Decode any Authentication ('R') request, checking the layout of its subcode."""
    cursor = _Cursor(payload, "Authentication")
    number = cursor.int32()
    try:
        code = AuthCode(number)
    except ValueError:
        raise cursor.fail(f"unknown authentication request code {number}") from None
    result = Authentication(code)
    if code is AuthCode.MD5_PASSWORD:
        result = Authentication(code, salt=cursor.raw(4))
    elif code is AuthCode.SASL:
        result = Authentication(code, mechanisms=_sasl_mechanisms(cursor))
    elif code in (AuthCode.SASL_CONTINUE, AuthCode.SASL_FINAL, AuthCode.GSS_CONTINUE):
        result = Authentication(code, data=cursor.rest())
    cursor.done()
    return result


@dataclass(frozen=True, slots=True)
class CommandComplete:
    """The command tag ending a statement's result, e.g. ``INSERT 0 3``."""

    tag: str

    @property
    def command(self) -> str:
        """The tag's command words without the row count, e.g. ``INSERT``."""
        words = self.tag.split()
        while words and words[-1].isdigit():
            words.pop()
        return " ".join(words)

    @property
    def rows(self) -> int | None:
        """The row count at the end of the tag, if there is one."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if " " in self.tag and last.isdigit() else None


def decode_command_complete(payload: Payload) -> CommandComplete:
    """Decode CommandComplete ('C' from the server)."""
    cursor = _Cursor(payload, "CommandComplete")
    result = CommandComplete(cursor.cstring())
    cursor.done()
    return result


@dataclass(frozen=True, slots=True)
class Column:
    """One field of a RowDescription."""

    name: str
    table_oid: int
    column_number: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription:
    """The columns of the rows that follow."""

    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)


def decode_row_description(payload: Payload) -> RowDescription:
    """Decode RowDescription ('T')."""
    cursor = _Cursor(payload, "RowDescription")
    columns = []
    for _ in range(cursor.count("column", _COLUMN.size + 1)):
        name = cursor.cstring()
        columns.append(Column(name, *_COLUMN.unpack(cursor.raw(_COLUMN.size))))
    cursor.done()
    return RowDescription(tuple(columns))


@dataclass(frozen=True, slots=True)
class DataRow:
    """One row's values as raw bytes; ``None`` is SQL NULL."""

    values: tuple[bytes | None, ...]


def _value(cursor: _Cursor) -> bytes | None:
    size = cursor.int32()
    if size < -1:
        raise cursor.fail(f"value length {size} is negative (only -1, NULL, is allowed)")
    return None if size == -1 else cursor.raw(size)


def decode_data_row(payload: Payload) -> DataRow:
    """Decode DataRow ('D' from the server)."""
    cursor = _Cursor(payload, "DataRow")
    values = tuple(_value(cursor) for _ in range(cursor.count("value", 4)))
    cursor.done()
    return DataRow(values)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """The server's newest supported minor version and the options it ignored."""

    newest_minor: int
    unrecognized: tuple[str, ...]


def decode_negotiate_protocol_version(payload: Payload) -> NegotiateProtocolVersion:
    """Decode NegotiateProtocolVersion ('v')."""
    cursor = _Cursor(payload, "NegotiateProtocolVersion")
    newest_minor = cursor.int32()
    number = cursor.int32()
    if number < 0 or number > cursor.remaining:
        raise cursor.fail(f"option count {number} does not fit in {cursor.remaining} bytes")
    names = tuple(cursor.cstring() for _ in range(number))
    cursor.done()
    return NegotiateProtocolVersion(newest_minor, names)


# -- frontend messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """A clear-text password or an ``md5``-prefixed hash."""

    password: str


def decode_password_message(payload: Payload) -> PasswordMessage:
    """Decode PasswordMessage ('p' answering a cleartext or MD5 request)."""
    cursor = _Cursor(payload, "PasswordMessage")
    result = PasswordMessage(cursor.cstring())
    cursor.done()
    return result


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """The mechanism the client picked and its first message (``None``: none sent)."""

    mechanism: str
    data: bytes | None


def decode_sasl_initial_response(payload: Payload) -> SASLInitialResponse:
    """Decode SASLInitialResponse ('p' answering AuthenticationSASL)."""
    cursor = _Cursor(payload, "SASLInitialResponse")
    mechanism = cursor.cstring()
    data = _value(cursor)
    cursor.done()
    return SASLInitialResponse(mechanism, data)


@dataclass(frozen=True, slots=True)
class SASLResponse:
    """A later client message of the SASL exchange."""

    data: bytes


def decode_sasl_response(payload: Payload) -> SASLResponse:
    """Decode SASLResponse ('p' answering AuthenticationSASLContinue)."""
    return SASLResponse(bytes(payload))


@dataclass(frozen=True, slots=True)
class Query:
    """A simple-protocol query string."""

    text: str


def decode_query(payload: Payload) -> Query:
    """Decode Query ('Q')."""
    cursor = _Cursor(payload, "Query")
    result = Query(cursor.cstring())
    cursor.done()
    return result


@dataclass(frozen=True, slots=True)
class Parse:
    """Parse: prepare ``query`` as ``statement`` with these parameter type oids."""

    statement: str
    query: str
    param_types: tuple[int, ...]


def decode_parse(payload: Payload) -> Parse:
    """Decode Parse ('P')."""
    cursor = _Cursor(payload, "Parse")
    statement, text = cursor.cstring(), cursor.cstring()
    oids = tuple(cursor.uint32() for _ in range(cursor.count("parameter type", 4)))
    cursor.done()
    return Parse(statement, text, oids)


@dataclass(frozen=True, slots=True)
class Bind:
    """Bind's portal and statement names, with the raw payload kept for forwarding."""

    portal: str
    statement: str
    payload: bytes

    @property
    def tail(self) -> bytes:
        """The payload after the two names: formats, parameter values, result formats."""
        return self.payload[len(cstring(self.portal)) + len(cstring(self.statement)) :]

    def renamed(self, statement: str) -> bytes:
        """The whole Bind message again, bound to ``statement`` instead."""
        return frame(BIND, cstring(self.portal) + cstring(statement) + self.tail)


def _int16_list(cursor: _Cursor, what: str) -> None:
    cursor.raw(2 * cursor.count(what, 2))


def decode_bind(payload: Payload) -> Bind:
    """Decode Bind ('B'), checking the whole layout but keeping values undecoded."""
    cursor = _Cursor(payload, "Bind")
    portal, statement = cursor.cstring(), cursor.cstring()
    _int16_list(cursor, "parameter format")
    for _ in range(cursor.count("parameter", 4)):
        _value(cursor)
    _int16_list(cursor, "result format")
    cursor.done()
    return Bind(portal, statement, bytes(payload))


@dataclass(frozen=True, slots=True)
class Describe:
    """Describe a statement (``kind == b"S"``) or a portal (``b"P"``)."""

    kind: bytes
    name: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close a statement (``kind == b"S"``) or a portal (``b"P"``)."""

    kind: bytes
    name: str


def _target(payload: Payload, what: str) -> tuple[bytes, str]:
    cursor = _Cursor(payload, what)
    kind = cursor.raw(1)
    if kind not in (TARGET_STATEMENT, TARGET_PORTAL):
        raise cursor.fail(f"target kind {kind!r} is neither b'S' nor b'P'")
    name = cursor.cstring()
    cursor.done()
    return kind, name


def decode_describe(payload: Payload) -> Describe:
    """Decode Describe ('D' from the client)."""
    return Describe(*_target(payload, "Describe"))


def decode_close(payload: Payload) -> Close:
    """Decode Close ('C' from the client)."""
    return Close(*_target(payload, "Close"))


@dataclass(frozen=True, slots=True)
class Execute:
    """Execute a portal, returning at most ``max_rows`` rows (0: all)."""

    portal: str
    max_rows: int


def decode_execute(payload: Payload) -> Execute:
    """Decode Execute ('E' from the client)."""
    cursor = _Cursor(payload, "Execute")
    result = Execute(cursor.cstring(), cursor.int32())
    cursor.done()
    return result
