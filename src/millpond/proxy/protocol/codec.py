"""Incremental, sans-I/O framing of the PostgreSQL v3 byte stream.

Nothing here touches a socket: you :meth:`~MessageReader.feed` whatever bytes arrived
and ask for complete messages. A partial header or payload simply waits for more.

Two ways to read a typed stream with :class:`MessageReader`:

* the forwarding path, :meth:`~MessageReader.scan` / :meth:`~MessageReader.take`
  (or :meth:`~MessageReader.read_span`): walk the 5-byte headers only and hand back
  a span of whole messages as one immutable buffer, plus the type bytes seen and the
  status of the last ReadyForQuery, without building an object per message;
* the inspecting path, :meth:`~MessageReader.next_message` (or iteration): one
  :class:`Message` at a time, its payload a zero-copy view, for the parsers in
  :mod:`millpond.proxy.protocol.parsers`.

:class:`StartupReader` frames the first, untyped packet of a client connection
(StartupMessage, SSLRequest, GSSENCRequest or CancelRequest).

Every length field is checked as soon as its header is complete, so a peer declaring
a huge message is refused before its payload is buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from millpond.errors import ProtocolError
from millpond.proxy.protocol.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_CANCEL_KEY_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_STARTUP_PACKET_LENGTH,
    MIN_CANCEL_KEY_LENGTH,
    READY_FOR_QUERY,
    SSL_REQUEST_CODE,
    TX_STATUSES,
)
from millpond.proxy.protocol.parsers import Payload, decode_text

_TYPE_BYTES = tuple(bytes((value,)) for value in range(256))
_LENGTH = struct.Struct("!I")
_CODE_AND_PID = struct.Struct("!Ii")
_HEADER_SIZE = 5
_READY = READY_FOR_QUERY[0]
_COMPACT_AT = 64 * 1024
"""Consumed bytes at the front of a bytearray buffer before it is compacted."""
_JOIN_LIMIT = 64 * 1024
"""A leftover fragment up to this size is joined with new data into immutable bytes;
a longer one (a large message arriving piecemeal) grows a bytearray instead."""
_LARGEST_LIMIT = 0x7FFFFFFF


class Message(NamedTuple):
    """One complete message: its type byte and the whole message, header included.

    ``data`` is a read-only view over immutable bytes, so it stays valid after more
    data is fed and can be forwarded as is.
    """

    type: bytes
    data: memoryview

    @property
    def payload(self) -> memoryview:
        """The message body after the type byte and the Int32 length."""
        return self.data[_HEADER_SIZE:]

    def __repr__(self) -> str:
        return f"Message(type={self.type!r}, length={len(self.data) - 1})"


class Scan(NamedTuple):
    """What :meth:`MessageReader.scan` found at the front of the buffer.

    ``length``: bytes forming complete messages (0 if none is complete yet);
    ``types``: one type byte per message, in order (``b"Z" in scan.types`` works);
    ``last_offset``: where the last of those messages starts within the span;
    ``ready_status``: the status byte of the last ReadyForQuery in the span, if any.
    """

    length: int
    types: bytes
    last_offset: int
    ready_status: bytes | None


class Span(NamedTuple):
    """Complete messages taken by :meth:`MessageReader.read_span`, ready to forward."""

    data: bytes | memoryview
    types: bytes
    ready_status: bytes | None


def _bad_length(kind: int, length: int, limit: int) -> ProtocolError:
    name = _TYPE_BYTES[kind]
    if length < 4:
        return ProtocolError(
            f"message of type {name!r} declares length {length}: "
            "the length counts its own 4 bytes, so it must be at least 4"
        )
    return ProtocolError(
        f"message of type {name!r} declares length {length}, "
        f"over the limit of {limit} bytes (max_message_length)"
    )


def _walk(buf: bytes | bytearray, start: int, limit: int, stop: bytes) -> Scan:
    """Scan the complete messages of ``buf`` from ``start`` (see MessageReader.scan)."""
    end = len(buf)
    last_header = end - _HEADER_SIZE
    pos = last = start
    ready = -1
    types = bytearray()
    append, unpack = types.append, _LENGTH.unpack_from
    while pos <= last_header:
        length: int = unpack(buf, pos + 1)[0]
        if not 4 <= length <= limit:
            raise _bad_length(buf[pos], length, limit)
        if pos + 1 + length > end:
            break
        kind = buf[pos]
        append(kind)
        if kind == _READY:
            ready = pos
        last = pos
        pos += 1 + length
        if kind in stop:
            break
    status = _ready_status(buf, ready) if ready >= 0 else None
    return Scan(pos - start, bytes(types), last - start, status)


def _ready_status(buf: bytes | bytearray, offset: int) -> bytes:
    length: int = _LENGTH.unpack_from(buf, offset + 1)[0]
    status = _TYPE_BYTES[buf[offset + _HEADER_SIZE]] if length == 5 else b""
    if not status or status not in TX_STATUSES:
        raise ProtocolError(
            f"malformed ReadyForQuery (type b'Z'): length {length}, status {status!r}; "
            "it must have length 5 and a status of b'I', b'T' or b'E'"
        )
    return status


def _whole(
    data: bytes | bytearray, limit: int, stop: bytes
) -> tuple[bytes, int, bytes | None] | None:
    """``(types, last_offset, ready_status)`` if ``data`` is whole messages, else None."""
    length, types, last, status = _walk(data, 0, limit, stop)
    return (types, last, status) if length == len(data) else None


def _names_statements(data: bytes) -> bool:
    """Does any of the whole client messages in ``data`` name a prepared statement
    (Parse, Bind, or a Describe/Close of a statement)? Not whole messages: True.

    The proxy forwards requests that name none untouched in transaction mode.
    """
    pos, end = 0, len(data)
    while pos + _HEADER_SIZE <= end:
        kind = data[pos]
        length: int = _LENGTH.unpack_from(data, pos + 1)[0]
        stop = pos + 1 + length
        if length < 4 or stop > end:
            return True
        if kind == 80:  # 'P': the statement name comes first
            if length < 5 or data[pos + 5] != 0:
                return True
        elif kind == 66:  # 'B': the portal name, then the statement name
            nul = data.find(b"\0", pos + 5, stop)
            if nul < 0 or nul + 1 >= stop or data[nul + 1] != 0:
                return True
        elif kind in (67, 68) and (length < 6 or (data[pos + 5] == 83 and data[pos + 6] != 0)):
            return True  # 'C', 'D': b'S' or b'P', then the name
        pos = stop
    return pos != end


#: The framing walk, whole and names_statements: compiled when millpond was built with a
#: C compiler (millpond.proxy.protocol._scan), else the Python versions above.
walk: Callable[[bytes | bytearray, int, int, bytes], tuple[int, bytes, int, bytes | None]]
whole: Callable[[bytes | bytearray, int, bytes], tuple[bytes, int, bytes | None] | None]
names_statements: Callable[[bytes], bool]
try:
    from millpond.proxy.protocol import _scan
except ImportError:  # pragma: no cover - a build without a C compiler
    walk, whole, names_statements = _walk, _whole, _names_statements
    COMPILED = False
else:
    _scan.set_error_factories(_bad_length, _ready_status)
    walk, whole, names_statements = _scan.walk, _scan.whole, _scan.names_statements
    COMPILED = True


class MessageReader:
    """Frames a typed PostgreSQL v3 stream (either direction) from fed bytes.

    Data is kept as immutable ``bytes`` while it arrives in whole messages or small
    fragments, so spans and messages are zero-copy views; a large message that
    arrives in pieces accumulates in a ``bytearray`` that is compacted as it drains.
    """

    __slots__ = ("_buf", "_limit", "_pos")

    def __init__(self, *, max_message_length: int = MAX_MESSAGE_LENGTH) -> None:
        if not 4 <= max_message_length <= _LARGEST_LIMIT:
            raise ValueError(f"max_message_length must be 4 to 2**31-1, got {max_message_length}")
        self._limit = max_message_length
        self._buf: bytes | bytearray = b""
        self._pos = 0

    def __repr__(self) -> str:
        return f"<MessageReader buffered={self.buffered} limit={self._limit}>"

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet taken."""
        return len(self._buf) - self._pos

    @property
    def max_message_length(self) -> int:
        return self._limit

    def feed(self, data: Payload) -> None:
        """Append received bytes; the caller may reuse its own buffer afterwards."""
        chunk = data if type(data) is bytes else bytes(data)
        if not chunk:
            return
        buf, pending = self._buf, self.buffered
        if not pending:
            self._buf = chunk
        elif pending <= _JOIN_LIMIT:
            with memoryview(buf) as view:
                self._buf = b"".join((view[self._pos :], chunk))
        elif isinstance(buf, bytearray):
            buf += chunk
            return
        else:
            grown = bytearray(memoryview(buf)[self._pos :])
            grown += chunk
            self._buf = grown
        self._pos = 0

    def scan(self, stop: bytes = b"") -> Scan:
        """Walk the headers of the complete messages at the front, consuming nothing.

        The walk ends at the first incomplete message, or right after the first
        message whose type byte is in ``stop`` (e.g. ``stop=b"Z"`` to end a span at
        ReadyForQuery). Raises :class:`ProtocolError` for a bad length field.
        """
        return Scan(*walk(self._buf, self._pos, self._limit, stop))

    def whole(self, data: bytes, stop: bytes = b"") -> tuple[bytes, int, bytes | None] | None:
        """The forwarding fast path: with nothing buffered and ``data`` made of whole
        messages, ``(types, last_offset, ready_status)`` as :meth:`scan` would find
        them (no copy, nothing kept); otherwise None, and the caller feeds ``data``."""
        if self._pos != len(self._buf):
            return None
        return whole(data, self._limit, stop)

    def take(self, size: int) -> bytes | memoryview:
        """Remove ``size`` bytes from the front and return them, immutable.

        The result is ``bytes`` or a read-only view over ``bytes``; either may be
        kept or handed to a transport without copying.
        """
        if not 0 <= size <= self.buffered:
            raise ValueError(f"cannot take {size} bytes, {self.buffered} are buffered")
        data = self._slice(size)
        self._advance(size)
        return data

    def read_span(self, stop: bytes = b"") -> Span | None:
        """:meth:`scan` then :meth:`take` the complete messages; ``None`` if there are none."""
        found = self.scan(stop)
        if not found.length:
            return None
        return Span(self.take(found.length), found.types, found.ready_status)

    def next_message(self) -> Message | None:
        """Take the next complete message, or return ``None`` if it has not all arrived."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _HEADER_SIZE:
            return None
        length: int = _LENGTH.unpack_from(buf, pos + 1)[0]
        if length < 4 or length > self._limit:
            raise _bad_length(buf[pos], length, self._limit)
        if pos + 1 + length > len(buf):
            return None
        kind = _TYPE_BYTES[buf[pos]]
        data = self._slice(1 + length)
        self._advance(1 + length)
        return Message(kind, data if type(data) is memoryview else memoryview(data))

    def __iter__(self) -> Iterator[Message]:
        """Yield complete messages until the buffer holds none."""
        while (message := self.next_message()) is not None:
            yield message

    def _slice(self, size: int) -> bytes | memoryview:
        buf, pos = self._buf, self._pos
        if isinstance(buf, bytes):
            return buf if pos == 0 and size == len(buf) else memoryview(buf)[pos : pos + size]
        with memoryview(buf) as view:
            return bytes(view[pos : pos + size])

    def _advance(self, size: int) -> None:
        self._pos += size
        if self._pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        elif isinstance(self._buf, bytearray) and self._pos >= max(
            _COMPACT_AT, len(self._buf) // 2
        ):
            del self._buf[: self._pos]
            self._pos = 0


# -- the startup phase ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks for TLS; answer with one byte, ``S`` or ``N``."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption; answer with one byte, ``G`` or ``N``."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Cancel the query running on the backend with this pid and cancel secret."""

    pid: int
    secret: bytes

    @property
    def key(self) -> int:
        """The secret as an unsigned big-endian integer (the Int32 key in 3.0)."""
        return int.from_bytes(self.secret, "big")


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The client's protocol version and connection parameters."""

    protocol: int
    params: Mapping[str, str]

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    @property
    def user(self) -> str:
        return self.params["user"]

    @property
    def database(self) -> str:
        """The ``database`` parameter, defaulting to the user name as PostgreSQL does."""
        return self.params.get("database") or self.user

    @property
    def protocol_options(self) -> tuple[str, ...]:
        """Names of ``_pq_.`` protocol extension options the client asked for."""
        return tuple(name for name in self.params if name.startswith("_pq_."))


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def _startup_params(data: bytes) -> dict[str, str]:
    """Decode the NUL-terminated name/value pairs ending with an empty name."""
    params: dict[str, str] = {}
    pos = 0
    while (end := data.find(b"\0", pos)) != pos:
        if end < 0:
            raise ProtocolError("startup packet's parameter list is not terminated by a NUL byte")
        name = decode_text(data[pos:end])
        pos, end = end + 1, data.find(b"\0", end + 1)
        if end < 0:
            raise ProtocolError(f"startup parameter {name!r} has no NUL-terminated value")
        params[name] = decode_text(data[pos:end])
        pos = end + 1
    if pos + 1 != len(data):
        extra = len(data) - pos - 1
        raise ProtocolError(f"startup packet has {extra} unexpected byte(s) after its parameters")
    return params


