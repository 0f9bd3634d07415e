"""Session state in transaction mode: remembered, re-applied, or pinned.

A client that runs ``SET search_path = app`` outside a transaction expects it to hold
for its whole session, but in transaction mode its next transaction may run on another
server connection. So the proxy remembers each client's settings and brings whichever
server serves it into line first (``SET``/``RESET`` before its first message), and
undoes them before that server serves anyone else.

What cannot be moved between server connections (temporary tables, session advisory
locks, LISTEN, WITH HOLD cursors, SQL PREPARE, SET ROLE / SESSION AUTHORIZATION, DO
blocks and set_config calls whose effect is unknown) *pins* the client to its server
connection until it disconnects (or, with ``session_pinning = reject``, is refused).

Detection starts with the same cheap pattern the library pool uses; only SQL that
matches it is looked at more closely.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from millpond.drivers.base import leaves_session_state

_COMMENTS = re.compile(r"--[^\n\r]*|/\*.*?\*/", re.DOTALL)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?")
# SET/RESET forms that only last for the transaction, or are not settings at all.
_NOT_SESSION = ("set local ", "set transaction", "set constraints", "set session characteristics")
_PINNING = (
    "set role",
    "reset role",
    "set session authorization",
    "reset session authorization",
    "listen",
    "prepare ",
    "load ",
    "do ",
    "do$",
)


#: The words that make a request worth a closer look for session state (lower case),
#: and the prefixes of words that do (pg_advisory_lock_shared, ...).
HINT_WORDS = (
    b"set", b"reset", b"do", b"load", b"set_config", b"pg_settings", b"pg_temp", b"temp",
    b"temporary", b"hold", b"listen", b"prepare", b"deallocate", b"discard", b"role",
    b"session", b"authorization",
)  # fmt: skip
HINT_PREFIXES = (b"pg_advisory_lock", b"pg_try_advisory_lock")

_HINT = re.compile(
    rb"\b(?:"
    + b"|".join(re.escape(w) for w in HINT_WORDS)
    + rb"|(?:"
    + b"|".join(re.escape(p) for p in HINT_PREFIXES)
    + rb")\w*)\b"
).search


def _hint_re(data: bytes | memoryview) -> bool:
    """A cheap first look at raw client bytes (headers included): could any statement
    in there touch session state? Only spans that match are decoded and classified.

    True if a whole word (ASCII letters, digits, underscores; any case) is one of
    HINT_WORDS or starts with one of HINT_PREFIXES.
    """
    return _HINT((data if type(data) is bytes else bytes(data)).lower()) is not None


hint: Callable[[bytes | memoryview], bool]
try:  # the compiled twin runs on every request in transaction mode
    from millpond.proxy.protocol import _scan
except ImportError:  # pragma: no cover - a build without a C compiler
    hint = _hint_re
else:
    _scan.set_hint_words(HINT_WORDS, HINT_PREFIXES)
    hint = _scan.hint


#: Parameters PostgreSQL reports itself (ParameterStatus): the proxy keeps those in step
#: per client already; ``time`` and ``names`` are SET TIME ZONE and SET NAMES.
_REPORTED = frozenset(
    {"application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
     "standard_conforming_strings", "time", "names"}
)  # fmt: skip


class Effect(enum.Flag):
    NONE = 0
    SETTING = enum.auto()  # SET/RESET of named settings: remember the names
    RESET_ALL = enum.auto()  # RESET ALL / DISCARD ALL: the client starts afresh
    PIN = enum.auto()  # state that cannot move: keep this server connection


@dataclass(slots=True)
class Classified:
    effect: Effect = Effect.NONE
    names: set[str] = field(default_factory=set)
    reason: str = ""


def _statements(sql: str) -> list[str]:
    """Statements of ``sql``, lower-cased, comments and quoted text removed (roughly)."""
    text = _COMMENTS.sub(" ", sql)
    text = re.sub(r"'(?:[^']|'')*'", "''", text)
    return [" ".join(part.split()).lower() for part in text.split(";") if part.strip()]


def classify(sql: str) -> Classified:
    """What running ``sql`` does to the session, conservatively."""
    out = Classified()
    if not leaves_session_state(sql):
        return out
    for stmt in _statements(sql):
        _classify_one(stmt, out)
    return out


def _classify_one(stmt: str, out: Classified) -> None:
    if stmt.startswith(_NOT_SESSION):
        return
    if stmt in ("reset all", "discard all"):
        out.effect |= Effect.RESET_ALL
        return
    for prefix in _PINNING:
        if stmt.startswith(prefix):
            _pin(out, prefix.strip().rstrip("$"))
            return
    if stmt.startswith(("set ", "reset ")):
        words = stmt.split()
        name = words[2] if len(words) > 2 and words[1] == "session" else words[1]
        name = name.split("=")[0]
        if name in _REPORTED:
            return
        if _NAME.fullmatch(name):
            out.effect |= Effect.SETTING
            out.names.add(name)
        else:
            _pin(out, "set")
        return
    if re.search(r"\b(temp|temporary|pg_temp)\b", stmt):
        _pin(out, "temporary table")
    elif re.search(r"\bwith hold\b", stmt):
        _pin(out, "WITH HOLD cursor")
    elif re.search(r"\bpg_(try_)?advisory_lock(_shared)?\b", stmt):
        _pin(out, "session advisory lock")
    elif "set_config" in stmt or "pg_settings" in stmt:
        _pin(out, "set_config")


def _pin(out: Classified, reason: str) -> None:
    out.effect |= Effect.PIN
    out.reason = out.reason or reason


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def alignment_sql(applied: dict[str, str], wanted: dict[str, str]) -> str:
    """Statements taking a server from ``applied`` settings to ``wanted``.

    Values go through set_config, which parses them as the setting's own text form
    (so a search_path list stays a list), exactly as current_setting returned them.
    """
    parts = [f"RESET {name}" for name in applied if name not in wanted]
    sets = [
        f"set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in wanted.items()
        if applied.get(name) != value
    ]
    if sets:
        parts.append("SELECT " + ", ".join(sets))
    return ";".join(parts)


def readback_sql(names: list[str]) -> str:
    """One query returning the current value of each setting in ``names``, in order."""
    cols = ", ".join(f"current_setting({quote_literal(n)}, true)" for n in names)
    return f"SELECT {cols}"


class SessionTracker:
    """One client's session state, as transaction mode must carry it."""

    __slots__ = ("pending", "pin_reason", "pinned", "reset_all", "wanted")

    def __init__(self) -> None:
        self.wanted: dict[str, str] = {}  # settings the client made, to re-apply
        self.pending: set[str] = set()  # settings touched by the running transaction
        self.reset_all = False
        self.pinned = False
        self.pin_reason = ""

    def inspect(self, texts: list[str], *, reject: bool) -> str | None:
        """Note what ``texts`` do; with ``reject``, a pinning statement's reason instead."""
        for text in texts:
            found = classify(text)
            if Effect.PIN in found.effect and not self.pinned:
                if reject:
                    return found.reason
                self.pinned, self.pin_reason = True, found.reason
            if Effect.SETTING in found.effect:
                self.pending |= found.names
            if Effect.RESET_ALL in found.effect:
                self.reset_all = True
                self.pending.clear()
        return None

    def settle(
        self, applied: dict[str, str], names: list[str], values: tuple[bytes | None, ...]
    ) -> None:
        """Record what the server says the touched settings now are."""
        for name, value in zip(names, values, strict=False):
            if value is None:
                self.wanted.pop(name, None)
                applied.pop(name, None)
            else:
                self.wanted[name] = applied[name] = value.decode()

    def forget_all(self, applied: dict[str, str]) -> None:
        """RESET ALL / DISCARD ALL ran: nothing is set any more, here or on the server."""
        self.wanted.clear()
        applied.clear()
        self.reset_all = False
