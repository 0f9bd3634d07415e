"""Property tests: framing is independent of chunking; bad bytes only ever raise ProtocolError."""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from millpond.errors import ProtocolError
from millpond.proxy.protocol import (
    MessageReader,
    StartupMessage,
    StartupReader,
    decode_startup_packet,
)
from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol import parsers as p
from tests.unit.proxy.canned import backend_stream, frontend_stream

CANNED = backend_stream() + frontend_stream()
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

type_bytes = st.integers(0, 255).map(lambda value: bytes((value,)))
# ReadyForQuery ('Z') is the one type a scan looks inside, so random ones must be valid.
random_message = st.builds(
    lambda kind, body: (kind, body),
    type_bytes.filter(lambda kind: kind != b"Z"),
    st.binary(max_size=200),
)
canned_message = st.sampled_from(CANNED).map(lambda raw: (raw[:1], raw[5:]))
message_lists = st.lists(st.one_of(random_message, canned_message), max_size=25)
no_nul_text = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=30
)


def chunked(data: st.DataObject, stream: bytes) -> list[bytes]:
    """Cut ``stream`` at a drawn set of positions."""
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12).map(sorted))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def encode(messages: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(m.frame(kind, body) for kind, body in messages)


@SETTINGS
@given(messages=message_lists, data=st.data())
def test_any_chunking_decodes_to_the_same_messages(
    messages: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    reader = MessageReader()
    got = []
    for chunk in chunked(data, encode(messages)):
        reader.feed(chunk)
        got += [(message.type, bytes(message.payload)) for message in reader]
    assert got == messages
    assert reader.buffered == 0


@SETTINGS
@given(messages=message_lists, stop=st.binary(max_size=3), data=st.data())
def test_any_chunking_forwards_the_same_bytes(
    messages: list[tuple[bytes, bytes]], stop: bytes, data: st.DataObject
) -> None:
    stream = encode(messages)
    reader = MessageReader()
    out, types = bytearray(), bytearray()
    for chunk in chunked(data, stream):
        reader.feed(chunk)
        while True:
            found = reader.scan(stop)
            if not found.length:
                break
            assert found.types[:-1].translate(None, stop) == found.types[:-1]
            out += reader.take(found.length)
            types += found.types
    assert bytes(out) == stream
    assert bytes(types) == b"".join(kind for kind, _ in messages)


@SETTINGS
@given(messages=message_lists, data=st.data())
def test_interleaving_both_paths(messages: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    reader = MessageReader()
    got = []
    for chunk in chunked(data, encode(messages)):
        reader.feed(chunk)
        while True:
            if data.draw(st.booleans()):
                message = reader.next_message()
                if message is None:
                    break
                got.append((message.type, bytes(message.payload)))
                continue
            found = reader.scan()
            if not found.length:
                break
            span = bytes(reader.take(found.length))
            inner = MessageReader()
            inner.feed(span)
            got += [(message.type, bytes(message.payload)) for message in inner]
    assert got == messages


def mutate(data: st.DataObject, stream: bytes) -> bytes:
    """Overwrite, drop or insert a few bytes of an otherwise valid stream."""
    raw = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["set", "delete", "insert"]))
        value = data.draw(st.integers(0, 255))
        if action == "insert" or position == len(raw):
            raw.insert(position, value)
        elif action == "set":
            raw[position] = value
        else:
            del raw[position]
    return bytes(raw)


garbage_sources = st.one_of(
    st.binary(max_size=400).map(lambda raw: ("random", raw)),
    message_lists.map(lambda messages: ("mutated", encode(messages))),
)


def pending_length(reader: MessageReader) -> int | None:
    """The declared length of the incomplete message the reader is waiting on, if any."""
    reader.take(reader.scan().length)
    if reader.buffered < 5:
        return None
    header = bytes(reader.take(reader.buffered))[:5]
    length: int = struct.unpack("!I", header[1:])[0]
    return length


@SETTINGS
@given(source=garbage_sources, limit=st.integers(4, 2000), data=st.data())
def test_garbage_only_ever_raises_protocol_error(
    source: tuple[str, bytes], limit: int, data: st.DataObject
) -> None:
    kind, stream = source
    if kind == "mutated":
        stream = mutate(data, stream)
    reader = MessageReader(max_message_length=limit)
    try:
        for chunk in chunked(data, stream):
            reader.feed(chunk)
            while data.draw(st.booleans()) and reader.next_message() is not None:
                pass
            while reader.read_span(data.draw(st.sampled_from([b"", b"Z", b"QX"]))) is not None:
                pass
    except ProtocolError:
        return
    assert reader.buffered <= len(stream)
    length = pending_length(reader)
    assert length is None or 4 <= length <= limit


@SETTINGS
@given(source=garbage_sources, limit=st.integers(8, 3000), data=st.data())
def test_startup_garbage_only_ever_raises_protocol_error(
    source: tuple[str, bytes], limit: int, data: st.DataObject
) -> None:
    kind, stream = source
    if kind == "mutated":
        stream = mutate(data, m.startup_message({"user": "u", "database": "d"}) + stream)
    reader = StartupReader(max_packet_length=limit)
    try:
        for chunk in chunked(data, stream):
            reader.feed(chunk)
            while reader.next_packet() is not None:
                pass
    except ProtocolError:
        return
    if reader.buffered >= 4:
        declared = struct.unpack("!I", reader.take_rest()[:4])[0]
        assert 8 <= declared <= limit


DECODERS: list[Callable[[bytes], object]] = [
    p.decode_error_response,
    p.decode_parameter_status,
    p.decode_backend_key_data,
    p.decode_ready_for_query,
    p.decode_authentication,
    p.decode_command_complete,
    p.decode_row_description,
    p.decode_data_row,
    p.decode_negotiate_protocol_version,
    p.decode_password_message,
    p.decode_sasl_initial_response,
    p.decode_sasl_response,
    p.decode_query,
    p.decode_parse,
    p.decode_bind,
    p.decode_describe,
    p.decode_close,
    p.decode_execute,
    decode_startup_packet,
]


@SETTINGS
@given(
    decoder=st.sampled_from(DECODERS),
    raw=st.one_of(st.binary(max_size=300), canned_message.map(lambda message: message[1])),
    data=st.data(),
)
def test_decoders_on_garbage_only_raise_protocol_error(
    decoder: Callable[[bytes], object], raw: bytes, data: st.DataObject
) -> None:
    if raw and data.draw(st.booleans()):
        raw = mutate(data, raw)
    with contextlib.suppress(ProtocolError):
        decoder(raw)


# -- builder/decoder round trips -----------------------------------------------------


@given(raw=st.binary(max_size=60).map(lambda raw: raw.replace(b"\x00", b"")))
def test_any_bytes_survive_a_text_round_trip(raw: bytes) -> None:
    assert m.cstring(p.decode_text(raw)) == raw + b"\x00"


@given(values=st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=20))
def test_data_row_round_trip(values: list[bytes | None]) -> None:
    assert p.decode_data_row(m.data_row(values)[5:]).values == tuple(values)


