"""Read an unchanged PgBouncer configuration into frozen, validated, typed settings.

The file format is PgBouncer's own: ``[section]`` headers, ``key = value`` lines, ``;``
or ``#`` comment lines (only at the start of a line, so ``pool_mode = session ; x`` is
an invalid pool mode, as in PgBouncer), and ``%include FILE`` (a relative name is taken
from the current directory, as in PgBouncer). Setting names, section names and
connection-string keys are case-sensitive; enumerated values are not. The
``[pgbouncer]`` section is required, and each ``[pgbouncer]`` header resets the
settings to their defaults, both as in PgBouncer.

millpond is stricter than PgBouncer in one way: whatever PgBouncer would log and skip
(an unknown setting, section or connection parameter, a malformed auth file or HBA
line) is an error here. It is more lenient in two ways, both extensions PgBouncer
itself would refuse: time settings also take a unit (``ms``, ``s``, ``min``, ``h``,
``d``; PgBouncer takes plain seconds), and boolean settings also take
``yes``/``no``/``on``/``off``/``true``/``false`` (PgBouncer takes an integer).

Loading is pure: :func:`load_config` returns a new :class:`ProxyConfig` or raises a
:class:`~millpond.errors.ConfigError` carrying ``file:line``; nothing else changes, so a
reload can build the new config first and swap it in only when that succeeds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from millpond.errors import ConfigError
from millpond.proxy.authfile import (
    WHITESPACE,
    AuthFile,
    HbaRules,
    load_auth_file,
    load_hba_file,
    read_text_file,
    scan_quoted,
)
from millpond.proxy.settings import (
    _LOAD_BALANCE,
    _MAX_INCLUDE_DEPTH,
    _PINNING,
    _POOL_MODE,
    _SESSION_ATTRS,
    DEFAULT_AUTH_QUERY,
    SECTIONS,
    SETTING_NAMES,
    LoadBalanceHosts,
    Parser,
    PoolMode,
    ProxySettings,
    SessionPinning,
    TargetSessionAttrs,
    _apply,
    _as_text,
    _hint,
    _int,
    _meta,
    _normalize_fields,
    _opt_int,
    _opt_time,
    _parse_int,
    _parsers,
    _text,
    parse_setting,
)
from millpond.proxy.tcp import socket_options


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseEntry:
    """One ``[databases]`` line; ``None`` means "inherit" (or "not set")."""

    name: str
    source: str | None = None
    dbname: str | None = _text()  # None: the client's database name
    host: str | None = _text()  # None: Unix socket; may be a comma list
    port: int = _int(5432, 1, 65535)
    user: str | None = _text()  # forced user: one pool per database
    password: str | None = field(default=None, repr=False, metadata=_meta(str))
    auth_user: str | None = _text()
    auth_query: str | None = _text()
    auth_dbname: str | None = _text()
    pool_size: int | None = _opt_int()
    min_pool_size: int | None = _opt_int()
    reserve_pool_size: int | None = _opt_int()
    max_db_connections: int | None = _opt_int()
    max_db_client_connections: int | None = _opt_int()
    pool_mode: PoolMode | None = field(default=None, metadata=_POOL_MODE)
    server_lifetime: float | None = _opt_time()
    query_wait_timeout: float | None = _opt_time()
    load_balance_hosts: LoadBalanceHosts = field(default="round-robin", metadata=_LOAD_BALANCE)
    target_session_attrs: TargetSessionAttrs = field(default="any", metadata=_SESSION_ATTRS)
    connect_query: str | None = _text()
    session_pinning: SessionPinning | None = field(default=None, metadata=_PINNING)
    client_encoding: str | None = _text()
    datestyle: str | None = _text()
    timezone: str | None = _text()
    application_name: str | None = _text()

    def __post_init__(self) -> None:
        _normalize_fields(self)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts to connect to, in order (empty for the default Unix socket)."""
        return tuple(h.strip() for h in self.host.split(",") if h.strip()) if self.host else ()

    def for_client_database(self, name: str) -> DatabaseEntry:
        """This entry as the ``*`` fallback applies it to a client asking for ``name``."""
        return replace(self, name=name, dbname=self.dbname or name)


