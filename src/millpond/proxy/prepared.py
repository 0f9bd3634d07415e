"""Protocol-level prepared statements that survive transaction pooling.

In transaction mode a client's next transaction may run on another server connection,
one that never saw the client's ``Parse``. Here each named statement of a client maps
to a proxy-wide server-side statement (``mp_<n>``, shared by every client that prepares
the same text and parameter types); a server connection that lacks it gets it prepared
transparently just before use, and keeps a bounded LRU of what it holds
(``max_prepared_statements``), closing what it evicts.

Rewriting changes the request stream, so the response stream must be changed to match:
every request that will be answered gets a :class:`Pending` entry, in order, saying
whether its answer goes to the client (FORWARD), is dropped because the proxy asked
(SWALLOW), or must be made up because the request never reached the server (FAKE).
An ErrorResponse in the extended protocol makes the server skip everything up to the
next Sync, so the entries up to that Sync are dropped with it.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from millpond.proxy.protocol import messages as m
from millpond.proxy.protocol.parsers import (
    decode_bind,
    decode_close,
    decode_describe,
    decode_parse,
    decode_query,
)

if TYPE_CHECKING:
    from millpond.proxy.backend import ServerConnection

_LEN = struct.Struct("!I")

#: Client message types that take the rewriting path.
EXTENDED = frozenset(b"PBDCEH")
#: Messages renamed_only passes as they are: Describe (of a portal), Execute, Sync, Flush.
_PASS_THROUGH = frozenset(b"DESH")


class Act(enum.Enum):
    FORWARD = "forward"
    SWALLOW = "swallow"
    FAKE = "fake"


# What completes the answer to each kind of request.
_PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC, _QUERY = (
    b"1", b"2", b"Tn", b"CIs", b"3", b"Z", b"Z",
)  # fmt: skip


@dataclass(slots=True)
class Pending:
    completes: bytes  # response types that end this request's answer
    act: Act
    fake: bytes = b""  # for FAKE: what to send in the server's stead
    statement: str = ""  # for Parse: the server-side name it creates
    is_sync: bool = False
    simple: bool = False  # Query/FunctionCall: errors do not skip later requests


@dataclass(frozen=True, slots=True)
class Statement:
    name: str  # the server-side name
    parse: bytes  # the Parse message that creates it under that name

    @property
    def name_bytes(self) -> bytes:
        return self.name.encode()


class Registry:
    """Server-side names for every distinct (query, parameter types), proxy-wide."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, tuple[int, ...]], Statement] = {}

    def statement(self, query: str, types: tuple[int, ...]) -> Statement:
        key = (query, types)
        found = self._by_key.get(key)
        if found is None:
            name = f"mp_{len(self._by_key) + 1}"
            found = Statement(name, m.parse(name, query, types))
            self._by_key[key] = found
        return found

    def __len__(self) -> int:
        return len(self._by_key)


class ServerStatements:
    """What one server connection has prepared, least recently used first."""

    __slots__ = ("held", "limit", "pending", "skip_z")

    def __init__(self, limit: int) -> None:
        self.held: OrderedDict[str, None] = OrderedDict()
        self.limit = limit
        self.pending: deque[Pending] = deque()
        self.skip_z = 0  # answers to untracked queries still to pass before tracking

    def forget_all(self) -> None:
        self.held.clear()