def _startup_message(protocol: int, data: bytes) -> StartupMessage:
    params = _startup_params(data)
    if not params.get("user"):
        raise ProtocolError("startup packet names no user: 'user' is missing or empty")
    return StartupMessage(protocol, MappingProxyType(params))


def _fixed_request(name: str, body: bytes) -> None:
    if len(body) != 4:
        raise ProtocolError(f"{name} must be 8 bytes long, got {len(body) + 4}")


def _cancel_request(body: bytes) -> CancelRequest:
    secret = body[8:]
    if not MIN_CANCEL_KEY_LENGTH <= len(secret) <= MAX_CANCEL_KEY_LENGTH:
        raise ProtocolError(
            f"CancelRequest is {len(body) + 4} bytes long; "
            "it must carry a pid and a 4 to 256 byte cancel key (16 to 268 bytes)"
        )
    pid: int = _CODE_AND_PID.unpack_from(body)[1]
    return CancelRequest(pid, secret)


def decode_startup_packet(body: Payload) -> StartupPacket:
    """Decode a startup packet's body: everything after its Int32 length field."""
    data = bytes(body)
    if len(data) < 4:
        raise ProtocolError(f"startup packet body is {len(data)} bytes, too short for a code")
    code = _LENGTH.unpack_from(data)[0]
    if code == SSL_REQUEST_CODE:
        _fixed_request("SSLRequest", data)
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        _fixed_request("GSSENCRequest", data)
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        return _cancel_request(data)
    major, minor = code >> 16, code & 0xFFFF
    if major == 1234:
        raise ProtocolError(f"unknown special request code 1234.{minor} in startup packet")
    if major != 3:
        raise ProtocolError(f"unsupported frontend protocol {major}.{minor}: only 3.x is served")
    return _startup_message(code, data[4:])