@dataclass(frozen=True, slots=True, kw_only=True)
class UserEntry:
    """One ``[users]`` line; ``None`` means "inherit from the database or globals"."""

    name: str
    source: str | None = None
    pool_mode: PoolMode | None = field(default=None, metadata=_POOL_MODE)
    pool_size: int | None = _opt_int()
    reserve_pool_size: int | None = _opt_int()
    max_user_connections: int | None = _opt_int()
    max_user_client_connections: int | None = _opt_int()
    query_timeout: float | None = _opt_time()
    query_wait_timeout: float | None = _opt_time()
    idle_transaction_timeout: float | None = _opt_time()
    transaction_timeout: float | None = _opt_time()
    client_idle_timeout: float | None = _opt_time()

    def __post_init__(self) -> None:
        _normalize_fields(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEntry:
    """One ``[peers]`` line (kept for PgBouncer compatibility; millpond does not peer)."""

    peer_id: int
    source: str | None = None
    host: str | None = _text()
    port: int = _int(6432, 1, 65535)
    pool_size: int | None = _opt_int()

    def __post_init__(self) -> None:
        _normalize_fields(self)


_ENTRY_PARSERS: dict[type, dict[str, Parser]] = {
    cls: _parsers(cls) for cls in (DatabaseEntry, UserEntry, PeerEntry)
}
_DB_ALIASES = {"reserve_pool": "reserve_pool_size"}
_E = TypeVar("_E", DatabaseEntry, UserEntry, PeerEntry)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def _skip_to_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] not in WHITESPACE:
        pos += 1
    return pos


def _connstr_value(text: str, pos: int, setting: str, source: str | None) -> tuple[str, int]:
    if text[pos : pos + 1] == "'":
        found = scan_quoted(text, pos)
        if found is None:
            raise ConfigError(setting, "unterminated quoted value", source=source)
        if found[1] < len(text) and text[found[1]] not in WHITESPACE:
            raise ConfigError(setting, "expected a space after the quoted value", source=source)
        value, pos = found
    else:
        end = _skip_to_ws(text, pos)
        value, pos = text[pos:end], end
    if not value:
        raise ConfigError(setting, "empty value", source=source)
    return value, pos


def parse_connstr(text: str, setting: str, source: str | None = None) -> list[tuple[str, str]]:
    """Split ``key=value key='quoted ''value'''`` pairs as PgBouncer's loader does."""
    pairs: list[tuple[str, str]] = []
    pos = _skip_ws(text, 0)
    while pos < len(text):
        key_end = pos
        while key_end < len(text) and text[key_end] != "=" and text[key_end] not in WHITESPACE:
            key_end += 1
        equals = _skip_ws(text, key_end)
        if key_end == pos or text[equals : equals + 1] != "=":
            raise ConfigError(setting, f"expected key=value at {text[pos:]!r}", source=source)
        key = text[pos:key_end]
        value, pos = _connstr_value(text, _skip_ws(text, equals + 1), f"{setting}.{key}", source)
        pairs.append((key, value))
        pos = _skip_ws(text, pos)
    return pairs


def _build_entry(
    cls: type[_E],
    fixed: dict[str, Any],
    pairs: list[tuple[str, str]],
    setting: str,
    source: str | None,
) -> _E:
    parsers = _ENTRY_PARSERS[cls]
    kwargs: dict[str, Any] = {}
    for key, text in pairs:
        key = _DB_ALIASES.get(key, key) if cls is DatabaseEntry else key
        if key not in parsers:
            accepted = ", ".join(sorted(parsers))
            raise ConfigError(
                f"{setting}.{key}", f"unknown parameter; accepted: {accepted}", source=source
            )
        kwargs[key] = _apply(parsers[key], text, f"{setting}.{key}", source)
    return cls(**fixed, **kwargs, source=source)


def parse_database(name: str, value: str, source: str | None = None) -> DatabaseEntry:
    """Parse one ``[databases]`` line (``*`` is the fallback for unlisted names)."""
    if name == "pgbouncer":
        raise ConfigError(
            "databases.pgbouncer", "the name is reserved for the admin console", source=source
        )
    setting = f"databases.{name}"
    return _build_entry(
        DatabaseEntry, {"name": name}, parse_connstr(value, setting, source), setting, source
    )