@given(
    statement=no_nul_text,
    text=no_nul_text,
    oids=st.lists(st.integers(0, 2**32 - 1), max_size=10),
)
def test_parse_round_trip(statement: str, text: str, oids: list[int]) -> None:
    assert p.decode_parse(m.parse(statement, text, oids)[5:]) == p.Parse(
        statement, text, tuple(oids)
    )


@given(
    portal=no_nul_text,
    statement=no_nul_text,
    params=st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=8),
    formats=st.lists(st.integers(0, 1), max_size=8),
    rename=no_nul_text,
)
def test_bind_round_trip_and_rename(
    portal: str,
    statement: str,
    params: list[bytes | None],
    formats: list[int],
    rename: str,
) -> None:
    built = m.bind(portal, statement, params, param_formats=formats, result_formats=formats)
    decoded = p.decode_bind(built[5:])
    assert (decoded.portal, decoded.statement, decoded.payload) == (portal, statement, built[5:])
    assert decoded.renamed(rename) == m.bind(
        portal, rename, params, param_formats=formats, result_formats=formats
    )


@given(
    severity=no_nul_text,
    code=st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5),
    message=no_nul_text,
    detail=st.none() | no_nul_text,
    hint=st.none() | no_nul_text,
)
def test_error_response_round_trip(
    severity: str, code: str, message: str, detail: str | None, hint: str | None
) -> None:
    built = m.error_response(severity, code, message, detail=detail, hint=hint)
    decoded = p.decode_error_response(built[5:])
    assert decoded.code == code
    assert decoded.message == message
    assert (decoded.detail, decoded.hint) == (detail, hint)
    assert decoded.fields["S"] == decoded.fields["V"] == severity


@given(
    params=st.dictionaries(no_nul_text.filter(bool), no_nul_text, max_size=8),
    user=no_nul_text.filter(bool),
)
def test_startup_message_round_trip(params: dict[str, str], user: str) -> None:
    params["user"] = user
    reader = StartupReader(max_packet_length=100_000)
    reader.feed(m.startup_message(params))
    packet = reader.next_packet()
    assert packet == StartupMessage(m.PROTOCOL_VERSION, params)
    assert reader.buffered == 0


def _startup_outcomes(reader: StartupReader, chunks: list[bytes], fast: bool) -> list[object]:
    """Every packet (or the ProtocolError) a reader yields for these chunks, then what
    it still buffers."""
    out: list[object] = []
    try:
        for chunk in chunks:
            packet = reader.read(chunk) if fast else (reader.feed(chunk), reader.next_packet())[1]
            while packet is not None:
                out.append(packet)
                packet = reader.next_packet()
    except ProtocolError as exc:
        out.append(f"error: {exc}")
    return [*out, reader.take_rest()]


@SETTINGS
@given(source=garbage_sources, limit=st.integers(8, 3000), data=st.data())
def test_startup_read_agrees_with_feed_and_next_packet(
    source: tuple[str, bytes], limit: int, data: st.DataObject
) -> None:
    """StartupReader.read's no-buffer shortcut changes nothing a client can see: same
    packets, same errors, same leftovers as feed() + next_packet(), on any chunking of
    valid, random or mutated streams (SSLRequest then a StartupMessage included)."""
    kind, stream = source
    packets = [m.ssl_request(), m.startup_message({"user": "u", "database": "d"})]
    if kind == "mutated":
        chunks = chunked(data, mutate(data, b"".join(packets) + stream))
    elif data.draw(st.booleans()):  # a real login, one packet per read, then some more
        chunks = [*packets, *chunked(data, stream[: data.draw(st.integers(0, 20))])]
    else:
        chunks = chunked(data, stream)
    fast = _startup_outcomes(StartupReader(max_packet_length=limit), chunks, True)
    slow = _startup_outcomes(StartupReader(max_packet_length=limit), chunks, False)
    assert fast == slow


@given(names=st.lists(no_nul_text, max_size=10))
def test_row_description_round_trip(names: list[str]) -> None:
    assert p.decode_row_description(m.row_description(names)[5:]).names == tuple(names)
