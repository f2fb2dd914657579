"""HTTP/1.1 to backends: keep-alive connections per origin, responses parsed
by httptools (the parser uvicorn serves the gateway's own side with).

Why not aiohttp, which this replaced on the request path: measured on the
benchmark's 2-core machine against the fake upstream, sequential POSTs with
uvloop, aiohttp's `ClientSession` spent 140 us of CPU per request and took
208 us at p50; this module 56 us and 121 us. The gateway
pays its client twice per request (send and receive), inside a 1 ms budget.
aiohttp builds a request object, a multidict of headers, a response object,
a stream reader and timers for every request; a backend call needs one
pre-joined write and a parser's callbacks.

What it does, and no more: POST (or any method) with a whole body, written
in one write; status and headers awaited within a first-byte timeout; the
body read whole (with a size cap) or chunk by chunk, with reading paused
while a slow consumer leaves more than `HIGH_WATER` bytes unread; bodies by
length, chunked, or until close; plain TCP or TLS (the system's trust store).
A connection goes back to its origin's idle list only after a response was
read to its end and both sides keep it alive; anything else closes it, which
is also how a request is cancelled on the backend. Idle connections are
dropped after `IDLE_S`, below the 5 s keep-alive of uvicorn-based backends
(vLLM, trtllm-serve, Tollgate's own), so that a request rarely meets a
connection the backend is closing; one that does (closed before any byte of
the answer) is sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024
"""Unread body bytes of a streamed response at which reading from the
backend pauses (TCP then slows the backend down)."""
MAX_BODY = 64 * 1024 * 1024
"""Largest whole body `Response.read` accepts; a larger one is an error."""
IDLE_S = 4.0
"""How long an idle connection is kept for reuse."""


class HttpClientError(Exception):
    """A request that got no complete response."""


class ConnectFailed(HttpClientError):
    """No connection: refused, unresolvable host, TLS failure, or connect timeout."""


class ConnectionClosed(HttpClientError):
    """The backend closed the connection before the response ended."""

    def __init__(self, message: str, *, answered: bool, received: bool) -> None:
        super().__init__(message)
        self.answered = answered
        """Whether the status line and headers had arrived."""
        self.received = received
        """Whether any byte of the response had arrived."""


class BadResponse(HttpClientError):
    """The backend's answer is not valid HTTP/1.1, or its body is too large."""


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL split once: where to connect, and the request line's prefix."""

    key: tuple[str, int, bool]
    """(host, port, TLS): connections are shared by every URL with it."""
    host_header: str
    path_prefix: str


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    netloc = parts.netloc.rpartition("@")[2]
    return _Target((parts.hostname, port, tls), netloc, parts.path.rstrip("/"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the response being read on it."""

    def __init__(self, on_lost: Callable[[_Connection], None]) -> None:
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.in_use = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None
        """When the wait in progress times out (the loop's clock); None: never."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: HttpClientError | None = None
        self.received = False
        self._body: list[bytes] = []
        self._buffered = 0
        self._until_close = False
        self._informational = False
        self._whole = False
        self._paused = False

    # --- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's are not `asyncio.Transport` subclasses)."""
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; bytes nobody asked for close the connection."""
        if not self.in_use or self.complete:
            self.close()  # unsolicited bytes: the connection's state is unknown
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the backend switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        """End the response: complete if its body runs until close, else broken."""
        self.closed = True
        self._disarm()
        self._on_lost(self)
        if self.in_use and not self.complete and self.error is None:
            if self.head_done and self._until_close:
                self.complete = True
            else:
                state = "mid-response" if self.head_done else "before the response"
                self.error = ConnectionClosed(
                    f"the backend closed the connection {state}",
                    answered=self.head_done,
                    received=self.received,
                )
        self._wake()

    def pause_writing(self) -> None:
        """Request bodies are written whole; nothing to pause."""

    def resume_writing(self) -> None:
        """See `pause_writing`."""

    # --- httptools callbacks ----------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header (repeated names joined with commas)."""
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prior = self.headers.get(key)
        self.headers[key] = text if prior is None else f"{prior}, {text}"

    def on_headers_complete(self) -> None:
        """The head arrived (an informational 1xx one is skipped)."""
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True
            self.headers = {}
            return
        self.status = status
        framed = (
            "content-length" in self.headers
            or "chunked" in self.headers.get("transfer-encoding", "").lower()
        )
        self._until_close = not framed and status not in (204, 304)
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        """Buffer body bytes; pause reading while a stream's consumer lags
        (or has not started: a stream's first read may come later)."""
        self._body.append(body)
        self._buffered += len(body)
        if self._whole:
            if self._buffered > MAX_BODY:
                self._too_large()
                return
        elif self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _too_large(self) -> None:
        self._fail(BadResponse(f"the backend's body exceeds {MAX_BODY} bytes"))

    def _resume(self) -> None:
        if self._paused and not self.closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def on_message_complete(self) -> None:
        """The response ended."""
        if self._informational:
            self._informational = False
            return
        if self.error is not None:
            # The body was refused (over `MAX_BODY`) earlier in this same
            # feed: the parser reads on to the end, which is no success.
            return
        self.keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._disarm()
        self._wake()

    # --- for Response ------------------------------------------------------
    def _fail(self, error: HttpClientError) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, deadline: float | None) -> None:
        """Wait for the response's next event; TimeoutError at `deadline` (the
        loop's clock; None: never).

        One timer per connection, pushed forward rather than replaced: a
        stream waits once per chunk, and an `asyncio.timeout` each time
        would add and cancel a timer per chunk (about 5 us each on uvloop).
        """
        loop = self._loop
        self._deadline = deadline
        if deadline is not None:
            if loop.time() >= deadline:
                raise TimeoutError
            if self._timer is None or self._timer_at > deadline:
                self._set_timer(deadline)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        # Due when the deadline was not pushed past the time this timer was
        # set for; else set it again for the deadline in force.
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return
        if deadline <= self._timer_at:
            waiter.set_exception(TimeoutError())
        else:
            self._set_timer(deadline)

    def _set_timer(self, deadline: float) -> None:
        self._disarm()
        self._timer = self._loop.call_at(deadline, self._on_timer)
        self._timer_at = deadline

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def send(self, request: bytes) -> None:
        """Start a request on this (idle) connection."""
        self._reset()
        self.in_use = True
        assert self.transport is not None
        self.transport.write(request)

    async def head(self, timeout_s: float) -> None:
        """Wait for the status line and headers, at most `timeout_s`."""
        deadline = self._loop.time() + timeout_s
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait(deadline)

    async def whole(self, timeout_s: float | None = None) -> bytes:
        """Wait for the whole body, at most `timeout_s` (None: no limit)."""
        deadline = None if timeout_s is None else self._loop.time() + timeout_s
        self._whole = True
        if self._buffered > MAX_BODY:
            self._too_large()
        self._resume()
        while True:
            if self.error is not None:
                raise self.error
            if self.complete:
                break
            await self._wait(deadline)
        body = self._body
        return body[0] if len(body) == 1 else b"".join(body)

    async def chunk(self, timeout_s: float | None = None) -> bytes:
        """The body bytes that arrived since the last call (waiting for some,
        at most `timeout_s`; None: no limit); b"" once the body ended."""
        deadline: float | None = None
        while True:
            if self._body:
                body = self._body
                data = body[0] if len(body) == 1 else b"".join(body)
                self._body = []
                self._buffered = 0
                self._resume()
                return data
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            if timeout_s is not None and deadline is None:
                deadline = self._loop.time() + timeout_s
            await self._wait(deadline)

    def close(self) -> None:
        """Close the connection (what cancels a request on the backend)."""
        self._disarm()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class Response:
    """A backend's answer whose status and headers have arrived."""

    __slots__ = ("_conn", "_ended", "_pool", "_target", "headers", "status")

    def __init__(self, conn: _Connection, pool: Http1Pool, target: _Target) -> None:
        self._conn: _Connection | None = conn
        self._ended = False
        self._pool = pool
        self._target = target
        self.status = conn.status
        self.headers = conn.headers
        """Header names in lower case; repeated ones joined with commas."""

    async def read(self, timeout_s: float | None = None) -> bytes:
        """The whole body (at most `MAX_BODY` bytes) within `timeout_s` (None:
        no limit); the connection is then released. Raises `HttpClientError`
        when the body does not arrive whole, TimeoutError when not in time."""
        conn = self._conn
        if conn is None:
            raise HttpClientError("the response was already released")
        try:
            return await conn.whole(timeout_s)
        finally:
            self.release()

    async def chunk(self, timeout_s: float | None = None) -> bytes:
        """The next body bytes, b"" at the end, waiting at most `timeout_s`
        (None: no limit). Raises `HttpClientError` when the connection breaks
        first, TimeoutError when nothing came in time."""
        conn = self._conn
        if conn is None:
            if self._ended:
                return b""
            raise HttpClientError("the response was closed before its end")
        return await conn.chunk(timeout_s)

    @property
    def ended(self) -> bool:
        """Whether the body was received to its end."""
        return self._ended if self._conn is None else self._conn.complete

    def release(self) -> None:
        """Give the connection back: to the idle list when the response was
        read to its end and both sides keep it alive, else closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._ended = conn.complete and conn.error is None
            self._pool._release(self._target, conn)

    def close(self) -> None:
        """Close the connection, whatever the state of the body (cancels the
        request on the backend)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            self._pool._forget(conn)


class Http1Pool:
    """Keep-alive connections to every backend, per (host, port, TLS)."""

    def __init__(self, *, idle_s: float = IDLE_S, ssl_context: ssl.SSLContext | None = None):
        """`ssl_context` for https backends (default: the system's trust store)."""
        self._idle_s = idle_s
        self._ssl = ssl_context
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._swept = time.monotonic()

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use."""
        return len(self._open)

    async def request(
        self,
        method: str,
        url: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        first_byte_timeout_s: float,
        on_sent: Callable[[], None] | None = None,
    ) -> Response:
        """Send `body` to `path` under the base `url` and return once the
        status and headers arrived (any method whose answer has the body its
        head announces: not HEAD). `on_sent` runs each time the request was
        handed to a connection, before waiting for the answer: work the
        response needs, done while the backend works.

        Raises `ConnectFailed` (no connection within `connect_timeout_s`),
        `ConnectionClosed` or `BadResponse` (no valid head), `TimeoutError`
        (no head within `first_byte_timeout_s` of sending)."""
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:
                self._targets.clear()
            target = self._targets[url] = _target(url)
        request = _encode(method, target, path, body, headers)
        conn = self._take(target.key)
        if conn is not None:
            try:
                return await self._exchange(conn, target, request, first_byte_timeout_s, on_sent)
            except ConnectionClosed as exc:
                if exc.received:
                    raise
                # The backend closed this idle connection as the request left:
                # nothing was answered, send it on a new connection.
        conn = await self._connect(target, connect_timeout_s)
        return await self._exchange(conn, target, request, first_byte_timeout_s, on_sent)

    async def _exchange(
        self,
        conn: _Connection,
        target: _Target,
        request: bytes,
        timeout_s: float,
        on_sent: Callable[[], None] | None,
    ) -> Response:
        try:
            conn.send(request)
            if on_sent is not None:
                on_sent()
            await conn.head(timeout_s)
        except BaseException:
            conn.close()
            self._forget(conn)
            raise
        return Response(conn, self, target)

    def _take(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = time.monotonic() - self._idle_s
        while idle:
            conn = idle.pop()  # most recently used first: the likeliest alive
            if conn.closed or conn.idle_since < oldest or conn.transport is None:
                conn.close()
                self._forget(conn)
                continue
            if conn.transport.is_closing():
                self._forget(conn)
                continue
            return conn
        return None

    async def _connect(self, target: _Target, timeout_s: float) -> _Connection:
        host, port, tls = target.key
        context: ssl.SSLContext | None = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._forget),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if tls else None,
                )
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:  # refused, unreachable, unresolvable, TLS
            raise ConnectFailed(f"connecting to {host}:{port} failed: {exc}") from exc
        self._open.add(conn)
        return conn

    def _release(self, target: _Target, conn: _Connection) -> None:
        conn.in_use = False
        if conn.complete and conn.keep_alive and not conn.closed:
            now = time.monotonic()
            conn.idle_since = now
            self._idle.setdefault(target.key, []).append(conn)
            if now - self._swept > self._idle_s:
                self._sweep(now)
        else:
            conn.close()
            self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)

    def _sweep(self, now: float) -> None:
        """Close connections idle for longer than `idle_s` (those of
        backends no longer called are never taken again)."""
        self._swept = now
        oldest = now - self._idle_s
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and c.idle_since >= oldest]
            for conn in idle:
                if conn.closed or conn.idle_since < oldest:
                    conn.close()
                    self._forget(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    async def __aenter__(self) -> Http1Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _encode(
    method: str, target: _Target, path: str, body: bytes, headers: Mapping[str, str]
) -> bytes:
    """The request's bytes: line, headers and body in one buffer."""
    lines = [
        f"{method} {target.path_prefix}{path} HTTP/1.1\r\n"
        f"host: {target.host_header}\r\ncontent-length: {len(body)}\r\n"
    ]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + body
