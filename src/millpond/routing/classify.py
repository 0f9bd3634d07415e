"""Where may a statement run: on a replica, or only on the primary?

The answer comes from PostgreSQL's own grammar (pglast wraps the server's parser), not
from string matching, and errs towards the primary: a statement goes to a replica only
when every statement in the string is one of

- a ``SELECT`` (also ``VALUES``, ``TABLE``, ``WITH ... SELECT``) that contains no
  data-modifying statement anywhere (not in a CTE, not in a subquery), no locking
  clause (``FOR UPDATE``/``NO KEY UPDATE``/``SHARE``/``KEY SHARE``), no ``INTO``, and
  calls only functions known to be read-only (:mod:`.functions`, plus the user's);
- ``EXPLAIN`` without ``ANALYZE`` (nothing is executed), or ``EXPLAIN ANALYZE`` of a
  statement that may itself run on a replica;
- ``SHOW``;
- ``COPY ... TO STDOUT`` of a table or of such a query.

Everything else goes to the primary: DML, DDL, ``SET``/``RESET``, transaction control,
``LOCK``, ``LISTEN``/``NOTIFY``, ``DO``/``CALL``, ``PREPARE``/``EXECUTE``, cursors,
``VACUUM``, ``COPY FROM``, an empty string, and anything the parser rejects.

Verdicts are cached per query string in a bounded dict, so routing a query seen before
costs one dictionary lookup.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from millpond.errors import ConfigError
from millpond.routing.functions import READ_ONLY_FUNCTIONS, WRITE_FUNCTIONS, normalize_name

try:
    from pglast import parser
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "millpond.routing parses SQL with pglast: pip install 'millpond[routing]'"
    ) from exc


class Route(enum.Enum):
    """Where a statement may run."""

    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A routing decision and the reason for it (shown in logs and by ``group.classify``)."""

    route: Route
    reason: str

    @property
    def read_only(self) -> bool:
        return self.route is Route.REPLICA


_READ = Verdict(Route.REPLICA, "read-only")
_WRITE_NODES: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_NOTABLE: Final = _WRITE_NODES | {"lockingClause", "FuncCall"}
_CONTAINERS: Final = (dict, list)
_FALSE_WORDS: Final = frozenset({"false", "off", "0", "no"})
#: Queries longer than this are classified but not cached (their text would pin memory).
MAX_CACHED_LENGTH: Final = 64 * 1024

# psycopg's placeholders (%s, %b, %t, %(name)s) and its escaped percent sign. They are
# rewritten to $1 / % before parsing; only the classification sees the rewrite.
_FORMAT_RE: Final = re.compile(r"%%|%\([^)]*\)[sbt]|%[sbt]")


def _dollar(match: re.Match[str]) -> str:
    return "%" if match.group() == "%%" else "$1"


