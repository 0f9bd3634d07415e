"""PgBouncer's TCP socket settings, applied as PgBouncer applies them.

``tcp_keepalive`` (on by default), ``tcp_keepidle``, ``tcp_keepintvl``, ``tcp_keepcnt``
(0: the kernel's default), ``tcp_user_timeout`` (milliseconds, 0: unset) and
``tcp_socket_buffer`` (bytes for both SO_SNDBUF and SO_RCVBUF, 0: unset) go on every TCP
socket: the listening ones, which the accepted ones inherit them from (Linux copies a
listener's socket options to the sockets ``accept()`` returns, so a client connection
costs no system call for them), and each server connection once it is connected.
``tcp_defer_accept`` (on by default on Linux) sets TCP_DEFER_ACCEPT on the listening
sockets: the kernel wakes the proxy for a new connection when its first packet has
arrived, not at the end of the handshake. Unix sockets get none of them.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any, Protocol

from millpond.errors import ConfigError
from millpond.proxy.settings import ProxySettings

log = logging.getLogger("millpond.proxy")

#: (level, option, value) for ``setsockopt``
Option = tuple[int, int, int]

#: the seconds of idle before the first probe: TCP_KEEPIDLE on Linux, TCP_KEEPALIVE on macOS
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)


class _Settable(Protocol):
    family: Any

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def socket_options(
    s: ProxySettings, sources: Mapping[str, str] | None = None
) -> tuple[Option, ...]:
    """What every TCP socket of the proxy gets, in PgBouncer's order; ConfigError names
    a setting this platform cannot apply (and where it was set, from ``sources``)."""
    where = sources or {}
    options: list[Option] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(s.tcp_keepalive))]
    if s.tcp_keepalive:
        for name, constant, value in (
            ("tcp_keepcnt", getattr(socket, "TCP_KEEPCNT", None), s.tcp_keepcnt),
            ("tcp_keepidle", _KEEPIDLE, s.tcp_keepidle),
            ("tcp_keepintvl", getattr(socket, "TCP_KEEPINTVL", None), s.tcp_keepintvl),
        ):
            if value > 0:
                option = _supported(name, constant, where.get(name))
                options.append((socket.IPPROTO_TCP, option, value))
    if s.tcp_user_timeout > 0:
        constant = getattr(socket, "TCP_USER_TIMEOUT", None)
        option = _supported("tcp_user_timeout", constant, where.get("tcp_user_timeout"))
        options.append((socket.IPPROTO_TCP, option, s.tcp_user_timeout))
    if s.tcp_socket_buffer > 0:
        options.append((socket.SOL_SOCKET, socket.SO_SNDBUF, s.tcp_socket_buffer))
        options.append((socket.SOL_SOCKET, socket.SO_RCVBUF, s.tcp_socket_buffer))
    return tuple(options)


def _supported(name: str, constant: int | None, source: str | None) -> int:
    if constant is None:
        raise ConfigError(name, "this platform has no such TCP socket option", source=source)
    return constant


def is_tcp(sock: _Settable) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def tune(sock: _Settable, options: tuple[Option, ...]) -> None:
    """Apply ``options`` to a TCP socket (a Unix socket is left alone)."""
    if is_tcp(sock):
        for level, option, value in options:
            sock.setsockopt(level, option, value)


def tune_listener(sock: _Settable, s: ProxySettings) -> None:
    """A listening socket: the options its connections inherit, and TCP_DEFER_ACCEPT."""
    if not is_tcp(sock):
        return
    tune(sock, socket_options(s))
    defer = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if defer is not None:
        # PgBouncer's value: 1 second (the kernel rounds it to its SYN-ACK retransmits)
        sock.setsockopt(socket.IPPROTO_TCP, defer, 1 if s.tcp_defer_accept else 0)
    elif s.tcp_defer_accept:
        log.warning("tcp_defer_accept: not supported on this platform; ignored")
