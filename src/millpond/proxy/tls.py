"""TLS toward clients: answering SSLRequest, and the SSL contexts from the settings."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

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