class Classifier:
    """Classifies SQL strings, remembering up to ``cache_size`` verdicts.

    ``placeholders`` is ``"dollar"`` (asyncpg: ``$1``) or ``"format"`` (psycopg:
    ``%s``, ``%(name)s``); ``read_only_functions`` extends the built-in allowlist.
    """

    def __init__(
        self,
        *,
        read_only_functions: Iterable[str] = (),
        placeholders: str = "dollar",
        cache_size: int = 4096,
    ) -> None:
        if placeholders not in ("dollar", "format"):
            raise ConfigError("placeholders", f"must be 'dollar' or 'format', not {placeholders!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ConfigError("cache_size", f"must be a whole number >= 0, got {cache_size!r}")
        self.placeholders = placeholders
        self.cache_size = cache_size
        self._functions: frozenset[str] = READ_ONLY_FUNCTIONS
        self._cache: dict[str, Verdict] = {}
        self.hits = 0
        self.misses = 0
        self.allow_functions(read_only_functions)

    @property
    def functions(self) -> frozenset[str]:
        """Every function name currently treated as read-only."""
        return self._functions

    @property
    def cached(self) -> int:
        return len(self._cache)

    def allow_functions(self, names: Iterable[str]) -> None:
        """Treat ``names`` (``f`` or ``schema.f``) as read-only too; clears the cache."""
        added = {normalize_name(name) for name in names}
        refused = sorted(added & WRITE_FUNCTIONS)
        if refused:
            raise ConfigError(
                "read_only_functions", f"{', '.join(refused)} change data or session state"
            )
        bad = sorted(n for n in added if not n or n.count(".") > 1)
        if bad:
            raise ConfigError("read_only_functions", f"not a function name: {bad[0]!r}")
        if added - self._functions:
            self._functions = self._functions | added
            self._cache.clear()

    def classify(self, query: str) -> Verdict:
        """The verdict for ``query``; a dictionary lookup when it was seen before."""
        verdict = self._cache.get(query)
        if verdict is not None:
            self.hits += 1
            return verdict
        self.misses += 1
        verdict = self._analyse(query)
        if len(query) <= MAX_CACHED_LENGTH and self.cache_size:
            cache = self._cache
            if len(cache) >= self.cache_size:
                del cache[next(iter(cache))]  # the oldest entry
            cache[query] = verdict
        return verdict

    def route(self, query: str) -> Route:
        return self.classify(query).route

    # -- analysis (runs once per distinct query) ------------------------------------------

    def _analyse(self, query: str) -> Verdict:
        text = _FORMAT_RE.sub(_dollar, query) if self.placeholders == "format" else query
        try:
            tree = json.loads(parser.parse_sql_json(text))
        except parser.ParseError as exc:
            return Verdict(Route.PRIMARY, f"unparseable: {exc}")
        statements = tree.get("stmts") or []
        if not statements:
            return Verdict(Route.PRIMARY, "no statement")
        for raw in statements:
            reason = self._statement(raw["stmt"])
            if reason is not None:
                if len(statements) > 1:
                    reason += " (in a multi-statement string)"
                return Verdict(Route.PRIMARY, reason)
        return _READ

    def _statement(self, node: dict[str, Any]) -> str | None:
        """Why one statement needs the primary, or None if a replica may run it."""
        kind, body = next(iter(node.items()))
        if kind == "SelectStmt":
            return self._scan(body)
        if kind == "ExplainStmt":
            return self._explain(body)
        if kind == "VariableShowStmt":
            return None
        if kind == "CopyStmt":
            return self._copy(body)
        return f"{_describe(kind, body)} needs the primary"

    def _explain(self, body: dict[str, Any]) -> str | None:
        inner: dict[str, Any] = body["query"]
        inner_kind = next(iter(inner))
        if inner_kind == "ExecuteStmt":
            return "EXPLAIN EXECUTE uses a session's prepared statement"
        if not _explain_analyzes(body.get("options") or []):
            return None  # planned, never executed: safe anywhere
        reason = self._statement(inner)
        return None if reason is None else f"EXPLAIN ANALYZE runs it: {reason}"

    def _copy(self, body: dict[str, Any]) -> str | None:
        if body.get("is_from"):
            return "COPY FROM writes"
        if body.get("is_program") or body.get("filename"):
            return "COPY TO a server file or program"
        query = body.get("query")
        return None if query is None else self._statement(query)

    def _scan(self, root: dict[str, Any]) -> str | None:
        """Walk a SELECT's whole tree for anything that writes, locks or may."""
        if root.get("intoClause"):
            return "SELECT INTO creates a table"
        stack: list[Any] = [root]
        while stack:
            item = stack.pop()
            if type(item) is list:
                stack.extend(item)
                continue
            for key, value in item.items():
                if key in _NOTABLE:
                    reason = self._notable(key, value)
                    if reason is not None:
                        return reason
                if type(value) in _CONTAINERS:
                    stack.append(value)
        return None

    def _notable(self, key: str, value: Any) -> str | None:
        if key in _WRITE_NODES:
            return f"data-modifying {_STATEMENT_NAMES[key]} inside"
        if key == "lockingClause":
            return f"locking read ({_locking(value)})" if value else None
        name = self._unknown_function(value)  # a FuncCall
        return None if name is None else f"calls {name}(), not known to be read-only"

    def _unknown_function(self, call: dict[str, Any]) -> str | None:
        """The called function's name if it is not on the allowlist, else None."""
        parts = [p["String"]["sval"] for p in call.get("funcname", ()) if "String" in p]
        if not parts:
            return "(unnamed)"
        name = ".".join(parts)
        if len(parts) == 2 and parts[0] == "pg_catalog":
            name = parts[1]
        return None if name in self._functions else name


_STATEMENT_NAMES: Final = {
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}

_LOCK_NAMES: Final = {
    "LCS_FORUPDATE": "FOR UPDATE",
    "LCS_FORNOKEYUPDATE": "FOR NO KEY UPDATE",
    "LCS_FORSHARE": "FOR SHARE",
    "LCS_FORKEYSHARE": "FOR KEY SHARE",
}


def _locking(clauses: list[dict[str, Any]]) -> str:
    strength = clauses[0].get("LockingClause", {}).get("strength", "")
    return _LOCK_NAMES.get(strength, "FOR UPDATE/SHARE")


def _explain_analyzes(options: list[dict[str, Any]]) -> bool:
    """Does an EXPLAIN option list turn ANALYZE on (``ANALYZE``, ``(ANALYZE true)``)?"""
    for option in options:
        elem = option.get("DefElem", {})
        if elem.get("defname") != "analyze":
            continue
        arg = elem.get("arg")
        if arg is None:
            return True
        return _truthy(arg)
    return False


def _truthy(arg: dict[str, Any]) -> bool:
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval", False))
    if "String" in arg:
        return str(arg["String"].get("sval", "")).lower() not in _FALSE_WORDS
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival", 0))
    return True


def _describe(kind: str, body: dict[str, Any]) -> str:
    """A readable name for a statement node: ``InsertStmt`` -> ``INSERT``."""
    if kind in _STATEMENT_NAMES:
        return _STATEMENT_NAMES[kind]
    if kind == "TransactionStmt":
        return "transaction control"
    if kind == "VariableSetStmt":
        return "SET/RESET"
    name = kind.removesuffix("Stmt")
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).upper()
