"""The compiled hot-path helpers (millpond.proxy.protocol._scan) against their Python twins.

The Python versions are the reference: every compiled function must give the same
answer, or raise the same error, on any input.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from millpond.errors import ProtocolError
from millpond.proxy import session
from millpond.proxy.protocol import codec
from millpond.proxy.protocol import messages as m
from tests.unit.proxy.canned import backend_stream, frontend_stream

LIMIT = 1 << 20

try:
    from millpond.proxy.protocol import _scan
except ImportError:  # each test below then fails saying why, instead of the whole run
    _scan = None  # type: ignore[assignment]

NOT_BUILT = "millpond was installed without its compiled helpers (is there a C compiler?)"


@pytest.fixture(autouse=True)
def _built() -> None:
    assert _scan is not None, NOT_BUILT


def test_the_compiled_helpers_are_in_use() -> None:
    """CI builds the extension; a silent fallback to Python would only show as slowness."""
    assert codec.COMPILED
    assert codec.walk is _scan.walk
    assert codec.whole is _scan.whole
    assert codec.names_statements is _scan.names_statements
    assert session.hint is _scan.hint


def _outcome(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except ProtocolError as exc:
        return ("error", str(exc))


def _same_walk(data: bytes, start: int, stop: bytes, limit: int = LIMIT) -> None:
    python = _outcome(codec._walk, data, start, limit, stop)
    compiled = _outcome(_scan.walk, data, start, limit, stop)
    if isinstance(python, tuple) and python[:1] != ("error",):
        python = tuple(python)  # Scan -> plain tuple
    assert compiled == python
    view = _outcome(_scan.walk, memoryview(data), start, limit, stop)
    assert view == compiled
    array = _outcome(_scan.walk, bytearray(data), start, limit, stop)
    assert array == compiled


def _same_whole(data: bytes, stop: bytes, limit: int = LIMIT) -> None:
    python = _outcome(codec._whole, data, limit, stop)
    assert _outcome(_scan.whole, data, limit, stop) == python
    assert _outcome(_scan.whole, memoryview(data), limit, stop) == python
    assert _outcome(_scan.whole, bytearray(data), limit, stop) == python


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


messages = st.builds(
    _message,
    st.sampled_from([b"T", b"D", b"C", b"Z", b"S", b"E", b"N", b"1", b"2", b"X", b"Q"]),
    st.one_of(st.sampled_from([b"I", b"T", b"E", b"", b"IX"]), st.binary(max_size=40)),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(messages, max_size=80),
    st.integers(0, 12),
    st.integers(0, 12),
    st.sampled_from([b"", b"X", b"Z", b"XZ"]),
)
def test_walk_matches_python_on_message_streams(
    parts: list[bytes], start: int, cut: int, stop: bytes
) -> None:
    data = b"".join(parts)
    _same_walk(data, min(start, len(data)), stop)
    _same_walk(data[: max(0, len(data) - cut)], 0, stop)  # a message cut short
    _same_whole(data, stop)
    _same_whole(data[: max(0, len(data) - cut)], stop)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"", b"X"]), st.integers(4, 300))
def test_walk_matches_python_on_garbage(data: bytes, stop: bytes, limit: int) -> None:
    _same_walk(data, 0, stop, limit)
    _same_whole(data, stop, limit)


def test_whole() -> None:
    query, ready = m.query("SELECT 1"), m.ready_for_query(m.TX_IDLE)
    assert _scan.whole(query + ready, LIMIT, b"") == (b"QZ", len(query), b"I")
    assert _scan.whole(query + ready[:-1], LIMIT, b"") is None  # cut short
    assert _scan.whole(query + m.terminate() + query, LIMIT, b"X") is None  # stops at X
    assert _scan.whole(b"", LIMIT, b"") == (b"", 0, None)


def test_walk_matches_python_on_canned_streams() -> None:
    for parts in (frontend_stream(), backend_stream()):
        stream = b"".join(parts)
        for start in range(min(len(stream), 40)):
            _same_walk(stream, start, b"")
            _same_walk(stream, start, b"X")


def test_walk_errors_read_like_pythons() -> None:
    with pytest.raises(ProtocolError, match="declares length 2"):
        _scan.walk(b"Q\x00\x00\x00\x02", 0, LIMIT, b"")
    with pytest.raises(ProtocolError, match="malformed ReadyForQuery"):
        _scan.walk(b"Z\x00\x00\x00\x05Q", 0, LIMIT, b"")


names = st.sampled_from(["", "", "s1", "_pg3_0", "x" * 70])


@st.composite
def client_batches(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from("PBDCESHQ"))
        if kind == "P":
            out.append(m.parse(draw(names), "SELECT $1"))
        elif kind == "B":
            out.append(m.bind(draw(names), draw(names), [b"1"]))
        elif kind in "DC":
            target = draw(st.sampled_from([b"S", b"P"]))
            name = draw(names)
            out.append(m.describe(target, name) if kind == "D" else m.close(target, name))
        elif kind == "E":
            out.append(m.execute(draw(names)))
        elif kind == "S":
            out.append(m.sync())
        elif kind == "H":
            out.append(_message(b"H", b""))
        else:
            out.append(m.query("SELECT 1"))
    return b"".join(out)


@settings(max_examples=400, deadline=None)
@given(client_batches(), st.integers(0, 8))
def test_names_statements_matches_python(data: bytes, cut: int) -> None:
    for chunk in (data, data[: max(0, len(data) - cut)]):
        assert _scan.names_statements(chunk) == codec._names_statements(chunk)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_names_statements_matches_python_on_garbage(data: bytes) -> None:
    assert _scan.names_statements(data) == codec._names_statements(data)


@pytest.mark.parametrize(
    ("batch", "named"),
    [
        (m.parse("", "SELECT 1") + m.bind("", "", []) + m.execute("") + m.sync(), False),
        (m.parse("s1", "SELECT 1") + m.sync(), True),
        (m.bind("", "s1", []) + m.execute("") + m.sync(), True),
        (m.bind("portal", "", []) + m.execute("portal") + m.sync(), False),
        (m.describe(b"S", "s1") + m.sync(), True),
        (m.describe(b"P", "portal") + m.sync(), False),
        (m.close(b"S", "s1") + m.sync(), True),
        (m.close(b"P", "portal") + m.sync(), False),
        (m.query("SELECT 1"), False),
        (m.parse("", "SELECT 1")[:-1], True),  # not whole: the careful path decides
    ],
)
def test_names_statements(batch: bytes, named: bool) -> None:
    assert codec._names_statements(batch) is named
    assert _scan.names_statements(batch) is named


words = st.sampled_from(
    [b"set", b"SET", b"Reset", b"do", b"load", b"set_config", b"pg_temp", b"temporary",
     b"hold", b"LISTEN", b"role", b"session", b"pg_advisory_lock", b"pg_try_advisory_lock",
     b"_shared", b"x", b"1", b"_", b"select", b"settings", b"pg_", b"a" * 70, b"\xc3\xa9",
     b"PG_Try_Advisory_Lock_Shared", b"Do", b"d", b"s" * 64, b"set" * 22]
)  # fmt: skip
separators = st.sampled_from([b"", b" ", b";", b"(", b"\x00", b"\n", b"'", b"$"])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(words, separators), max_size=10))
def test_hint_matches_the_pattern(parts: list[tuple[bytes, bytes]]) -> None:
    data = b"".join(w + s for w, s in parts)
    assert _scan.hint(data) == session._hint_re(data)
    assert _scan.hint(memoryview(data)) == session._hint_re(data)


@pytest.mark.parametrize(
    ("sql", "hinted"),
    [
        (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1", False),
        (b"set search_path = x", True),
        (b"SELECT pg_advisory_lock_shared(1)", True),
        (b"SELECT settings FROM t", False),
        (b"CREATE TEMP TABLE t ()", True),
        (b"SELECT 1 -- Reset", True),  # a look, not a parse: comments count
    ],
)
def test_hint(sql: bytes, hinted: bool) -> None:
    assert session._hint_re(sql) is hinted
    assert _scan.hint(sql) is hinted
