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

import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, get_args
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

PoolMode = Literal["session", "transaction", "statement"]
AuthType = Literal["any", "trust", "plain", "md5", "cert", "hba", "ldap", "pam", "scram-sha-256"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
LoadBalanceHosts = Literal["disable", "round-robin"]
SessionPinning = Literal["pin", "reject"]
TargetSessionAttrs = Literal["any", "read-write", "read-only", "primary", "standby"]

#: PgBouncer's default ``auth_query``
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)
SECTIONS = ("databases", "pgbouncer", "peers", "users")
_INT_MAX = 2**31 - 1
_MAX_INCLUDE_DEPTH = 10
_T = TypeVar("_T")
Parser = Callable[[str], Any]


class _BadValue(ValueError):
    """A value parser's complaint; the caller adds the setting name and the source."""


# --------------------------------------------------------------------------- value parsers

_C_INT = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_SECONDS = re.compile(r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-z]*)")
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "min": 60.0, "h": 3600.0, "d": 86400.0}
_TRUE, _FALSE = ("1", "yes", "on", "true"), ("0", "no", "off", "false")
_TLS_PROTOCOLS = frozenset(
    ("all", "secure", "default", "legacy", "tlsv1", "tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3")
)


def _c_int(text: str) -> int:
    """An integer the way C's ``strtol(s, NULL, 0)`` reads it: 0x1F hex, 0777 octal."""
    if not _C_INT.fullmatch(text):
        raise _BadValue(f"{text!r} is not a whole number")
    digits = text.lstrip("+-")
    sign = -1 if text.startswith("-") else 1
    if digits[:2] in ("0x", "0X"):
        return sign * int(digits[2:], 16)
    return sign * int(digits, 8 if len(digits) > 1 and digits[0] == "0" else 10)


def _parse_int(text: str, lo: int = 0, hi: int = _INT_MAX) -> int:
    value = _c_int(text)
    if value < lo:
        raise _BadValue(f"must be at least {lo}, got {text}")
    if value > hi:
        raise _BadValue(f"must be at most {hi}, got {text}")
    return value


def _parse_seconds(text: str) -> float:
    match = _SECONDS.fullmatch(text)
    if match is None or match[2] not in _TIME_UNITS:
        raise _BadValue(
            f"{text!r} is not a duration: give seconds (e.g. 2.5) or a number with "
            "one of the units ms, s, min, h, d"
        )
    value = float(match[1]) * _TIME_UNITS[match[2]]
    if value < 0 or not math.isfinite(value):
        raise _BadValue(f"must be zero or more seconds, got {text}")
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    try:
        return _c_int(text) != 0
    except _BadValue:
        raise _BadValue(
            f"{text!r} is not a boolean: use 0/1, yes/no, on/off or true/false"
        ) from None


def _parse_enum(text: str, choices: tuple[str, ...]) -> str:
    if text.lower() not in choices:
        raise _BadValue(f"{text!r} is not one of {', '.join(choices)}")
    return text.lower()


def _parse_list(text: str) -> tuple[str, ...]:
    """A comma (or space) separated list, as PgBouncer reads its user lists."""
    return tuple(item for item in re.split(r"[,\s]+", text) if item)


def _parse_optional(text: str) -> str | None:
    return text or None


def _parse_tls_protocols(text: str) -> str:
    names = [name.lstrip("!-").lower() for name in re.split(r"[,:\s]+", text) if name]
    unknown = [name for name in names if name not in _TLS_PROTOCOLS]
    if not names or unknown:
        raise _BadValue(
            f"{text!r} is not a list of TLS protocols from {', '.join(sorted(_TLS_PROTOCOLS))}"
        )
    return text


def _parse_port_or_none(text: str) -> int | None:
    return _parse_int(text, 0, 65535) if text else None


def _parse_seconds_or_unset(text: str) -> float | None:
    """A per-database or per-user timeout, where PgBouncer reads -1 as "not set"."""
    return None if text == "-1" else _parse_seconds(text)


