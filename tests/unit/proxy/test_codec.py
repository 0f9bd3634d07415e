"""Framing: the readers give the same messages however the bytes are chunked."""

from __future__ import annotations

import struct

import pytest

from millpond.errors import ProtocolError
from millpond.proxy.protocol import (
    CancelRequest,
    GSSENCRequest,
    Message,
    MessageReader,
    SSLRequest,
    StartupMessage,
    StartupReader,
    decode_startup_packet,
)
from millpond.proxy.protocol import messages as m
from tests.unit.proxy.canned import backend_stream, frontend_stream, split_messages

STREAMS = {"backend": b"".join(backend_stream()), "frontend": b"".join(frontend_stream())}


def drain(reader: MessageReader) -> list[tuple[bytes, bytes]]:
    return [(message.type, bytes(message.payload)) for message in reader]


def drain_spans(reader: MessageReader, stop: bytes = b"") -> tuple[bytes, bytes]:
    data, types = bytearray(), bytearray()
    while (span := reader.read_span(stop)) is not None:
        data += span.data
        types += span.types
    return bytes(data), bytes(types)


# -- MessageReader: chunking -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_split_at_every_position_gives_the_same_messages(name: str) -> None:
    stream = STREAMS[name]
    expected = split_messages(stream)
    for cut in range(len(stream) + 1):
        reader = MessageReader()
        reader.feed(stream[:cut])
        got = drain(reader)
        reader.feed(stream[cut:])
        got += drain(reader)
        assert got == expected, cut
        assert reader.buffered == 0


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_byte_by_byte_gives_the_same_messages(name: str) -> None:
    stream = STREAMS[name]
    reader = MessageReader()
    got = []
    for index in range(len(stream)):
        reader.feed(stream[index : index + 1])
        got += drain(reader)
    assert got == split_messages(stream)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_spans_at_every_split_rebuild_the_stream(name: str) -> None:
    stream = STREAMS[name]
    expected_types = b"".join(kind for kind, _ in split_messages(stream))
    for cut in range(len(stream) + 1):
        reader = MessageReader()
        reader.feed(stream[:cut])
        data, types = drain_spans(reader)
        reader.feed(stream[cut:])
        more_data, more_types = drain_spans(reader)
        assert (data + more_data, types + more_types) == (stream, expected_types), cut


def test_byte_by_byte_spans() -> None:
    stream = STREAMS["backend"]
    reader = MessageReader()
    data, types = bytearray(), bytearray()
    for index in range(len(stream)):
        reader.feed(memoryview(stream)[index : index + 1])
        chunk, kinds = drain_spans(reader, stop=b"Z")
        data += chunk
        types += kinds
    assert bytes(data) == stream
    assert bytes(types) == b"".join(kind for kind, _ in split_messages(stream))


def test_several_messages_in_one_chunk_come_out_in_order() -> None:
    reader = MessageReader()
    reader.feed(m.query("a") + m.query("b") + m.sync()[:3])
    assert drain(reader) == [(b"Q", b"a\x00"), (b"Q", b"b\x00")]
    assert reader.buffered == 3
    reader.feed(m.sync()[3:])
    assert drain(reader) == [(b"S", b"")]


def test_mixed_input_buffer_types() -> None:
    stream = STREAMS["frontend"]
    reader = MessageReader()
    reader.feed(bytearray(stream[:10]))
    reader.feed(memoryview(stream)[10:20])
    reader.feed(stream[20:])
    assert drain(reader) == split_messages(stream)


def test_feeding_copies_the_callers_buffer() -> None:
    reader = MessageReader()
    chunk = bytearray(m.query("SELECT 1"))
    reader.feed(chunk)
    chunk[5:8] = b"XXX"
    assert drain(reader) == [(b"Q", b"SELECT 1\x00")]


def test_empty_feed_is_harmless() -> None:
    reader = MessageReader()
    reader.feed(b"")
    reader.feed(memoryview(b""))
    assert reader.next_message() is None
    assert reader.scan() == (0, b"", 0, None)
    assert reader.read_span() is None


# -- MessageReader: the forwarding path ----------------------------------------------


def test_scan_reports_types_length_and_ready_status_without_consuming() -> None:
    reader = MessageReader()
    first = m.command_complete("SELECT 1") + m.ready_for_query(b"T")
    reader.feed(first + m.query("x")[:2])
    found = reader.scan()
    assert found.length == len(first)
    assert found.types == b"CZ"
    assert found.last_offset == len(m.command_complete("SELECT 1"))
    assert found.ready_status == b"T"
    assert reader.buffered == len(first) + 2
    assert reader.scan() == found


