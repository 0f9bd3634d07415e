"""PgBouncer's tcp_* settings as socket options (millpond.proxy.tcp)."""

from __future__ import annotations

import socket

import pytest

from millpond.errors import ConfigError
from millpond.proxy import tcp
from millpond.proxy.config import load_config
from millpond.proxy.settings import ProxySettings
from tests.unit.proxy_config.conftest import WriteFile

KEEPALIVE_ON = (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def options(**settings: object) -> tuple[tcp.Option, ...]:
    return tcp.socket_options(ProxySettings(**settings))  # type: ignore[arg-type]


def test_pgbouncers_defaults_are_keepalive_with_the_kernels_timings() -> None:
    assert options() == (KEEPALIVE_ON,)
    assert ProxySettings().tcp_defer_accept is True  # on Linux, as PgBouncer


def test_every_setting_becomes_its_option() -> None:
    got = options(
        tcp_keepcnt=4,
        tcp_keepidle=30,
        tcp_keepintvl=7,
        tcp_user_timeout=12000,
        tcp_socket_buffer=65536,
    )
    assert got == (
        KEEPALIVE_ON,
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 7),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 12000),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, 65536),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, 65536),
    )


def test_keepalive_off_turns_it_off_and_ignores_its_timings() -> None:
    got = options(tcp_keepalive=False, tcp_keepidle=30, tcp_keepcnt=4)
    assert got == ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),)


def test_a_unix_socket_is_left_alone() -> None:
    calls: list[tuple[int, int, int]] = []

    class Fake:
        family = socket.AF_UNIX

        def setsockopt(self, level: int, option: int, value: int, /) -> None:
            calls.append((level, option, value))

    tcp.tune(Fake(), options(tcp_keepidle=30))
    tcp.tune_listener(Fake(), ProxySettings())
    assert calls == []
    Fake.family = socket.AF_INET6
    tcp.tune_listener(Fake(), ProxySettings(tcp_keepidle=30))
    assert calls == [
        KEEPALIVE_ON,
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
        (socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1),
    ]


def test_a_setting_the_platform_cannot_apply_is_a_config_error_with_its_line(
    write: WriteFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write("[pgbouncer]\nlisten_port = 6432\ntcp_user_timeout = 5000\n")
    assert load_config(path).settings.tcp_user_timeout == 5000
    monkeypatch.delattr(socket, "TCP_USER_TIMEOUT")
    with pytest.raises(ConfigError, match="no such TCP socket option") as caught:
        load_config(path)
    assert (caught.value.setting, caught.value.source) == ("tcp_user_timeout", f"{path}:3")


def test_negative_values_are_refused(write: WriteFile) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write("[pgbouncer]\ntcp_keepidle = -1\n"))
    assert caught.value.setting == "tcp_keepidle"
