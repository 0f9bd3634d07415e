"""Rewriter.renamed_only (the cheap path for Binds of statements a server holds) must
send exactly what the full Rewriter.requests sends, whenever it takes the batch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from millpond.proxy.prepared import Act, Registry, Rewriter, ServerStatements, Statement
from millpond.proxy.protocol import messages as m

QUERIES = {"s1": "SELECT $1::int", "s2": "SELECT $1::text, 2", "s3": "SELECT 3"}


def _state(held: list[str], limit: int = 10) -> tuple[Rewriter, Any]:
    """A client that prepared s1, s2, s3; its server holds the statements in ``held``."""
    registry, names = Registry(), {}
    for client_name, sql in QUERIES.items():
        names[client_name] = registry.statement(sql, ())
    server = SimpleNamespace(statements=ServerStatements(limit))
    for client_name in held:
        server.statements.held[names[client_name].name] = None
    return Rewriter(registry, dict(names)), server


names = st.sampled_from(["", "s1", "s2", "s3", "unknown"])


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from("BBDEH"))
        if kind == "B":
            params = draw(st.lists(st.binary(max_size=6), max_size=3))
            out.append(m.bind(draw(st.sampled_from(["", "p1"])), draw(names), params))
        elif kind == "D":
            out.append(m.describe(draw(st.sampled_from([b"S", b"P"])), draw(names)))
        elif kind == "E":
            out.append(m.execute(draw(st.sampled_from(["", "p1"]))))
        else:
            out.append(m.frame(b"H"))
    if draw(st.booleans()):
        out.append(m.parse("s9", "SELECT 9"))  # something only the full path handles
    return b"".join([*out, m.sync()])


@settings(max_examples=500, deadline=None)
@given(batches(), st.lists(st.sampled_from(["s1", "s2", "s3"]), unique=True))
def test_renamed_only_sends_what_requests_sends(data: bytes, held: list[str]) -> None:
    fast, fast_server = _state(held)
    full, full_server = _state(held)
    renamed = fast.renamed_only(fast_server.statements, data)
    to_server, to_client = full.requests(full_server, data, 0)
    if renamed is None:
        return  # the full path's business
    assert renamed == to_server
    assert to_client == b""
    assert all(p.act is Act.FORWARD for p in full_server.statements.pending)
    assert not fast_server.statements.pending  # nothing to track
    assert list(fast_server.statements.held) == list(full_server.statements.held)  # LRU


def test_it_takes_the_common_case() -> None:
    rewriter, server = _state(["s1"])
    data = m.bind("", "s1", [b"7"]) + m.describe(b"P", "") + m.execute("") + m.sync()
    renamed = rewriter.renamed_only(server.statements, data)
    server_name = rewriter.names["s1"].name
    assert renamed == m.bind("", server_name, [b"7"]) + data[len(m.bind("", "s1", [b"7"])) :]


def test_it_leaves_the_rest_to_the_full_path() -> None:
    rewriter, server = _state(["s1"])
    assert rewriter.renamed_only(server.statements, m.bind("", "s2", []) + m.sync()) is None
    assert rewriter.renamed_only(server.statements, m.parse("s1", "SELECT 1")) is None
    assert rewriter.renamed_only(server.statements, m.query("SELECT 1")) is None
    assert rewriter.renamed_only(server.statements, m.frame(b"D")) is None  # too short
    server.statements.skip_z = 1  # answers still to let through before tracking
    assert rewriter.renamed_only(server.statements, m.bind("", "s1", []) + m.sync()) is None


def test_statement_name_bytes() -> None:
    assert Statement("mp_7", b"").name_bytes == b"mp_7"
