"""Every kind of bad pgbouncer.ini input is a ConfigError naming the setting and file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from millpond.errors import ConfigError
from millpond.proxy.config import load_config, parse_connstr, parse_setting
from tests.unit.proxy_config.conftest import WriteFile

CASES = [
    # (id, file text, setting, line, part of the message)
    ("unknown key", "[pgbouncer]\nlisten_prot = 1\n", "listen_prot", 2,
     "did you mean 'listen_port'"),
    ("key case", "[pgbouncer]\nPool_Mode = session\n", "Pool_Mode", 2, "unknown setting"),
    ("bad enum", "[pgbouncer]\n\npool_mode = transction\n", "pool_mode", 3,
     "'transction' is not one of session, transaction, statement"),
    ("trailing comment", "[pgbouncer]\npool_mode = session ; eh\n", "pool_mode", 2, "not one of"),
    ("bad int", "[pgbouncer]\ndefault_pool_size = twenty\n", "default_pool_size", 2,
     "'twenty' is not a whole number"),
    ("bad bool", "[pgbouncer]\nlog_connections = maybe\n", "log_connections", 2,
     "use 0/1, yes/no, on/off or true/false"),
    ("negative int", "[pgbouncer]\nmax_client_conn = -5\n", "max_client_conn", 2,
     "must be at least 0, got -5"),
    ("port too big", "[pgbouncer]\nlisten_port = 70000\n", "listen_port", 2, "at most 65535"),
    ("negative time", "[pgbouncer]\nquery_timeout = -1\n", "query_timeout", 2, "zero or more"),
    ("bad time unit", "[pgbouncer]\nserver_lifetime = 2 weeks\n", "server_lifetime", 2,
     "ms, s, min, h, d"),
    ("infinite time", "[pgbouncer]\nserver_lifetime = 1e999\n", "server_lifetime", 2,
     "zero or more"),
    ("bad tls protocols", "[pgbouncer]\nclient_tls_protocols = sslv3\n", "client_tls_protocols",
     2, "TLS protocols"),
    ("unterminated quote", "[databases]\ndb = host=x connect_query='SELECT 1\n[pgbouncer]\n",
     "databases.db.connect_query", 2, "unterminated quoted value"),
    ("junk after quote", "[databases]\ndb = connect_query='x'y\n[pgbouncer]\n",
     "databases.db.connect_query", 2, "space after the quoted value"),
    ("empty connstr value", "[databases]\ndb = port=1 host=\n[pgbouncer]\n", "databases.db.host",
     2, "empty value"),
    ("connstr without =", "[databases]\ndb = host\n[pgbouncer]\n", "databases.db", 2,
     "expected key=value"),
    ("unknown db param", "[pgbouncer]\n[databases]\ndb = hots=x\n", "databases.db.hots", 3,
     "unknown parameter; accepted:"),
    ("bad db pool_mode", "[databases]\ndb = pool_mode=sometimes\n[pgbouncer]\n",
     "databases.db.pool_mode", 2, "not one of session"),
    ("bad db port", "[databases]\ndb = port=0\n[pgbouncer]\n", "databases.db.port", 2,
     "at least 1"),
    ("bad db pool_size", "[databases]\ndb = pool_size=-3\n[pgbouncer]\n",
     "databases.db.pool_size", 2, "at least 0"),
    ("reserved db", "[databases]\npgbouncer = host=x\n[pgbouncer]\n", "databases.pgbouncer", 2,
     "reserved"),
    ("unknown user param", "[users]\nbob = pool_size=1 max_conns=3\n[pgbouncer]\n",
     "users.bob.max_conns", 2, "unknown parameter"),
    ("bad peer id", "[peers]\nzero = host=x\n[pgbouncer]\n", "peers.zero", 2, "whole number"),
    ("peer without host", "[peers]\n1 = port=6432\n[pgbouncer]\n", "peers.1.host", 2, "host"),
    ("unknown section", "[pgbouncer]\n[pgbouncr]\n", "[pgbouncr]", 2, "unknown section"),
    ("section case", "[PgBouncer]\n", "[PgBouncer]", 1, "did you mean 'pgbouncer'"),
    ("unclosed section", "[pgbouncer\n", "[pgbouncer", 1, "no closing ']'"),
    ("key before section", "listen_port = 1\n[pgbouncer]\n", "listen_port", 1,
     "before any [section]"),
    ("no equals", "[pgbouncer]\nlisten port = 1\n", "listen", 2, "expected 'name = value'"),
    ("garbage line", "[pgbouncer]\n!!!\n", "syntax", 2, "expected 'name = value'"),
    ("unterminated name", "[databases]\n\"db = host=x\n[pgbouncer]\n", '"db = host=x', 2,
     "unterminated"),
    ("missing main section", "[databases]\n", "[pgbouncer]", None, "section is missing"),
    ("missing include", "[pgbouncer]\n%include /nonexistent/extra.ini\n", "%include", 2,
     "cannot read '/nonexistent/extra.ini'"),
    ("empty include", "[pgbouncer]\n%include  \t\n", "%include", 2, "missing file name"),
    ("hba without file", "[pgbouncer]\nauth_type = hba\n", "auth_hba_file", 2,
     "must be set when auth_type is hba"),
    ("tls without key", "[pgbouncer]\nclient_tls_sslmode = require\n", "client_tls_sslmode", 2,
     "needs client_tls_key_file"),
    ("missing auth_file", "[pgbouncer]\nauth_file = /nonexistent/userlist.txt\n", "auth_file", 2,
     "cannot read"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "setting", "line", "fragment"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(
    write: WriteFile, text: str, setting: str, line: int | None, fragment: str
) -> None:
    path = write(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    err = caught.value
    assert err.setting == setting
    assert err.source == (f"{path}:{line}" if line else str(path))
    assert fragment in str(err)


def test_message_reads_like_the_issue(write: WriteFile) -> None:
    path = write("[pgbouncer]\npool_mode = transction\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}:2: pool_mode: 'transction' is not one of session, transaction, statement"
    )


def test_error_inside_include_points_into_the_included_file(
    write: WriteFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = write("[pgbouncer]\n\nmax_client_conn = lots\n", "inner.ini")
    monkeypatch.chdir(inner.parent)
    outer = write("[databases]\n%include inner.ini\n")
    with pytest.raises(ConfigError) as caught:
        load_config(outer)
    assert (caught.value.setting, caught.value.source) == ("max_client_conn", "inner.ini:3")


def test_self_include_is_stopped(write: WriteFile, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write("[pgbouncer]\n%include loop.ini\n", "loop.ini")
    monkeypatch.chdir(path.parent)
    with pytest.raises(ConfigError, match="nested more than 10 deep") as caught:
        load_config(path)
    assert caught.value.setting == "%include"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(tmp_path / "absent.ini")
    assert caught.value.setting == "conffile"


def test_invalid_utf8_names_the_line(write: WriteFile) -> None:
    path = write("[pgbouncer]\n")
    path.write_bytes(b"[pgbouncer]\nlogfile = /tmp/\xff.log\n")
    with pytest.raises(ConfigError, match="not valid UTF-8") as caught:
        load_config(path)
    assert caught.value.source == f"{path}:2"


def test_bad_userlist_line_through_load_config(write: WriteFile) -> None:
    users = write('"alice" "secret"\nbob secret\n', "userlist.txt")
    with pytest.raises(ConfigError) as caught:
        load_config(write(f"[pgbouncer]\nauth_file = {users}\n"))
    assert (caught.value.setting, caught.value.source) == ("auth_file", f"{users}:2")


def test_bad_hba_line_through_load_config(write: WriteFile) -> None:
    hba = write("local all all trust\nhost all all example.com md5\n", "hba.conf")
    with pytest.raises(ConfigError) as caught:
        load_config(write(f"[pgbouncer]\nauth_type = hba\nauth_hba_file = {hba}\n"))
    assert (caught.value.setting, caught.value.source) == ("auth_hba_file", f"{hba}:2")


def test_hba_file_loaded_only_for_auth_type_hba(write: WriteFile) -> None:
    path = write("[pgbouncer]\nauth_hba_file = /nonexistent/hba.conf\n")
    assert load_config(path).hba is None


def test_parse_setting_errors_without_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_setting("no_such_setting", "1")
    assert caught.value.source is None
    assert str(caught.value) == "no_such_setting: unknown setting"


def test_connstr_quoting() -> None:
    assert parse_connstr("  a=1  b='x y' c='it''s'  d=''''", "db") == [
        ("a", "1"),
        ("b", "x y"),
        ("c", "it's"),
        ("d", "'"),
    ]
    with pytest.raises(ConfigError, match="empty value"):
        parse_connstr("password=''", "db")
