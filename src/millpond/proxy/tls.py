"""TLS toward clients: answering SSLRequest, and the SSL contexts from the settings."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from millpond.errors import ConfigError
from millpond.proxy.protocol import messages as m

if TYPE_CHECKING:
    from millpond.proxy.config import ProxySettings
    from millpond.proxy.frontend import ClientConnection
    from millpond.proxy.server import Proxy

log = logging.getLogger("millpond.proxy")

_REQUIRE = ("require", "verify-ca", "verify-full")


def client_context(s: ProxySettings) -> ssl.SSLContext | None:
    """The server-side context for client connections, or None when TLS is off."""
    if s.client_tls_sslmode == "disable":
        return None
    if not (s.client_tls_cert_file and s.client_tls_key_file):
        raise ConfigError(
            "client_tls_sslmode",
            f"{s.client_tls_sslmode!r} needs client_tls_cert_file and client_tls_key_file",
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(s.client_tls_cert_file, s.client_tls_key_file)
    if s.client_tls_ca_file:
        ctx.load_verify_locations(s.client_tls_ca_file)
        if s.client_tls_sslmode in ("verify-ca", "verify-full"):
            ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_required(s: ProxySettings) -> bool:
    return s.client_tls_sslmode in _REQUIRE


def negotiate_client_tls(proxy: Proxy, client: ClientConnection, ssl_request: bool) -> None:
    """Answer SSLRequest ('S' then a handshake) or GSSENCRequest ('N': not offered)."""
    transport = client.transport
    assert transport is not None
    ctx = proxy.client_tls if ssl_request else None
    if ctx is None:
        transport.write(m.SSL_REJECTED)
        return
    if client.handshake is not None and client.handshake.startup.buffered:
        # Bytes sent in the clear behind the SSLRequest would be read as if they had come
        # through TLS: a man in the middle's way to inject a login (CVE-2021-23214 in
        # PostgreSQL). Refuse, as PostgreSQL does.
        log.warning("%s sent unencrypted data after its SSLRequest: closing", client.addr)
        client.fail("08P01", "received unencrypted data after SSL request")
        return
    transport.write(m.SSL_ACCEPTED)
    transport.pause_reading()
    proxy.janitor.spawn(_handshake(client, ctx), "client-tls")


async def _handshake(client: ClientConnection, ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    transport = client.transport
    assert transport is not None
    try:
        new = await loop.start_tls(transport, client, ctx, server_side=True)
    except (OSError, ssl.SSLError) as exc:
        log.info("TLS handshake with %s failed: %s", client.addr, exc)
        client.close()
        return
    if new is None:
        client.close()
        return
    client.transport = new
    client.tls = True


# -- toward PostgreSQL ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """``server_tls_*``: how the proxy secures its connections to PostgreSQL."""

    sslmode: str = "disable"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_settings(cls, s: ProxySettings) -> ServerTLS:
        return cls(
            s.server_tls_sslmode,
            s.server_tls_ca_file,
            s.server_tls_cert_file,
            s.server_tls_key_file,
        )


@functools.lru_cache(maxsize=16)
def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """libpq's sslmode semantics: prefer/require encrypt; verify-ca and verify-full check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    verify = tls.sslmode in ("verify-ca", "verify-full") or (
        tls.sslmode == "require" and tls.ca_file is not None
    )
    ctx.check_hostname = tls.sslmode == "verify-full"
    if verify:
        if tls.ca_file:
            ctx.load_verify_locations(tls.ca_file)
        else:
            ctx.load_default_certs()
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


class _SSLProbe(asyncio.Protocol):
    """Sends SSLRequest and waits for the server's one-byte answer."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(m.ssl_request())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            if len(data) != 1:  # bytes after the answer would bypass TLS: refuse them
                self.answer.set_exception(ConnectionError("server sent data after its SSL answer"))
            else:
                self.answer.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("server closed during SSL negotiation"))


async def connect_with_tls(protocol: Any, host: str, port: int, tls: ServerTLS) -> None:
    """Negotiate TLS with PostgreSQL, then hand the connection to ``protocol``."""
    loop = asyncio.get_running_loop()
    probe = _SSLProbe()
    transport, _ = await loop.create_connection(lambda: probe, host, port)
    answer = await probe.answer
    if answer == m.SSL_ACCEPTED:
        hostname = host if tls.sslmode == "verify-full" else None
        ctx = server_context(tls)
        new = await loop.start_tls(transport, protocol, ctx, server_hostname=hostname)
        if new is None:
            raise ConnectionError("TLS handshake with the server failed")
        protocol.connection_made(new)
        return
    if tls.sslmode in ("require", "verify-ca", "verify-full"):
        transport.close()
        raise ConnectionError(f"server does not support SSL, but server_tls_sslmode={tls.sslmode}")
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