#: Recently decoded startup packets by their bytes (see StartupReader.read).
_STARTUPS: dict[bytes, StartupPacket] = {}
_STARTUPS_KEPT = 256


class StartupReader:
    """Frames the untyped first packet(s) of a client connection.

    A client may send SSLRequest or GSSENCRequest, read the one-byte answer, then
    send its StartupMessage, so one reader can return several packets in turn.
    After a StartupMessage, :meth:`take_rest` hands any bytes that followed it to a
    :class:`MessageReader`.
    """

    __slots__ = ("_buf", "_limit")

    def __init__(self, *, max_packet_length: int = MAX_STARTUP_PACKET_LENGTH) -> None:
        if not 8 <= max_packet_length <= _LARGEST_LIMIT:
            raise ValueError(f"max_packet_length must be 8 to 2**31-1, got {max_packet_length}")
        self._limit = max_packet_length
        self._buf = bytearray()

    def __repr__(self) -> str:
        return f"<StartupReader buffered={self.buffered} limit={self._limit}>"

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet decoded (non-zero after SSLRequest means a stuffed stream)."""
        return len(self._buf)

    def feed(self, data: Payload) -> None:
        """Append received bytes, refusing at once a packet whose length is out of range."""
        self._buf += data
        self._packet_length()

    def read(self, data: Payload) -> StartupPacket | None:
        """:meth:`feed` then :meth:`next_packet`, without buffering when ``data`` is
        exactly one packet and nothing waits before it (how clients send them).

        A packet read this way is remembered by its bytes (the packets are immutable),
        CancelRequests excepted (each is one of a kind): an application's connections
        send the same SSLRequest and StartupMessage every time, and a client that
        connects for each transaction (``pgbench -C``) would decode them each time.
        """
        if not self._buf and len(data) >= 8:
            known = _STARTUPS.get(data) if type(data) is bytes else None
            if known is not None and len(data) <= self._limit:
                return known
            length = _LENGTH.unpack_from(data)[0]
            if length == len(data) and length <= self._limit:
                packet = decode_startup_packet(data[4:])
                if type(packet) is not CancelRequest and type(data) is bytes:
                    if len(_STARTUPS) >= _STARTUPS_KEPT:
                        _STARTUPS.clear()
                    _STARTUPS[data] = packet
                return packet
        self.feed(data)
        return self.next_packet()

    def next_packet(self) -> StartupPacket | None:
        """Decode and remove the next complete packet, or return ``None`` for "need more"."""
        length = self._packet_length()
        if length is None or len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return decode_startup_packet(body)

    def take_rest(self) -> bytes:
        """Remove and return whatever is buffered beyond the packets decoded so far."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _packet_length(self) -> int | None:
        if len(self._buf) < 4:
            return None
        length: int = _LENGTH.unpack_from(self._buf)[0]
        if length < 8:
            raise ProtocolError(
                f"invalid startup packet length {length}: a length field and a code "
                "take 8 bytes, so it must be at least 8"
            )
        if length > self._limit:
            raise ProtocolError(
                f"startup packet length {length} is over the limit of {self._limit} bytes"
            )
        return length
