"""``millpond proxy --listen ... --backend ...`` builds the same kind of config as a file."""

from __future__ import annotations

import pytest

from millpond.errors import ConfigError
from millpond.proxy.config import ProxySettings, config_from_args
from tests.unit.proxy_config.conftest import WriteFile


def test_listen_and_backend() -> None:
    config = config_from_args("127.0.0.1:6433", "postgresql://app:p%40ss@db.example:5433/appdb")
    assert (config.settings.listen_addr, config.settings.listen_port) == (("127.0.0.1",), 6433)
    star = config.databases["*"]
    assert (star.host, star.port, star.user, star.password, star.dbname) == (
        "db.example",
        5433,
        "app",
        "p@ss",
        None,
    )
    assert config.databases["appdb"].dbname == "appdb"
    other = config.database("reports")
    assert other is not None
    assert (other.dbname, other.host) == ("reports", "db.example")
    assert config.source is None
    assert config.setting_sources["listen_port"] == "--listen"


def test_everything_else_is_pgbouncer_default() -> None:
    config = config_from_args("*:6432", "postgres://h")
    expected = ProxySettings(listen_addr=("*",), listen_port=6432)
    assert config.settings == expected
    assert set(config.databases) == {"*"}
    assert (config.databases["*"].host, config.databases["*"].port) == ("h", 5432)


def test_ipv6_listen_and_unix_socket_backend() -> None:
    config = config_from_args(
        "[::1]:7000", "postgresql:///app?host=/var/run/postgresql&pool_size=4"
    )
    assert config.settings.listen_addr == ("::1",)
    assert config.databases["*"].host == "/var/run/postgresql"
    assert config.databases["app"].pool_size == 4


def test_sslmode_in_url_sets_server_tls() -> None:
    config = config_from_args("localhost:6432", "postgresql://h/db?sslmode=verify-full")
    assert config.settings.server_tls_sslmode == "verify-full"


def test_overrides_as_text_or_python_values(write: WriteFile) -> None:
    users = write('"u" "p"\n', "userlist.txt")
    config = config_from_args(
        "127.0.0.1:6432",
        "postgresql://h/db",
        pool_mode="transaction",
        default_pool_size=5,
        query_timeout=2.5,
        server_idle_timeout="5min",
        log_connections=False,
        admin_users=["ops", "dba"],
        auth_file=str(users),
        listen_port=7777,
    )
    s = config.settings
    assert (s.pool_mode, s.default_pool_size, s.query_timeout) == ("transaction", 5, 2.5)
    assert (s.server_idle_timeout, s.log_connections, s.admin_users) == (
        300.0,
        False,
        ("ops", "dba"),
    )
    assert s.listen_port == 7777
    assert config.auth is not None
    assert "u" in config.auth
    assert config.setting_sources["pool_mode"] == "override"


@pytest.mark.parametrize(
    ("listen", "url", "overrides", "setting"),
    [
        ("6432", "postgresql://h", {}, "listen"),
        ("host:port", "postgresql://h", {}, "listen"),
        ("h:99999", "postgresql://h", {}, "listen"),
        ("h:6432", "mysql://h/db", {}, "backend"),
        ("h:6432", "postgresql://h:notaport/db", {}, "backend"),
        ("h:6432", "postgresql://[::1/db", {}, "backend"),
        ("h:6432", "postgresql://h/db?pool_mode=sometimes", {}, "backend.pool_mode"),
        ("h:6432", "postgresql://h/db?options=-c", {}, "backend.options"),
        ("h:6432", "postgresql://h/pgbouncer", {}, "databases.pgbouncer"),
        ("h:6432", "postgresql://h/db?sslmode=please", {}, "server_tls_sslmode"),
        ("h:6432", "postgresql://h", {"pool_mod": "session"}, "pool_mod"),
        ("h:6432", "postgresql://h", {"pool_mode": "sometimes"}, "pool_mode"),
        ("h:6432", "postgresql://h", {"default_pool_size": 2.5}, "default_pool_size"),
        ("h:6432", "postgresql://h", {"admin_users": {"a": 1}}, "admin_users"),
        ("h:6432", "postgresql://h", {"auth_type": "hba"}, "auth_hba_file"),
    ],
)  # fmt: skip
def test_bad_arguments(listen: str, url: str, overrides: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_args(listen, url, **overrides)
    assert caught.value.setting == setting
