"""PgBouncer's ``[pgbouncer]`` settings: names, types, defaults and value parsing.

:class:`ProxySettings` holds every setting PgBouncer 1.21+ knows (plus millpond's own),
each with PgBouncer's default and a parser that turns the file's text into a typed
value or a :class:`~millpond.errors.ConfigError` saying what is accepted. Reading whole
files (sections, ``%include``, database and user lines) is :mod:`millpond.proxy.config`.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal, TypeVar, get_args

from millpond.errors import ConfigError

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
    # millpond: in transaction/statement mode an idle client keeps its last server
    # connection until another client needs it (saves the release and the next take)
    server_affinity: bool = _bool(True)
    # millpond: serve transaction mode's simple queries in the compiled lane
    # (docs/proxy-data-path.md); 0 keeps every client on the Python path
    fast_lane: bool = _bool(True)

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
