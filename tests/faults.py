"""A fault-injecting TCP relay that tests put between a client and PostgreSQL.

    relay = await FaultRelay(cluster.host, cluster.port).start()
    pool = await millpond.create_pool(relay.dsn(cluster.dsn()), ...)
    relay.drop()          # swallow every byte, both ways; connections stay open
    relay.set_pass()      # back to normal

Modes (they apply at once to every relayed connection, and to new ones):

- ``pass``: forward bytes both ways.
- ``delay``: forward each chunk ``delay_ms`` late (in order).
- ``drop``: read and silently discard everything, both ways (a network that loses
  packets while TCP still looks fine).
- ``blackhole``: accept new connections but never connect them on; stop reading
  existing ones (the peer's writes back up). Held bytes flow again after ``set_pass()``.
- ``reset``: abort every connection with a TCP RST on both sides; new connections are
  reset as soon as they are accepted.

It runs on the test's own event loop (asyncio or uvloop). ``accepted`` counts incoming
connections (connection attempts as the server side would see them); ``close()``
resets whatever is still open, so nothing can hang on the relay after a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

MODES = ("pass", "delay", "drop", "blackhole", "reset")
_CHUNK = 65536


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN (if not closed already)."""
    transport = writer.transport
    if not transport.is_closing():
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Link:
    """One relayed connection: client <-> relay <-> server."""

    def __init__(
        self,
        relay: FaultRelay,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.relay = relay
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        up = asyncio.ensure_future(self._pump(self.client[0], self.server[1]))
        down = asyncio.ensure_future(self._pump(self.server[0], self.client[1]))
        self.tasks = [up, down]
        try:
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for writer in (self.client[1], self.server[1]):
                writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        relay = self.relay
        while True:
            await relay._wait_unless_blackhole()
            try:
                data = await src.read(_CHUNK)
            except OSError:
                return
            if not data:
                return
            if relay.mode == "drop":
                continue
            if relay.mode == "delay":
                await asyncio.sleep(relay.delay)
            await relay._wait_unless_blackhole()
            if relay.mode == "drop":
                continue
            dst.write(data)
            try:
                await dst.drain()
            except OSError:
                return

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        _rst(self.client[1])
        _rst(self.server[1])


class FaultRelay:
    """A TCP relay to ``upstream_host:upstream_port`` whose behaviour the test controls."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode = "pass"
        self.delay = 0.0
        self.accepted = 0
        self.upstream_failures = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._changed: asyncio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"<FaultRelay {self.host}:{self.port} -> {self.upstream[0]}:{self.upstream[1]} "
            f"{self.mode} links={len(self._links)} accepted={self.accepted}>"
        )

    async def start(self) -> FaultRelay:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the relay's."""
        parts = urlsplit(dsn)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{self.host}:{self.port}" if auth else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def active(self) -> int:
        """Connections currently relayed."""
        return len(self._links)

    # -- the modes -----------------------------------------------------------------

    def set_mode(self, mode: str, *, delay_ms: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.delay = delay_ms / 1000
        if mode == "reset":
            for link in list(self._links):
                link.reset()
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def set_pass(self) -> None:
        self.set_mode("pass")

    def drop(self) -> None:
        self.set_mode("drop")

    def reset(self) -> None:
        self.set_mode("reset")

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def slow(self, delay_ms: float) -> None:
        self.set_mode("delay", delay_ms=delay_ms)

    async def _wait_unless_blackhole(self) -> None:
        while self.mode == "blackhole":
            changed = self._changed
            assert changed is not None
            await changed.wait()

    # -- connections ------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            _rst(writer)
        finally:
            self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _rst(writer)
            return
        await self._wait_unless_blackhole()
        try:
            server = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.upstream_failures += 1
            _rst(writer)
            return
        if self.mode == "reset":
            _rst(writer)
            _rst(server[1])
            return
        link = _Link(self, (reader, writer), server)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)

    async def close(self) -> None:
        """Stop listening and reset every connection still open."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultRelay:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
