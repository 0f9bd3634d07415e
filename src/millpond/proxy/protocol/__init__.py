"""Sans-I/O PostgreSQL v3 wire protocol: bytes in, messages or bytes out.

* :mod:`~millpond.proxy.protocol.messages`: type bytes, protocol constants, and
  builders returning the bytes of each message the proxy writes;
* :mod:`~millpond.proxy.protocol.codec`: incremental framing of the typed stream
  (:class:`MessageReader`) and of the startup packet (:class:`StartupReader`);
* :mod:`~millpond.proxy.protocol.parsers`: ``decode_*`` functions turning the payload
  of a message the proxy must look inside into a small frozen dataclass.
"""

from millpond.proxy.protocol.codec import (
    CancelRequest,
    GSSENCRequest,
    Message,
    MessageReader,
    Scan,
    Span,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    StartupReader,
    decode_startup_packet,
)

__all__ = [
    "CancelRequest",
    "GSSENCRequest",
    "Message",
    "MessageReader",
    "SSLRequest",
    "Scan",
    "Span",
    "StartupMessage",
    "StartupPacket",
    "StartupReader",
    "decode_startup_packet",
]
