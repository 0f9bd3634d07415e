"""A tiny asyncio HTTP/1.1 server for metrics, health, the JSON snapshot and the dashboard.

No web framework: one request per connection (``Connection: close``), GET and HEAD
only, a bounded request head, and a timeout for slow clients. Endpoints:

=================  ==========================================================
``/metrics``       Prometheus text, or OpenMetrics when the scraper asks for it
``/healthz``       200 while the process works (also during a graceful shutdown)
``/readyz``        200 or 503 with the reasons (``?format=json`` for JSON)
``/api/snapshot``  the whole view as JSON; ``?history=N`` adds points after N
``/``              the live dashboard (static files, no build step, no CDN)
=================  ==========================================================

The proxy starts one with :func:`start_stats_server` on ``stats_listen_addr`` /
``stats_listen_port``; an application with :func:`serve`. A janitor task samples the
view once a second into a :class:`~millpond.observe.series.History`, so the dashboard
shows the last minutes the moment it opens; that is the only background work, and it
reads snapshots like every other reader.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from millpond.observe.health import view_health
from millpond.observe.series import History
from millpond.observe.snapshot import (
    Pools,
    PoolsSource,
    ProxySource,
    Source,
    pools_source,
    view_json,
)
from millpond.pool.janitor import Janitor

if TYPE_CHECKING:
    from millpond.proxy.server import Proxy

log = logging.getLogger("millpond.observe")

MAX_HEAD = 16 * 1024
READ_TIMEOUT = 10.0
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/chart.js": ("chart.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"


class Response:
    """A response; ``encode``, when set, makes the body (the server runs it in a thread)."""

    __slots__ = ("body", "encode", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str,
        encode: Callable[[], bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.encode = encode
        self.headers = {"Content-Type": content_type, **(headers or {})}

    def finish(self) -> Response:
        if self.encode is not None:
            self.body, self.encode = self.encode(), None
        return self


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


def _finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: turn them into null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_body(data: Any) -> bytes:
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data), separators=(",", ":"))
    return text.encode()


def _json(status: int, data: Any) -> Response:
    """JSON, encoded off the event loop (the data is already a snapshot)."""
    return Response(status, b"", "application/json", encode=lambda: json_body(data))


class _Rendered:
    """Metric families rendered in the event loop, for an encoder in another thread."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