def test_scan_stops_after_a_stop_type() -> None:
    reader = MessageReader()
    one = m.data_row([b"1"]) + m.command_complete("SELECT 1") + m.ready_for_query()
    two = m.notice_response("NOTICE", "00000", "late") + m.ready_for_query(b"E")
    reader.feed(one + two)
    span = reader.read_span(stop=b"Z")
    assert span is not None
    assert (bytes(span.data), span.types, span.ready_status) == (one, b"DCZ", b"I")
    span = reader.read_span(stop=b"Z")
    assert span is not None
    assert (bytes(span.data), span.types, span.ready_status) == (two, b"NZ", b"E")
    assert reader.read_span(stop=b"Z") is None


def test_scan_last_offset_lets_the_caller_intercept_a_message() -> None:
    reader = MessageReader()
    before = m.parse("", "SELECT 1") + m.bind("", "")
    reader.feed(before + m.terminate() + m.query("after"))
    found = reader.scan(stop=b"X")
    assert found.types == b"PBX"
    assert bytes(reader.take(found.last_offset)) == before
    intercepted = reader.next_message()
    assert intercepted is not None
    assert intercepted.type == m.TERMINATE
    assert drain(reader) == [(b"Q", b"after\x00")]


def test_take_returns_immutable_data_and_bounds_are_checked() -> None:
    reader = MessageReader()
    reader.feed(m.sync() + m.flush())
    with pytest.raises(ValueError, match="cannot take 11 bytes"):
        reader.take(11)
    with pytest.raises(ValueError, match="cannot take -1 bytes"):
        reader.take(-1)
    first = reader.take(5)
    assert isinstance(first, bytes | memoryview)
    if isinstance(first, memoryview):
        assert first.readonly
    assert bytes(first) == m.sync()
    assert bytes(reader.take(5)) == m.flush()
    assert bytes(reader.take(0)) == b""


def test_whole_chunk_span_is_forwarded_without_copying() -> None:
    reader = MessageReader()
    chunk = m.command_complete("SELECT 1") + m.ready_for_query()
    reader.feed(chunk)
    span = reader.read_span()
    assert span is not None
    assert span.data is chunk


def test_messages_stay_valid_after_more_data_is_fed() -> None:
    reader = MessageReader()
    reader.feed(m.query("first") + m.query("sec"))
    message = reader.next_message()
    assert message is not None
    reader.feed(m.query("third") * 2000)
    assert len(drain(reader)) == 2001
    assert message == Message(b"Q", memoryview(m.query("first")))
    assert bytes(message.payload) == b"first\x00"


# -- MessageReader: large messages ---------------------------------------------------


def test_large_message_in_small_chunks() -> None:
    big = m.data_row([bytes(range(256)) * 20_000])
    stream = m.row_description(["v"]) + big + m.command_complete("SELECT 1")
    reader = MessageReader()
    seen = []
    for start in range(0, len(stream), 4096):
        reader.feed(stream[start : start + 4096])
        seen += drain(reader)
    assert seen == split_messages(stream)
    assert reader.buffered == 0


def test_many_messages_through_a_compacting_buffer() -> None:
    rows = [m.data_row([str(i).encode() * 50]) for i in range(5000)]
    stream = b"".join(rows)
    reader = MessageReader()
    out = bytearray()
    for start in range(0, len(stream), 100_000):
        reader.feed(stream[start : start + 100_000])
        while (span := reader.read_span()) is not None:
            out += span.data
    assert bytes(out) == stream


def test_large_partial_fragment_then_spans() -> None:
    reader = MessageReader()
    big = m.frame(m.COPY_DATA, b"x" * 300_000)
    reader.feed(big[:200_000])
    reader.feed(big[200_000:] + m.frame(m.COPY_DONE))
    found = reader.scan()
    assert found.types == b"dc"
    assert bytes(reader.take(found.length)) == big + m.frame(m.COPY_DONE)


# -- MessageReader: limits -----------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_below_four_is_refused(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"Q" + struct.pack("!I", length))
    with pytest.raises(ProtocolError, match=rf"type b'Q' declares length {length}: .*at least 4"):
        reader.next_message()
    with pytest.raises(ProtocolError, match="at least 4"):
        reader.scan()