def _as_text(value: object) -> str | None:
    """The file form of a Python value (``None`` when it has none)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return ""
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    return None


def _normalize_fields(obj: object) -> None:
    """Check each field of a freshly built entry by parsing its file form, and keep the result.

    So ``ProxySettings(server_lifetime=60)`` stores ``60.0`` and a list becomes a tuple,
    while ``ProxySettings(pool_mode="sessions")`` raises like the file would.
    """
    for f in fields(obj):  # type: ignore[arg-type]  # called on dataclass instances only
        value = getattr(obj, f.name)
        if "parse" not in f.metadata or (value is None and f.default is None):
            continue
        text = _as_text(value)
        if text is None:
            raise ConfigError(f.name, f"unsupported value {value!r}")
        parsed = _apply(f.metadata["parse"], text, f.name, None)
        if parsed != (tuple(value) if isinstance(value, list) else value):
            raise ConfigError(f.name, f"{value!r} is not a valid value (did you mean {parsed!r}?)")
        object.__setattr__(obj, f.name, parsed)


# --------------------------------------------------------------------------- field helpers


def _field(default: _T, parse: Parser) -> _T:
    return field(default=default, metadata=_meta(parse))


def _int(default: int, lo: int = 0, hi: int = _INT_MAX) -> int:
    return _field(default, partial(_parse_int, lo=lo, hi=hi))


def _time(default: float) -> float:
    return _field(default, _parse_seconds)


def _bool(default: bool) -> bool:
    return _field(default, _parse_bool)


def _str(default: str) -> str:
    return _field(default, str)


def _opt() -> str | None:
    return _field(None, _parse_optional)


def _list(*default: str) -> tuple[str, ...]:
    return _field(default, _parse_list)


def _choice(choices: tuple[str, ...]) -> Parser:
    return partial(_parse_enum, choices=choices)


def _meta(parse: Parser) -> dict[str, Parser]:
    return {"parse": parse}


def _text() -> str | None:
    return _field(None, str)


def _opt_int(lo: int = 0, hi: int = _INT_MAX) -> int | None:
    return _field(None, partial(_parse_int, lo=lo, hi=hi))


def _opt_time() -> float | None:
    return _field(None, _parse_seconds_or_unset)


POOL_MODES: tuple[str, ...] = get_args(PoolMode)
AUTH_TYPES: tuple[str, ...] = get_args(AuthType)
SSL_MODES: tuple[str, ...] = get_args(SslMode)
# Literal-typed fields use field() itself: ruff's RUF009 cannot tell a Literal is immutable.
_POOL_MODE = _meta(_choice(POOL_MODES))
_AUTH_TYPE = _meta(_choice(AUTH_TYPES))
_SSL_MODE = _meta(_choice(SSL_MODES))
_LOAD_BALANCE = _meta(_choice(get_args(LoadBalanceHosts)))
_SESSION_ATTRS = _meta(_choice(get_args(TargetSessionAttrs)))
_PINNING = _meta(_choice(get_args(SessionPinning)))


# --------------------------------------------------------------------------- [pgbouncer]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """The ``[pgbouncer]`` section: PgBouncer's names, meanings and defaults.

    Durations are float seconds. Settings PgBouncer leaves "not set" are ``None``;
    comma lists are tuples. Every setting PgBouncer knows is here, implemented or not,
    so that an unchanged pgbouncer.ini loads.
    """

    # where to listen, and as whom
    listen_addr: tuple[str, ...] = _list()  # empty: Unix socket only; "*": all addresses
    listen_port: int = _int(6432, 0, 65535)
    listen_backlog: int = _int(128)
    unix_socket_dir: str = _str("/tmp")  # empty disables Unix sockets
    unix_socket_mode: int = _int(0o777, 0, 0o7777)
    unix_socket_group: str | None = _opt()
    user: str | None = _opt()
    so_reuseport: bool = _bool(False)
    peer_id: int = _int(0, 0, 16383)
    # client authentication
    auth_type: AuthType = field(default="md5", metadata=_AUTH_TYPE)
    auth_file: str | None = _opt()
    auth_hba_file: str | None = _opt()
    auth_ident_file: str | None = _opt()
    auth_ldap_options: str | None = _opt()
    auth_user: str | None = _opt()
    auth_query: str = _str(DEFAULT_AUTH_QUERY)
    auth_dbname: str | None = _opt()
    scram_iterations: int = _int(4096, 1)
    admin_users: tuple[str, ...] = _list()
    stats_users: tuple[str, ...] = _list()
    # pooling
    pool_mode: PoolMode = field(default="session", metadata=_POOL_MODE)
    max_client_conn: int = _int(100)
    default_pool_size: int = _int(20)
    min_pool_size: int = _int(0)
    reserve_pool_size: int = _int(0)
    reserve_pool_timeout: float = _time(5.0)
    max_db_connections: int = _int(0)  # 0: unlimited
    max_db_client_connections: int = _int(0)
    max_user_connections: int = _int(0)
    max_user_client_connections: int = _int(0)
    max_prepared_statements: int = _int(200)
    server_round_robin: bool = _bool(False)
    track_extra_parameters: tuple[str, ...] = _list("IntervalStyle")
    ignore_startup_parameters: tuple[str, ...] = _list()
    disable_pqexec: bool = _bool(False)
    application_name_add_host: bool = _bool(False)
    # server connections
    server_reset_query: str = _str("DISCARD ALL")
    server_reset_query_always: bool = _bool(False)
    server_check_query: str = _str("select 1")  # PgBouncer 1.24+ defaults to "<empty>"
    server_check_delay: float = _time(30.0)
    server_fast_close: bool = _bool(False)
    server_lifetime: float = _time(3600.0)
    server_idle_timeout: float = _time(600.0)
    server_connect_timeout: float = _time(15.0)
    server_login_retry: float = _time(15.0)
    autodb_idle_timeout: float = _time(3600.0)
    pool_idle_timeout: float = _time(0.0)
    # client-side timeouts (0 disables)
    client_login_timeout: float = _time(60.0)
    client_idle_timeout: float = _time(0.0)
    query_timeout: float = _time(0.0)
    query_wait_timeout: float = _time(120.0)
    query_wait_notify: float = _time(5.0)
    cancel_wait_timeout: float = _time(10.0)
    idle_transaction_timeout: float = _time(0.0)
    transaction_timeout: float = _time(0.0)
    suspend_timeout: float = _time(10.0)
    # DNS
    dns_max_ttl: float = _time(15.0)
    dns_nxdomain_ttl: float = _time(15.0)
    dns_zone_check_period: float = _time(0.0)
    resolv_conf: str | None = _opt()
    # logging and the admin console
    logfile: str | None = _opt()
    pidfile: str | None = _opt()
    syslog: bool = _bool(False)
    syslog_ident: str = _str("pgbouncer")
    syslog_facility: str = _str("daemon")
    log_connections: bool = _bool(True)
    log_disconnections: bool = _bool(True)
    log_pooler_errors: bool = _bool(True)
    log_stats: bool = _bool(True)
    stats_period: int = _int(60, 1)
    verbose: int = _int(0)
    login_notify_message: str | None = _opt()
    job_name: str = _str("pgbouncer")
    service_name: str = _str("pgbouncer")
    conffile: str | None = _opt()  # load_config sets it to the file it read
    # low-level network
    pkt_buf: int = _int(4096)
    max_packet_size: int = _int(2147483647, 0, 2**32 - 1)
    sbuf_loopcnt: int = _int(5)
    tcp_defer_accept: bool = _bool(sys.platform.startswith("linux"))
    tcp_socket_buffer: int = _int(0)
    tcp_keepalive: bool = _bool(True)
    tcp_keepcnt: int = _int(0)
    tcp_keepidle: int = _int(0)
    tcp_keepintvl: int = _int(0)
    tcp_user_timeout: int = _int(0)  # milliseconds
    # TLS towards clients
    client_tls_sslmode: SslMode = field(default="disable", metadata=_SSL_MODE)
    client_tls_key_file: str | None = _opt()
    client_tls_cert_file: str | None = _opt()
    client_tls_ca_file: str | None = _opt()
    client_tls_protocols: str = _field("secure", _parse_tls_protocols)
    client_tls_ciphers: str = _str("default")
    client_tls13_ciphers: str | None = _opt()
    client_tls_dheparams: str = _str("auto")
    client_tls_ecdhcurve: str = _str("auto")
    # TLS towards servers
    server_tls_sslmode: SslMode = field(default="prefer", metadata=_SSL_MODE)
    server_tls_key_file: str | None = _opt()
    server_tls_cert_file: str | None = _opt()
    server_tls_ca_file: str | None = _opt()
    server_tls_protocols: str = _field("secure", _parse_tls_protocols)
    server_tls_ciphers: str = _str("default")
    server_tls13_ciphers: str | None = _opt()
    # millpond additions: the metrics/health HTTP endpoint (off unless a port is set)
    stats_listen_addr: str | None = _opt()
    stats_listen_port: int | None = _field(None, _parse_port_or_none)
    # millpond: what transaction mode does with session state that cannot move
    # between server connections: "pin" the client to its server, or "reject" it.
    session_pinning: SessionPinning = field(default="pin", metadata=_PINNING)

    def __post_init__(self) -> None:
        _normalize_fields(self)


def _parsers(cls: type) -> dict[str, Parser]:
    return {f.name: f.metadata["parse"] for f in fields(cls) if "parse" in f.metadata}


_SETTING_PARSERS = _parsers(ProxySettings)
#: every name the ``[pgbouncer]`` section accepts
SETTING_NAMES = frozenset(_SETTING_PARSERS)


def _hint(name: str, known: frozenset[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name.lower(), sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply(parse: Parser, text: str, setting: str, source: str | None) -> Any:
    try:
        return parse(text)
    except _BadValue as exc:
        raise ConfigError(setting, str(exc), source=source) from None


def parse_setting(name: str, text: str, *, source: str | None = None) -> Any:
    """Parse one ``[pgbouncer]`` value from its text form (as in the file, or ``SET``)."""
    parse = _SETTING_PARSERS.get(name)
    if parse is None:
        raise ConfigError(name, "unknown setting" + _hint(name, SETTING_NAMES), source=source)
    return _apply(parse, text, name, source)


# --------------------------------------------------------------------------- entries


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