class StatsServer:
    """Serves one :class:`~millpond.observe.snapshot.Source` over HTTP."""

    def __init__(self, source: Source, *, interval: float = 1.0, history: int = 300) -> None:
        self.source = source
        self.history = History(history)
        self.interval = interval
        self._servers: list[asyncio.AbstractServer] = []
        self._janitor = Janitor("stats-http", self._sample, interval)
        self._writers: set[asyncio.StreamWriter] = set()
        self._static: dict[str, bytes] = {}
        self.addresses: list[tuple[str, int]] = []

    def __repr__(self) -> str:
        where = self.url if self.listening else "not listening"
        return f"<StatsServer {self.source.kind} {where}>"

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, host: str | Iterable[str] | None = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host`` (a name, a list, or ``*``/None for every interface)."""
        hosts = [host] if isinstance(host, str) or host is None else list(host)
        for one in hosts:
            bind = None if one in (None, "*", "") else one
            server = await asyncio.start_server(
                self._handle, bind, port, limit=MAX_HEAD, reuse_address=True
            )
            self._servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                self.addresses.append((str(name[0]), int(name[1])))
            if port == 0 and self.addresses:
                port = self.addresses[0][1]  # the other hosts share the port picked
        self._sample()
        self._janitor.start()

    @property
    def listening(self) -> bool:
        return bool(self._servers)

    @property
    def port(self) -> int:
        return self.addresses[0][1] if self.addresses else 0

    @property
    def host(self) -> str:
        return self.addresses[0][0] if self.addresses else ""

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening, finish open responses, stop sampling."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in servers:
            await server.wait_closed()
        await self._janitor.stop()

    async def __aenter__(self) -> StatsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _sample(self) -> None:
        try:
            self.history.sample(view_json(self.source.view()))
        except Exception:  # a bad sample must not stop the sampler (or the proxy)
            log.exception("stats sampling failed")

    # -- HTTP ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
                return
            method, target, accept = _parse_head(head)
            if method is None:
                response = _text(400, "bad request\n")
            elif method not in ("GET", "HEAD"):
                response = _text(405, "only GET and HEAD\n")
                response.headers["Allow"] = "GET, HEAD"
            else:
                response = self._route(target, accept)
                if response.encode is not None:  # formatting text is slow: not in the loop
                    response.body = await asyncio.to_thread(response.encode)
            writer.write(_serialize(response, head_only=method == "HEAD"))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def respond(self, target: str, accept: str = "") -> Response:
        """The response for a GET of ``target``, complete (for tests and embedding)."""
        return self._route(target, accept).finish()

    def _route(self, target: str, accept: str) -> Response:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        path = parts.path.rstrip("/") or "/"
        try:
            if path == "/metrics":
                return self._metrics(accept)
            if path == "/healthz":
                return self._healthz()
            if path == "/readyz":
                return self._readyz(query, accept)
            if path == "/api/snapshot":
                return self._snapshot(query)
            if path in _STATIC:
                return self._static_file(path)
        except Exception as exc:
            log.exception("stats endpoint %s failed", path)
            return _text(500, f"internal error: {exc}\n")
        return _text(404, "not found; try /, /metrics, /healthz, /readyz, /api/snapshot\n")

    def _metrics(self, accept: str) -> Response:
        try:
            from prometheus_client.exposition import choose_encoder

            from millpond.observe.metrics import render
        except ImportError:
            return _text(503, "metrics need prometheus-client: pip install 'millpond[observe]'\n")
        encoder, content_type = choose_encoder(accept)
        rendered = _Rendered(render(self.source.view()))  # the snapshot, taken here
        return Response(200, b"", content_type, encode=lambda: encoder(rendered))

    def _healthz(self) -> Response:
        view = self.source.view()
        state = "ok"
        if view.proxy is not None and view.proxy.shutting_down:
            state = f"ok (shutting down: {view.proxy.shutting_down})"
        pools = len(view.pools)
        return _text(200, f"{state}\nmillpond {view.version} {view.kind}, {pools} pools\n")

    def _readyz(self, query: Mapping[str, list[str]], accept: str) -> Response:
        report = view_health(self.source.view())
        if query.get("format") == ["json"] or "application/json" in accept:
            return _json(report.status_code, report.to_dict())
        return _text(report.status_code, report.text())

    def _snapshot(self, query: Mapping[str, list[str]]) -> Response:
        view = self.source.view()
        data = view_json(view)
        data["health"] = view_health(view).to_dict()
        data["interval"] = self.interval
        if "history" in query:
            try:
                after = int(query["history"][0])
            except ValueError:
                return _text(400, "history must be a whole number\n")
            data["history"] = {"seq": self.history.seq, "points": self.history.since(after)}
        return _json(200, data)

    def _static_file(self, path: str) -> Response:
        name, content_type = _STATIC[path]
        body = self._static.get(name)
        if body is None:
            body = resources.files("millpond.observe").joinpath("dashboard", name).read_bytes()
            self._static[name] = body
        return Response(200, body, content_type, headers={"Content-Security-Policy": _CSP})


def _parse_head(head: bytes) -> tuple[str | None, str, str]:
    """(method, target, Accept header) of a request head; method None when malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        return None, "", ""
    lines = text.split("\r\n")
    words = lines[0].split(" ")
    if len(words) != 3 or not words[2].startswith("HTTP/1.") or not words[1].startswith("/"):
        return None, "", ""
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    return words[0], words[1], accept


def _serialize(response: Response, *, head_only: bool = False) -> bytes:
    reason = _REASONS.get(response.status, "")
    headers = {
        **response.headers,
        "Content-Length": str(len(response.body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        "X-Content-Type-Options": "nosniff",
    }
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


# --------------------------------------------------------------------------- entry points


async def start_stats_server(proxy: Proxy) -> StatsServer:
    """The proxy's stats server on ``stats_listen_addr:stats_listen_port``.

    Not listening when ``stats_listen_port`` is unset (``close()`` is then a no-op).
    Call it at the end of ``Proxy.start()`` and close it after the proxy has stopped,
    so ``/metrics`` and ``/healthz`` stay readable during a graceful shutdown.
    """
    server = StatsServer(ProxySource(proxy))
    s = proxy.config.settings
    port = getattr(s, "stats_listen_port", None)
    if port is None:
        return server
    addr = getattr(s, "stats_listen_addr", None) or "127.0.0.1"
    hosts = [h.strip() for h in addr.split(",") if h.strip()]
    await server.start(hosts, port)
    return server


async def serve(
    pools: Pools | PoolsSource,
    *,
    host: str | Iterable[str] | None = "127.0.0.1",
    port: int = 9187,
) -> StatsServer:
    """Serve the library pools' metrics, health and dashboard: an app's stats endpoint.

    ``pools``: one pool, several, a mapping (keys become the ``role`` label), or a
    source such as ``PoolCollector(...).source``. Close the server when done (or use
    ``async with await serve(pool):``).
    """
    source = pools if isinstance(pools, PoolsSource) else pools_source(pools)
    server = StatsServer(source)
    await server.start(host, port)
    return server