def _messages(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start, end) of each complete message in ``data``."""
    out = []
    pos, end = 0, len(data)
    while pos < end:
        length = _LEN.unpack_from(data, pos + 1)[0]
        out.append((data[pos], pos, pos + 1 + length))
        pos += 1 + length
    return out


class Rewriter:
    """Rewrites one client's requests for one linked server connection."""

    def __init__(self, registry: Registry, names: dict[str, Statement]) -> None:
        self.registry = registry
        self.names = names  # the client's statement names

    def requests(
        self, server: ServerConnection, data: bytes, untracked_owed: int
    ) -> tuple[bytes, bytes]:
        """(bytes for ``server``, made-up answers due to the client now)."""
        st = server.statements
        if not st.pending and untracked_owed:
            st.skip_z = untracked_owed  # let the untracked answers pass first
        out: list[bytes] = []
        for kind, start, end in _messages(data):
            raw = data[start:end]
            handler = _HANDLERS.get(kind)
            if handler is None:
                out.append(raw)  # CopyData, CopyDone, CopyFail, Terminate...
            else:
                handler(self, st, raw, raw[5:], out)
        return b"".join(out), fakes_due(st)

    def renamed_only(self, st: ServerStatements, data: bytes) -> bytes | None:
        """The common case, cheaply: Bind, Describe, Execute, Sync and Flush messages
        whose named statements this server connection already holds. They become the
        same messages under the server-side names, and since the proxy adds and drops
        nothing, every answer goes to the client as it comes: nothing to track. None
        when anything else is in ``data``, or answers are being tracked: then
        :meth:`requests` does the full job. ``data``: whole messages that leave the
        server synced (else untracked answers could not be told from tracked ones)."""
        if st.pending or st.skip_z:
            return None
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            kind = data[pos]
            stop = pos + 1 + _LEN.unpack_from(data, pos + 1)[0]
            if kind == 66:  # 'B': the portal name, then the statement name
                portal_end = data.find(b"\0", pos + 5, stop)
                name_end = data.find(b"\0", portal_end + 1, stop)
                if portal_end < 0 or name_end < 0:
                    return None
                if name_end == portal_end + 1:  # the unnamed statement
                    out.append(data[pos:stop])
                else:
                    server_name = self._held_name(st, data[portal_end + 1 : name_end])
                    if server_name is None:
                        return None
                    body = data[pos + 5 : portal_end + 1] + server_name + data[name_end:stop]
                    out.append(b"B" + _LEN.pack(len(body) + 4) + body)
            elif kind == 68 and stop - pos < 7:
                return None  # a Describe too short to be right: the careful path says so
            elif kind == 68 and data[pos + 5] == 83 and data[pos + 6] != 0:  # 'D' statement
                server_name = self._held_name(st, data[pos + 6 : stop - 1])
                if server_name is None:
                    return None
                out.append(m.describe(b"S", server_name.decode()))
            elif kind in _PASS_THROUGH:
                out.append(data[pos:stop])
            else:
                return None
            pos = stop
        return b"".join(out)

    def _held_name(self, st: ServerStatements, client_name: bytes) -> bytes | None:
        """The server-side name of a client's statement this server holds, else None."""
        stmt = self.names.get(client_name.decode(errors="replace"))
        if stmt is None or stmt.name not in st.held:
            return None
        st.held.move_to_end(stmt.name)
        return stmt.name_bytes

    # -- one handler per request type ---------------------------------------------

    def _parse(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        parse = decode_parse(payload)
        if not parse.statement:
            out.append(raw)
            st.pending.append(Pending(_PARSE, Act.FORWARD))
            return
        stmt = self.registry.statement(parse.query, parse.param_types)
        self.names[parse.statement] = stmt
        if stmt.name in st.held:
            st.held.move_to_end(stmt.name)
            st.pending.append(Pending(_PARSE, Act.FAKE, m.parse_complete()))
            return
        self._hold(st, stmt.name, out)
        out.append(stmt.parse)
        st.pending.append(Pending(_PARSE, Act.FORWARD, statement=stmt.name))

    def _bind(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        bind = decode_bind(payload)
        stmt = self.names.get(bind.statement) if bind.statement else None
        if stmt is None:
            out.append(raw)  # unnamed, or unknown: the server answers as it would
        else:
            self._ensure(st, stmt, out)
            out.append(bind.renamed(stmt.name))
        st.pending.append(Pending(_BIND, Act.FORWARD))

    def _describe(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        target = decode_describe(payload)
        stmt = self.names.get(target.name) if target.kind == b"S" and target.name else None
        if stmt is None:
            out.append(raw)
        else:
            self._ensure(st, stmt, out)
            out.append(m.describe(b"S", stmt.name))
        st.pending.append(Pending(_DESCRIBE, Act.FORWARD))

    def _close(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        target = decode_close(payload)
        if target.kind == b"S" and target.name in self.names:
            # The server-side statement stays for other clients; the LRU retires it.
            del self.names[target.name]
            st.pending.append(Pending(_CLOSE, Act.FAKE, m.close_complete()))
            return
        out.append(raw)
        st.pending.append(Pending(_CLOSE, Act.FORWARD))

    def _execute(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        out.append(raw)
        st.pending.append(Pending(_EXECUTE, Act.FORWARD))

    def _sync(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        out.append(raw)
        st.pending.append(Pending(_SYNC, Act.FORWARD, is_sync=True))

    def _flush(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        out.append(raw)

    def _query(self, st: ServerStatements, raw: bytes, payload: bytes, out: list[bytes]) -> None:
        out.append(raw)
        st.pending.append(Pending(_QUERY, Act.FORWARD, is_sync=True, simple=True))
        if raw[0:1] == b"Q" and _drops_statements(payload):
            self.names.clear()  # DISCARD ALL / DEALLOCATE ALL: the client starts afresh
            st.forget_all()

    # -- server-side statements -----------------------------------------------------

    def _ensure(self, st: ServerStatements, stmt: Statement, out: list[bytes]) -> None:
        """Prepare ``stmt`` on this server first if it does not hold it."""
        if stmt.name in st.held:
            st.held.move_to_end(stmt.name)
            return
        self._hold(st, stmt.name, out)
        out.append(stmt.parse)
        st.pending.append(Pending(_PARSE, Act.SWALLOW, statement=stmt.name))

    def _hold(self, st: ServerStatements, name: str, out: list[bytes]) -> None:
        st.held[name] = None
        while len(st.held) > st.limit:
            evicted, _ = st.held.popitem(last=False)
            out.append(m.close(b"S", evicted))
            st.pending.append(Pending(_CLOSE, Act.SWALLOW))


_HANDLERS = {
    ord("P"): Rewriter._parse,
    ord("B"): Rewriter._bind,
    ord("D"): Rewriter._describe,
    ord("C"): Rewriter._close,
    ord("E"): Rewriter._execute,
    ord("S"): Rewriter._sync,
    ord("H"): Rewriter._flush,
    ord("Q"): Rewriter._query,
    ord("F"): Rewriter._query,
}


def _drops_statements(payload: bytes) -> bool:
    text = payload.upper()
    if b"DISCARD" not in text and b"DEALLOCATE" not in text:
        return False
    query = " ".join(decode_query(payload).text.upper().split())
    return "DISCARD ALL" in query or "DEALLOCATE ALL" in query or "DEALLOCATE PREPARE ALL" in query


def responses(st: ServerStatements, data: bytes) -> bytes:
    """The bytes to pass to the client for the server's ``data``."""
    out: list[bytes] = []
    run = -1  # start of the current stretch of messages that go to the client
    pending = st.pending
    for kind, start, end in _messages(data):
        if st.skip_z:
            st.skip_z -= kind == 90  # 'Z'
            keep = True
        else:
            keep = _answer(st, pending, kind)
        if keep and run < 0:
            run = start
        elif not keep and run >= 0:
            out.append(data[run:start])
            run = -1
        if pending and pending[0].act is Act.FAKE and not st.skip_z:
            if run >= 0:
                out.append(data[run:end])
                run = -1
            out.append(fakes_due(st))
    if run >= 0:
        out.append(data[run:])
    return b"".join(out)


def _answer(st: ServerStatements, pending: deque[Pending], kind: int) -> bool:
    """Account for one server message; False if the client must not see it."""
    if not pending or kind in (78, 83, 65):  # 'N' notice, 'S' parameter, 'A' notify
        return True
    head = pending[0]
    if kind == 69:  # 'E'
        if not head.simple:
            _skip_to_sync(st, pending)
        return True
    if kind not in head.completes:
        return True
    pending.popleft()
    return head.act is not Act.SWALLOW


def _skip_to_sync(st: ServerStatements, pending: deque[Pending]) -> None:
    """After an error the server ignores everything up to Sync: so do we."""
    while pending and not pending[0].is_sync:
        entry = pending.popleft()
        if entry.statement:
            st.held.pop(entry.statement, None)  # its Parse failed or never ran


def fakes_due(st: ServerStatements) -> bytes:
    """Made-up answers now at the head of the queue, in order."""
    out = []
    pending = st.pending
    if st.skip_z:
        return b""
    while pending and pending[0].act is Act.FAKE:
        out.append(pending.popleft().fake)
    return b"".join(out)