def parse_user(name: str, value: str, source: str | None = None) -> UserEntry:
    """Parse one ``[users]`` line."""
    setting = f"users.{name}"
    return _build_entry(
        UserEntry, {"name": name}, parse_connstr(value, setting, source), setting, source
    )


def parse_peer(name: str, value: str, source: str | None = None) -> PeerEntry:
    """Parse one ``[peers]`` line; the key is the peer id and ``host`` is required."""
    setting = f"peers.{name}"
    peer_id = _apply(partial(_parse_int, lo=1, hi=65535), name, setting, source)
    pairs = parse_connstr(value, setting, source)
    peer = _build_entry(PeerEntry, {"peer_id": peer_id}, pairs, setting, source)
    if peer.host is None:
        raise ConfigError(f"{setting}.host", "a peer needs a host", source=source)
    return peer


# --------------------------------------------------------------------------- the INI file


@dataclass(frozen=True, slots=True)
class IniLine:
    """One statement of a PgBouncer INI file: a ``[section]`` header or a ``key = value``."""

    kind: Literal["section", "key"]
    name: str
    value: str
    source: str


_BARE_KEY = re.compile(r"[A-Za-z0-9_.*-]*")


def _ini_key(text: str, source: str) -> tuple[str, str]:
    """The name at the start of a line (bare, or quoted for odd database names) and the rest."""
    if text[0] in "'\"":
        found = scan_quoted(text, 0)
        if found is None or not found[0]:
            raise ConfigError(
                text.rstrip(WHITESPACE), "unterminated or empty quoted name", source=source
            )
        return found[0], text[found[1] :]
    end = _BARE_KEY.match(text).end()  # type: ignore[union-attr]  # a * pattern always matches
    return text[:end], text[end:]


def _key_value(text: str, source: str) -> IniLine:
    key, rest = _ini_key(text, source)
    rest = rest.lstrip(" \t")
    if not key or not rest.startswith("="):
        line = text.rstrip(WHITESPACE)
        raise ConfigError(key or "syntax", f"expected 'name = value', got {line!r}", source=source)
    return IniLine("key", key, rest[1:].lstrip(" \t").rstrip(WHITESPACE), source)


def _include(name: str, source: str, out: list[IniLine], depth: int) -> None:
    if not name:
        raise ConfigError("%include", "missing file name", source=source)
    if depth >= _MAX_INCLUDE_DEPTH:
        raise ConfigError("%include", f"nested more than {_MAX_INCLUDE_DEPTH} deep", source=source)
    path = Path(name)
    _scan(path, read_text_file(path, "%include", source), out, depth + 1)


def _statement(text: str, source: str, out: list[IniLine], depth: int) -> str:
    """Handle the statement ``text`` starts with; return what is left of the line."""
    if text.startswith("%include") and text[8:9] in (" ", "\t"):
        _include(text[9:].strip(WHITESPACE), source, out, depth)
    elif text[0] == "[":
        end = text.find("]")
        if end < 0:
            raise ConfigError(
                text.rstrip(WHITESPACE), "no closing ']' in section header", source=source
            )
        out.append(IniLine("section", text[1:end], "", source))
        return text[end + 1 :].lstrip(WHITESPACE)  # PgBouncer reads on after the ']'
    elif text[0] not in "#;":
        out.append(_key_value(text, source))
    return ""


def _scan(path: Path | str, text: str, out: list[IniLine], depth: int) -> None:
    for number, line in enumerate(text.split("\n"), start=1):
        rest, source = line.lstrip(WHITESPACE), f"{path}:{number}"
        while rest:
            rest = _statement(rest, source, out, depth)


def parse_ini(text: str, path: Path | str = "<config>") -> list[IniLine]:
    """Split INI text into its statements, reading any ``%include`` files it names."""
    lines: list[IniLine] = []
    _scan(path, text, lines, 0)
    return lines


def read_ini(path: Path | str) -> list[IniLine]:
    """Read an INI file into its statements, following ``%include``."""
    return parse_ini(read_text_file(Path(path), "conffile", None), path)


