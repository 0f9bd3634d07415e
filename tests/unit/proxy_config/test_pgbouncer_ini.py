"""A realistic pgbouncer.ini loads into the values PgBouncer would use."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from millpond.errors import ConfigError
from millpond.proxy.config import (
    DEFAULT_AUTH_QUERY,
    SETTING_NAMES,
    DatabaseEntry,
    ProxySettings,
    UserEntry,
    load_config,
    parse_ini,
    parse_setting,
)
from tests.unit.proxy_config.conftest import WriteFile

SAMPLE = """\
;; PgBouncer configuration, written in the style of the sample shipped with PgBouncer.
;; database name = connect string
[databases]

; foodb over Unix socket
foodb =

; redirect bardb to bazdb on localhost
bardb = host=localhost dbname=bazdb

; access to the destination database goes with a single user
forcedb = host=127.0.0.1 port=5433 user=baz password='s3cr''et' connect_query='SELECT 1'
encdb = client_encoding=UNICODE datestyle=ISO

; custom pool sizes and modes
nondefaultdb = pool_size=50 reserve_pool=10 min_pool_size=5 pool_mode=transaction
limited = max_db_connections=80 max_db_client_connections=200 server_lifetime=60
replicas = host=10.0.0.1,10.0.0.2 load_balance_hosts=disable target_session_attrs=read-only
"odd-name.db" = host=db.internal dbname=odd application_name=reporting timezone=UTC

; fallback connect string
* = host=testserver

[users]
alice = pool_mode=session max_user_connections=10
batch = pool_mode=statement query_timeout=30 idle_transaction_timeout=5

[peers]
1 = host=/tmp/pgbouncer1
2 = host=10.0.0.7 port=6433 pool_size=4

[pgbouncer]
;;; Administrative settings
logfile = /var/log/pgbouncer/pgbouncer.log
pidfile = /var/run/pgbouncer/pgbouncer.pid

;;; Where to wait for clients
listen_addr = 127.0.0.1, ::1
listen_port = 6543
unix_socket_dir = /var/run/postgresql
unix_socket_mode = 0770
unix_socket_group = postgres

;;; Authentication settings
auth_type = scram-sha-256
auth_file = {auth_file}
auth_user = pgbouncer
auth_dbname = postgres

;;; Users allowed into database 'pgbouncer'
admin_users = postgres, ops
stats_users = stats, monitoring

;;; Pooler personality questions
pool_mode = transaction
server_reset_query = DISCARD ALL
server_reset_query_always = 0
ignore_startup_parameters = extra_float_digits,options
server_check_query = select 1
server_check_delay = 10
max_prepared_statements = 100
application_name_add_host = 1

;;; Connection limits
max_client_conn = 1000
default_pool_size = 25
min_pool_size = 2
reserve_pool_size = 5
reserve_pool_timeout = 3
max_db_connections = 50
max_user_connections = 40
server_round_robin = 1

;;; Logging
log_connections = 0
log_disconnections = 1
log_pooler_errors = yes
stats_period = 30
verbose = 1

;;; Timeouts
server_lifetime = 1200
server_idle_timeout = 60
server_connect_timeout = 5
server_login_retry = 2.5
query_timeout = 0
query_wait_timeout = 30
client_idle_timeout = 0
client_login_timeout = 15
idle_transaction_timeout = 120
autodb_idle_timeout = 600
dns_max_ttl = 30

;;; TLS
client_tls_sslmode = disable
server_tls_sslmode = verify-full
server_tls_ca_file = /etc/ssl/certs/ca.pem
server_tls_protocols = tlsv1.2,tlsv1.3