def test_length_over_the_limit_is_refused_from_the_header_alone() -> None:
    reader = MessageReader()
    reader.feed(b"D" + struct.pack("!I", 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match=r"declares length 4294967295, over the limit of"):
        reader.scan()
    with pytest.raises(ProtocolError, match="max_message_length"):
        reader.next_message()


def test_configurable_limit() -> None:
    reader = MessageReader(max_message_length=100)
    reader.feed(m.frame(b"d", bytes(96)))
    assert reader.next_message() is not None
    reader.feed(m.frame(b"d", bytes(97))[:5])
    with pytest.raises(ProtocolError, match="declares length 101, over the limit of 100 bytes"):
        reader.next_message()
    assert MessageReader().max_message_length == m.MAX_MESSAGE_LENGTH
    with pytest.raises(ValueError, match="max_message_length"):
        MessageReader(max_message_length=3)


def test_a_bad_header_after_good_messages_is_reported_when_reached() -> None:
    reader = MessageReader()
    reader.feed(m.sync() + b"Q\x00\x00\x00\x02")
    assert reader.next_message() == Message(b"S", memoryview(m.sync()))
    with pytest.raises(ProtocolError):
        reader.next_message()


@pytest.mark.parametrize(
    "bad", [b"Z\x00\x00\x00\x05Q", b"Z\x00\x00\x00\x06IT", b"Z\x00\x00\x00\x04"]
)
def test_malformed_ready_for_query_in_a_scan(bad: bytes) -> None:
    reader = MessageReader()
    reader.feed(bad)
    with pytest.raises(ProtocolError, match="malformed ReadyForQuery"):
        reader.scan()


def test_repr_shows_buffer_state() -> None:
    reader = MessageReader(max_message_length=64)
    reader.feed(m.query("x") + b"Q\x00")
    assert repr(reader) == "<MessageReader buffered=9 limit=64>"
    assert repr(reader.next_message()) == "Message(type=b'Q', length=6)"


# -- StartupReader ---------------------------------------------------------------------


def read_one_packet(stream: bytes) -> object:
    reader = StartupReader()
    reader.feed(stream)
    return reader.next_packet()


def startup_stream() -> bytes:
    return m.ssl_request() + m.startup_message(
        {"user": "alice", "database": "app", "application_name": "psql", "options": ""}
    )


def test_startup_packets_at_every_split() -> None:
    stream = startup_stream()
    for cut in range(len(stream) + 1):
        reader = StartupReader()
        reader.feed(stream[:cut])
        got = []
        while (packet := reader.next_packet()) is not None:
            got.append(packet)
        reader.feed(stream[cut:])
        while (packet := reader.next_packet()) is not None:
            got.append(packet)
        assert len(got) == 2, cut
        assert got[0] == SSLRequest()
        assert isinstance(got[1], StartupMessage)
        assert dict(got[1].params) == {
            "user": "alice",
            "database": "app",
            "application_name": "psql",
            "options": "",
        }


def test_startup_byte_by_byte_then_rest_goes_to_the_message_reader() -> None:
    stream = m.startup_message({"user": "bob"}) + m.query("SELECT 1")
    reader = StartupReader()
    packets = []
    for index in range(len(stream)):
        reader.feed(stream[index : index + 1])
        if (packet := reader.next_packet()) is not None:
            packets.append(packet)
            break
    assert packets == [StartupMessage(m.PROTOCOL_VERSION, {"user": "bob"})]
    rest = reader.take_rest() + stream[index + 1 :]
    messages = MessageReader()
    messages.feed(rest)
    assert drain(messages) == [(b"Q", b"SELECT 1\x00")]
    assert reader.buffered == 0


def test_a_repeated_startup_packet_is_decoded_once_and_checked_every_time() -> None:
    packet = m.startup_message({"user": "carol", "database": "app"})
    first = StartupReader().read(packet)
    again = StartupReader().read(bytes(bytearray(packet)))  # equal bytes, another object
    assert isinstance(first, StartupMessage)
    assert first.user == "carol"
    assert again is first  # remembered by its bytes
    with pytest.raises(TypeError):
        first.params["user"] = "mallory"  # type: ignore[index]  # shared, so immutable
    # the length limit is the reader's own, also for a packet another reader decoded
    with pytest.raises(ProtocolError, match="over the limit"):
        StartupReader(max_packet_length=len(packet) - 1).read(packet)
    # a packet that failed is not remembered: it fails again
    body = struct.pack("!I", m.PROTOCOL_VERSION) + b"database\0app\0\0"
    no_user = struct.pack("!I", len(body) + 4) + body
    for _ in range(2):
        with pytest.raises(ProtocolError, match="names no user"):
            StartupReader().read(no_user)
    # SSLRequest too, but never a CancelRequest (each carries its own key)
    assert StartupReader().read(m.ssl_request()) is StartupReader().read(m.ssl_request())
    cancel = m.cancel_request(1234, 5678)
    assert StartupReader().read(cancel) is not StartupReader().read(cancel)
    # a packet with bytes after it (pipelined) is decoded as before
    reader = StartupReader()
    assert reader.read(packet + m.query("SELECT 1")) == first
    assert reader.take_rest() == m.query("SELECT 1")


def test_startup_message_properties() -> None:
    packet = decode_startup_packet(
        m.startup_message({"user": "u", "_pq_.x": "1"}, protocol=m.PROTOCOL_VERSION_3_2)[4:]
    )
    assert isinstance(packet, StartupMessage)
    assert (packet.major, packet.minor) == (3, 2)
    assert (packet.user, packet.database) == ("u", "u")
    assert packet.protocol_options == ("_pq_.x",)


def test_ssl_request_followed_by_stuffed_bytes_is_visible() -> None:
    reader = StartupReader()
    reader.feed(m.ssl_request() + b"garbage")
    assert reader.next_packet() == SSLRequest()
    assert reader.buffered == 7


def test_gssenc_and_cancel_requests() -> None:
    assert decode_startup_packet(m.gssenc_request()[4:]) == GSSENCRequest()
    cancel = decode_startup_packet(m.cancel_request(4242, 0xDEADBEEF)[4:])
    assert cancel == CancelRequest(4242, struct.pack("!I", 0xDEADBEEF))
    assert isinstance(cancel, CancelRequest)
    assert cancel.key == 0xDEADBEEF
    long_key = decode_startup_packet(m.cancel_request(1, bytes(range(32)))[4:])
    assert long_key == CancelRequest(1, bytes(range(32)))


def _packet(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


V3 = struct.pack("!I", m.PROTOCOL_VERSION)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"\x00\x00\x00\x07", r"invalid startup packet length 7: .*at least 8"),
        (b"\x00\x00\x00\x00", r"invalid startup packet length 0"),
        (b"\x00\x00\x27\x11", r"startup packet length 10001 is over the limit of 10000"),
        (b"\xff\xff\xff\xff", r"startup packet length 4294967295 is over the limit"),
        (_packet(struct.pack("!I", 2 << 16) + b"\x00"), r"unsupported frontend protocol 2\.0"),
        (_packet(struct.pack("!I", 4 << 16) + b"\x00"), r"unsupported frontend protocol 4\.0"),
        (
            _packet(struct.pack("!I", (1234 << 16) | 5681)),
            r"unknown special request code 1234\.5681",
        ),
        (_packet(struct.pack("!I", m.SSL_REQUEST_CODE) + b"x"), r"SSLRequest must be 8 bytes"),
        (_packet(struct.pack("!I", m.GSSENC_REQUEST_CODE) + b"x"), r"GSSENCRequest must be 8"),
        (_packet(struct.pack("!II", m.CANCEL_REQUEST_CODE, 1)), r"CancelRequest is 12 bytes long"),
        (
            _packet(struct.pack("!II", m.CANCEL_REQUEST_CODE, 1) + bytes(257)),
            r"4 to 256 byte cancel key",
        ),
        (_packet(V3 + b"\x00"), r"names no user"),
        (_packet(V3 + b"database\x00d\x00\x00"), r"names no user"),
        (_packet(V3 + b"user\x00\x00\x00"), r"names no user"),
        (_packet(V3), r"parameter list is not terminated"),
        (_packet(V3 + b"user\x00bob\x00"), r"parameter list is not terminated"),
        (_packet(V3 + b"user\x00bob"), r"'user' has no NUL-terminated value"),
        (_packet(V3 + b"user\x00bob\x00database\x00"), r"'database' has no NUL-terminated value"),
        (_packet(V3 + b"user\x00bob\x00\x00junk"), r"4 unexpected byte\(s\) after its parameters"),
    ],
)
def test_startup_rules(stream: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        read_one_packet(stream)


def test_oversized_startup_length_is_refused_on_feed() -> None:
    reader = StartupReader()
    with pytest.raises(ProtocolError, match="over the limit"):
        reader.feed(b"\x00\x01\x00\x00")


def test_startup_limit_is_configurable() -> None:
    small = StartupReader(max_packet_length=20)
    with pytest.raises(ProtocolError, match="over the limit of 20"):
        small.feed(m.startup_message({"user": "someone-long"}))
    with pytest.raises(ValueError, match="max_packet_length"):
        StartupReader(max_packet_length=7)
    assert repr(StartupReader()) == "<StartupReader buffered=0 limit=10000>"


def test_later_duplicate_parameter_wins() -> None:
    packet = decode_startup_packet(V3 + b"user\x00a\x00user\x00b\x00\x00")
    assert isinstance(packet, StartupMessage)
    assert packet.user == "b"


def test_startup_body_too_short_for_a_code() -> None:
    with pytest.raises(ProtocolError, match="too short for a code"):
        decode_startup_packet(b"\x00\x03")