# --------------------------------------------------------------------------- the whole config


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything a pgbouncer.ini says, validated. To reload, load a new one.

    ``auth`` is the parsed ``auth_file`` (when set) and ``hba`` the parsed
    ``auth_hba_file`` (when ``auth_type`` is ``hba``). ``setting_sources`` maps each
    setting given explicitly to where it was given (``file:line``).
    """

    settings: ProxySettings
    databases: Mapping[str, DatabaseEntry]
    users: Mapping[str, UserEntry]
    source: Path | None = None
    peers: Mapping[int, PeerEntry] = field(default_factory=dict)
    auth: AuthFile | None = None
    hba: HbaRules | None = None
    setting_sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("databases", "users", "peers", "setting_sources"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def database(self, name: str) -> DatabaseEntry | None:
        """The entry serving client database ``name``: its own line, else the ``*`` fallback."""
        entry = self.databases.get(name)
        fallback = self.databases.get("*")
        if entry is None and fallback is not None and name != "pgbouncer":
            return fallback.for_client_database(name)
        return entry


@dataclass
class _Loader:
    """The mutable state of one load; it never outlives :func:`load_config`."""

    settings: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    databases: dict[str, DatabaseEntry] = field(default_factory=dict)
    users: dict[str, UserEntry] = field(default_factory=dict)
    peers: dict[int, PeerEntry] = field(default_factory=dict)
    section: str | None = None
    has_main: bool = False

    def enter(self, line: IniLine) -> None:
        if line.name not in SECTIONS:
            known = ", ".join(f"[{name}]" for name in SECTIONS)
            hint = _hint(line.name, SECTIONS)
            raise ConfigError(
                f"[{line.name}]", f"unknown section; use {known}{hint}", source=line.source
            )
        self.section = line.name
        if line.name == "pgbouncer":  # as in PgBouncer, each header resets to the defaults
            self.settings.clear()
            self.sources.clear()
            self.has_main = True

    def apply(self, line: IniLine) -> None:
        if line.kind == "section":
            self.enter(line)
        elif self.section is None:
            raise ConfigError(line.name, "appears before any [section] header", source=line.source)
        elif self.section == "pgbouncer":
            self.settings[line.name] = parse_setting(line.name, line.value, source=line.source)
            self.sources[line.name] = line.source
        elif self.section == "databases":
            self.databases[line.name] = parse_database(line.name, line.value, line.source)
        elif self.section == "users":
            self.users[line.name] = parse_user(line.name, line.value, line.source)
        else:
            peer = parse_peer(line.name, line.value, line.source)
            self.peers[peer.peer_id] = peer


def _check(settings: ProxySettings, sources: Mapping[str, str]) -> None:
    """Refuse combinations PgBouncer would refuse at startup."""
    if settings.auth_type == "hba" and not settings.auth_hba_file:
        raise ConfigError(
            "auth_hba_file", "must be set when auth_type is hba", source=sources.get("auth_type")
        )
    socket_options(settings, sources)  # a tcp_* setting this platform cannot apply
    mode = settings.client_tls_sslmode
    if mode != "disable" and not (settings.client_tls_key_file and settings.client_tls_cert_file):
        raise ConfigError(
            "client_tls_sslmode",
            f"{mode} needs client_tls_key_file and client_tls_cert_file",
            source=sources.get("client_tls_sslmode"),
        )


def _finish(settings: ProxySettings, loaded: _Loader, path: Path | None) -> ProxyConfig:
    _check(settings, loaded.sources)
    auth_file, hba_file = settings.auth_file, settings.auth_hba_file
    auth = load_auth_file(auth_file, source=loaded.sources.get("auth_file")) if auth_file else None
    if settings.auth_type != "hba":
        hba_file = None
    hba = load_hba_file(hba_file, source=loaded.sources.get("auth_hba_file")) if hba_file else None
    return ProxyConfig(
        settings, loaded.databases, loaded.users, path, loaded.peers, auth, hba, loaded.sources
    )


def load_config(path: Path | str) -> ProxyConfig:
    """Read a pgbouncer.ini (and its includes, auth file and HBA file) into a ProxyConfig.

    Raises :class:`~millpond.errors.ConfigError` naming the setting and ``file:line``.
    """
    path = Path(path)
    loaded = _Loader()
    for line in read_ini(path):
        loaded.apply(line)
    if not loaded.has_main:
        raise ConfigError("[pgbouncer]", "the section is missing", source=str(path))
    loaded.settings.setdefault("conffile", str(path))
    return _finish(ProxySettings(**loaded.settings), loaded, path)


# --------------------------------------------------------------------------- command line

_LISTEN = re.compile(r"\[([^\]]+)\]:([0-9]+)|([^\[\]:]+):([0-9]+)")


def _parse_listen(listen: str) -> tuple[str, int]:
    match = _LISTEN.fullmatch(listen.strip())
    if match is None:
        raise ConfigError(
            "listen", f"{listen!r} is not HOST:PORT (like 127.0.0.1:6432, *:6432 or [::1]:6432)"
        )
    port = _apply(partial(_parse_int, lo=0, hi=65535), match[2] or match[4], "listen", None)
    return match[1] or match[3], port


def _url_params(url: str) -> list[tuple[str, str]]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("backend", f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            "backend", f"expected a postgresql://user:password@host:port/db URL, got {url!r}"
        )
    found = {
        "host": parts.hostname,
        "port": port,
        "dbname": parts.path[1:],
        "user": parts.username,
        "password": parts.password,
    }
    params = [(key, unquote(str(value))) for key, value in found.items() if value not in (None, "")]
    return params + [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if v]


def _backend_databases(url: str) -> tuple[dict[str, DatabaseEntry], str | None]:
    """The ``*`` entry (and a named one) for ``--backend``, plus any ``sslmode`` it gave."""
    params = dict(_url_params(url))
    sslmode = params.pop("sslmode", None)
    entry = _build_entry(DatabaseEntry, {"name": "*"}, list(params.items()), "backend", "--backend")
    databases = {"*": replace(entry, dbname=None)}
    if entry.dbname is not None:
        named = parse_database(entry.dbname, "", "--backend")  # refuses the reserved name
        databases[named.name] = replace(entry, name=named.name)
    return databases, sslmode


def _override_text(name: str, value: object) -> str:
    text = _as_text(value)
    if text is None:
        raise ConfigError(name, f"unsupported value {value!r}", source="override")
    return text


def _set(loaded: _Loader, name: str, text: str, source: str) -> None:
    loaded.settings[name] = parse_setting(name, text, source=source)
    loaded.sources[name] = source


def config_from_args(listen: str, backend_url: str, **overrides: object) -> ProxyConfig:
    """The config for ``millpond proxy --listen HOST:PORT --backend postgresql://...``.

    The backend URL becomes the ``*`` fallback database (clients' database names pass
    through to that server); a database named in the URL also gets its own entry. The
    URL's user and password are the forced server login; query parameters are
    ``[databases]`` parameters (``pool_size=5``), except ``sslmode``, which sets
    ``server_tls_sslmode``. ``overrides`` are ``[pgbouncer]`` settings, as text or as
    Python values (numbers, booleans, lists of strings), and win over the arguments.
    """
    host, port = _parse_listen(listen)
    databases, sslmode = _backend_databases(backend_url)
    loaded = _Loader(databases=databases)
    _set(loaded, "listen_addr", host, "--listen")
    _set(loaded, "listen_port", str(port), "--listen")
    if sslmode is not None:
        _set(loaded, "server_tls_sslmode", sslmode, "--backend")
    for name, value in overrides.items():
        _set(loaded, name, _override_text(name, value), "override")
    return _finish(ProxySettings(**loaded.settings), loaded, None)


# ProxySettings and its helpers live in millpond.proxy.settings; they are re-exported
# here because a config is what most callers ask for.
__all__ = [
    "DEFAULT_AUTH_QUERY",
    "SETTING_NAMES",
    "DatabaseEntry",
    "PeerEntry",
    "ProxyConfig",
    "ProxySettings",
    "UserEntry",
    "config_from_args",
    "load_config",
    "parse_connstr",
    "parse_database",
    "parse_ini",
    "parse_peer",
    "parse_setting",
    "parse_user",
    "read_ini",
]