;;; Low-level tuning options
pkt_buf = 8192
max_packet_size = 4194304
listen_backlog = 4096
tcp_keepalive = 1
tcp_keepidle = 60
tcp_keepintvl = 10
tcp_keepcnt = 6
"""

SCRAM = (
    "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$"
    "ZKKzjBVhxfNoMCd3MQVd5aD3DCO1Vmr4dAeY6Y1YqoE=:"
    "tPRLvaq0Jf5lkS1nK1HGyaEcqhNr+v1ai9f5+IyAbkg="
)


def line_of(text: str) -> int:
    """The 1-based line of SAMPLE that starts with ``text``."""
    return next(n for n, line in enumerate(SAMPLE.splitlines(), 1) if line.startswith(text))


@pytest.fixture
def sample_path(write: WriteFile) -> Path:
    auth = write(f'"postgres" "md5{"a" * 32}"\n"pgbouncer" "{SCRAM}"\n', "userlist.txt")
    return write(SAMPLE.format(auth_file=auth))


def test_sample_settings(sample_path: Path) -> None:
    s = load_config(sample_path).settings
    assert s.listen_addr == ("127.0.0.1", "::1")
    assert (s.listen_port, s.unix_socket_mode, s.unix_socket_group) == (6543, 0o770, "postgres")
    assert (s.auth_type, s.auth_user, s.auth_dbname) == ("scram-sha-256", "pgbouncer", "postgres")
    assert s.admin_users == ("postgres", "ops")
    assert s.stats_users == ("stats", "monitoring")
    assert s.ignore_startup_parameters == ("extra_float_digits", "options")
    assert (s.pool_mode, s.max_client_conn, s.default_pool_size) == ("transaction", 1000, 25)
    assert (s.server_round_robin, s.application_name_add_host) == (True, True)
    assert (s.log_connections, s.log_disconnections, s.log_pooler_errors) == (False, True, True)
    assert (s.server_lifetime, s.server_login_retry, s.reserve_pool_timeout) == (1200, 2.5, 3)
    assert (s.server_tls_sslmode, s.server_tls_protocols) == ("verify-full", "tlsv1.2,tlsv1.3")
    assert (s.pkt_buf, s.max_packet_size, s.tcp_keepcnt) == (8192, 4194304, 6)
    assert s.logfile == "/var/log/pgbouncer/pgbouncer.log"
    assert s.conffile == str(sample_path)


def test_sample_databases(sample_path: Path) -> None:
    dbs = load_config(sample_path).databases
    assert set(dbs) == {
        *("foodb", "bardb", "forcedb", "encdb", "nondefaultdb", "limited", "replicas"),
        *("odd-name.db", "*"),
    }
    assert (dbs["foodb"].host, dbs["foodb"].port, dbs["foodb"].dbname) == (None, 5432, None)
    assert (dbs["bardb"].host, dbs["bardb"].dbname) == ("localhost", "bazdb")
    forced = dbs["forcedb"]
    assert (forced.user, forced.password, forced.port) == ("baz", "s3cr'et", 5433)
    assert forced.connect_query == "SELECT 1"
    assert (dbs["encdb"].client_encoding, dbs["encdb"].datestyle) == ("UNICODE", "ISO")
    assert "s3cr" not in repr(forced)
    custom = dbs["nondefaultdb"]
    assert (custom.pool_size, custom.reserve_pool_size, custom.min_pool_size) == (50, 10, 5)
    assert custom.pool_mode == "transaction"
    limited = dbs["limited"]
    assert (limited.max_db_connections, limited.max_db_client_connections) == (80, 200)
    assert limited.server_lifetime == 60
    assert dbs["replicas"].hosts == ("10.0.0.1", "10.0.0.2")
    assert dbs["replicas"].load_balance_hosts == "disable"
    assert dbs["replicas"].target_session_attrs == "read-only"
    assert dbs["odd-name.db"].application_name == "reporting"
    assert dbs["forcedb"].source == f"{sample_path}:{line_of('forcedb =')}"


def test_sample_users_peers_and_auth(sample_path: Path) -> None:
    config = load_config(sample_path)
    assert config.users["alice"].max_user_connections == 10
    assert (config.users["batch"].pool_mode, config.users["batch"].query_timeout) == (
        "statement",
        30,
    )
    assert config.peers[2].port == 6433
    assert config.peers[1].host == "/tmp/pgbouncer1"
    assert config.auth is not None
    assert [config.auth.entries[u].kind for u in ("postgres", "pgbouncer")] == [
        "md5",
        "scram-sha-256",
    ]
    assert config.hba is None
    assert config.setting_sources["listen_port"] == f"{sample_path}:{line_of('listen_port')}"


def test_star_fallback(sample_path: Path) -> None:
    config = load_config(sample_path)
    auto = config.database("anything")
    assert auto is not None
    assert (auto.name, auto.dbname, auto.host) == ("anything", "anything", "testserver")
    assert config.database("bardb") == config.databases["bardb"]
    assert config.database("pgbouncer") is None


def test_no_fallback_without_star(write: WriteFile) -> None:
    config = load_config(write("[databases]\nx = host=h\n[pgbouncer]\n"))
    assert config.database("y") is None


def test_star_with_dbname_sends_everyone_there(write: WriteFile) -> None:
    config = load_config(write("[databases]\n* = host=h dbname=shared\n[pgbouncer]\n"))
    entry = config.database("whatever")
    assert entry is not None
    assert (entry.name, entry.dbname) == ("whatever", "shared")


#: PgBouncer's documented defaults (config.md and the settings table in main.c)
PGBOUNCER_DEFAULTS: dict[str, object] = {
    "listen_addr": (), "listen_port": 6432, "listen_backlog": 128, "unix_socket_dir": "/tmp",
    "unix_socket_mode": 0o777, "unix_socket_group": None, "user": None, "so_reuseport": False,
    "peer_id": 0, "auth_type": "md5", "auth_file": None, "auth_hba_file": None,
    "auth_ident_file": None, "auth_ldap_options": None, "auth_user": None,
    "auth_query": "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword "
    "END FROM pg_authid WHERE rolname=$1 AND rolcanlogin",
    "auth_dbname": None, "scram_iterations": 4096, "admin_users": (), "stats_users": (),
    "pool_mode": "session", "max_client_conn": 100, "default_pool_size": 20, "min_pool_size": 0,
    "reserve_pool_size": 0, "reserve_pool_timeout": 5.0, "max_db_connections": 0,
    "max_db_client_connections": 0, "max_user_connections": 0, "max_user_client_connections": 0,
    "max_prepared_statements": 200, "server_round_robin": False,
    "track_extra_parameters": ("IntervalStyle",), "ignore_startup_parameters": (),
    "disable_pqexec": False, "application_name_add_host": False,
    "server_reset_query": "DISCARD ALL", "server_reset_query_always": False,
    "server_check_query": "select 1", "server_check_delay": 30.0, "server_fast_close": False,
    "server_lifetime": 3600.0, "server_idle_timeout": 600.0, "server_connect_timeout": 15.0,
    "server_login_retry": 15.0, "autodb_idle_timeout": 3600.0, "pool_idle_timeout": 0.0,
    "client_login_timeout": 60.0, "client_idle_timeout": 0.0, "query_timeout": 0.0,
    "query_wait_timeout": 120.0, "query_wait_notify": 5.0, "cancel_wait_timeout": 10.0,
    "idle_transaction_timeout": 0.0, "transaction_timeout": 0.0, "suspend_timeout": 10.0,
    "dns_max_ttl": 15.0, "dns_nxdomain_ttl": 15.0, "dns_zone_check_period": 0.0,
    "resolv_conf": None, "logfile": None, "pidfile": None, "syslog": False,
    "syslog_ident": "pgbouncer", "syslog_facility": "daemon", "log_connections": True,
    "log_disconnections": True, "log_pooler_errors": True, "log_stats": True, "stats_period": 60,
    "verbose": 0, "login_notify_message": None, "job_name": "pgbouncer",
    "service_name": "pgbouncer", "conffile": None, "pkt_buf": 4096,
    "max_packet_size": 2147483647, "sbuf_loopcnt": 5,
    "tcp_defer_accept": sys.platform.startswith("linux"), "tcp_socket_buffer": 0,
    "tcp_keepalive": True, "tcp_keepcnt": 0, "tcp_keepidle": 0, "tcp_keepintvl": 0,
    "tcp_user_timeout": 0, "client_tls_sslmode": "disable", "client_tls_key_file": None,
    "client_tls_cert_file": None, "client_tls_ca_file": None, "client_tls_protocols": "secure",
    "client_tls_ciphers": "default", "client_tls13_ciphers": None, "client_tls_dheparams": "auto",
    "client_tls_ecdhcurve": "auto", "server_tls_sslmode": "prefer", "server_tls_key_file": None,
    "server_tls_cert_file": None, "server_tls_ca_file": None, "server_tls_protocols": "secure",
    "server_tls_ciphers": "default", "server_tls13_ciphers": None,
    "stats_listen_addr": None, "stats_listen_port": None,
    "session_pinning": "pin",  # millpond
    "server_affinity": True,  # millpond
    "fast_lane": True,  # millpond
}  # fmt: skip


def test_every_setting_has_a_documented_default() -> None:
    assert set(PGBOUNCER_DEFAULTS) == SETTING_NAMES


@pytest.mark.parametrize("name", sorted(PGBOUNCER_DEFAULTS))
def test_default_matches_pgbouncer(name: str) -> None:
    assert getattr(ProxySettings(), name) == PGBOUNCER_DEFAULTS[name]


def test_minimal_file_gives_defaults(write: WriteFile) -> None:
    path = write("[pgbouncer]\n")
    config = load_config(path)
    assert config.settings == ProxySettings(conffile=str(path))
    assert config.settings.auth_query == DEFAULT_AUTH_QUERY
    assert (dict(config.databases), config.auth, config.setting_sources) == ({}, None, {})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0), ("2.5", 2.5), (".5", 0.5), ("1e2", 100.0), ("0", 0.0),
        ("250ms", 0.25), ("15s", 15.0), ("5min", 300.0), ("5 min", 300.0),
        ("2h", 7200.0), ("1d", 86400.0), ("1.5h", 5400.0),
    ],
)  # fmt: skip
def test_time_values(text: str, seconds: float) -> None:
    assert parse_setting("server_idle_timeout", text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True), ("0", False), ("yes", True), ("no", False), ("on", True), ("off", False),
        ("true", True), ("false", False), ("TRUE", True), ("Off", False), ("2", True),
    ],
)  # fmt: skip
def test_bool_spellings(text: str, value: bool) -> None:
    assert parse_setting("log_connections", text) is value


@pytest.mark.parametrize(
    ("text", "value"), [("6432", 6432), ("0x1F", 31), ("010", 8), ("0", 0), ("+7", 7)]
)
def test_ints_read_like_c_strtol(text: str, value: int) -> None:
    assert parse_setting("default_pool_size", text) == value


def test_enum_values_fold_case_but_names_do_not() -> None:
    assert parse_setting("pool_mode", "STATEMENT") == "statement"
    assert parse_setting("auth_type", "SCRAM-SHA-256") == "scram-sha-256"


def test_lists_split_on_commas_and_spaces() -> None:
    assert parse_setting("admin_users", " a, b  c,,d ") == ("a", "b", "c", "d")
    assert parse_setting("admin_users", "") == ()


def test_optional_strings_and_millpond_additions() -> None:
    assert parse_setting("logfile", "") is None
    assert parse_setting("unix_socket_dir", "") == ""  # empty disables Unix sockets
    assert parse_setting("stats_listen_port", "9187") == 9187
    assert parse_setting("stats_listen_port", "") is None


def test_include_and_value_whitespace(write: WriteFile, monkeypatch: pytest.MonkeyPatch) -> None:
    write("[databases]\nincluded = host=inc\n", "extra.ini")
    monkeypatch.chdir(write("", "marker").parent)  # PgBouncer resolves includes from the cwd
    path = write("[pgbouncer]\n  listen_port=7000   \t\n%include extra.ini\n[pgbouncer]\n")
    config = load_config(path)
    assert config.databases["included"].host == "inc"
    assert config.databases["included"].source == "extra.ini:2"
    assert config.settings.listen_port == 6432  # a [pgbouncer] header resets, as in PgBouncer


def test_section_header_with_trailing_text(write: WriteFile) -> None:
    path = write("[pgbouncer] ; the main section\n[databases] db = host=h\n[pgbouncer]\n")
    assert load_config(path).databases["db"].host == "h"


def test_comments_only_at_line_start() -> None:
    lines = parse_ini("# c\n  ; c\n[pgbouncer]\nlogfile = /x # not a comment\n")
    assert [(line.kind, line.name, line.value) for line in lines] == [
        ("section", "pgbouncer", ""),
        ("key", "logfile", "/x # not a comment"),
    ]


def test_quoted_database_names(write: WriteFile) -> None:
    path = write('[databases]\n"we""ird db" = host=a\n\'single\' = host=b\n[pgbouncer]\n')
    assert set(load_config(path).databases) == {'we"ird db', "single"}


def test_load_is_pure(write: WriteFile) -> None:
    path = write("[pgbouncer]\nlisten_port = 1234\n")
    first, second = load_config(path), load_config(path)
    assert first == second
    assert first is not second
    with pytest.raises(TypeError):
        first.databases["x"] = first.databases.get("y")  # type: ignore[index]


def test_settings_built_in_code_are_normalised() -> None:
    s = ProxySettings(server_lifetime=60, admin_users=["a", "b"], verbose=True)  # type: ignore[arg-type]
    assert (s.server_lifetime, s.admin_users, s.verbose) == (60.0, ("a", "b"), 1)
    assert isinstance(s.server_lifetime, float)
    entry = DatabaseEntry(name="db", port=6000, pool_mode="transaction")
    assert entry.for_client_database("x").dbname == "x"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"listen_port": -1}, "listen_port"),
        ({"pool_mode": "sessions"}, "pool_mode"),
        ({"pool_mode": "Session"}, "pool_mode"),
        ({"default_pool_size": "5"}, "default_pool_size"),
        ({"query_timeout": float("nan")}, "query_timeout"),
        ({"admin_users": ["a,b"]}, "admin_users"),
        ({"listen_addr": {"x"}}, "listen_addr"),
    ],
)
def test_settings_built_in_code_are_validated(kwargs: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ProxySettings(**kwargs)  # type: ignore[arg-type]
    assert caught.value.setting == setting


def test_entries_built_in_code_are_validated() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        DatabaseEntry(name="db", port=0)
    with pytest.raises(ConfigError, match="not one of"):
        UserEntry(name="u", pool_mode="always")  # type: ignore[arg-type]
