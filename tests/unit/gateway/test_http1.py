"""The HTTP/1.1 keep-alive client against a scripted raw TCP server on
127.0.0.1: framing, keep-alive and its limits, broken and malformed answers,
timeouts, flow control of streamed bodies, cancellation and TLS.

The server speaks raw bytes so that each test controls exactly what the
client sees (split writes, early closes, stalls) and can check exactly what
the client sent and how many connections it opened."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.upstream import http1
from gateway.upstream.http1 import (
    BadResponse,
    ConnectFailed,
    ConnectionClosed,
    Http1Pool,
    HttpClientError,
    Response,
)

T = TypeVar("T")

# Generous against a loaded CI machine; every wait that can hang is bounded
# by it so that a regression fails fast instead of at pytest's timeout.
WAIT_S = 3.0


# --- the scripted server ----------------------------------------------------


class Peer:
    """One connection the server accepted, as its handler drives it."""

    def __init__(
        self, server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.requests: list[bytes] = []
        self.eof = asyncio.Event()
        """Set once the server read EOF (or a reset) from the client."""

    async def read_request(self) -> bytes | None:
        """The next whole request (head and content-length body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        request = head + body
        self.requests.append(request)
        self.server.requests.append(request)
        self.server.request_seen.set()
        return request

    async def send(self, *parts: bytes, pause_s: float = 0.0) -> None:
        """Write each part separately, pausing between them (separate reads on
        the client's side, as TCP_NODELAY is on)."""
        for i, part in enumerate(parts):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            self.writer.write(part)
            await self.writer.drain()

    async def wait_eof(self) -> None:
        """Discard whatever the client sends until it closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eof.set()


Handler = Callable[[Peer], Awaitable[None]]


def answering(*answers: bytes) -> Handler:
    """A keep-alive handler: the n-th request of the server (over all its
    connections) gets the n-th answer, the last one repeated."""

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            index = min(len(peer.server.requests), len(answers)) - 1
            await peer.send(answers[index])

    return handler


class ScriptedServer:
    """A raw TCP server whose per-connection behaviour each test sets in
    `handler`; it records the requests and connections it got."""

    def __init__(self) -> None:
        self.handler: Handler = answering(ok(b"hello"))
        self.accepted = 0
        self.peers: list[Peer] = []
        self.requests: list[bytes] = []
        self.request_seen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        peer = Peer(self, reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in self.peers:
            peer.writer.close()
        if self._server is not None:
            await self._server.wait_closed()


def sends_then_waits(*data: bytes, pause_s: float = 0.0) -> Handler:
    """A handler that answers the first request with `data`, then waits for
    the client to close the connection."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(*data, pause_s=pause_s)
        await peer.wait_eof()

    return handler


def sends_then_closes(*data: bytes, pause_s: float = 0.0) -> Handler:
    """A handler that answers the first request with `data` (nothing: no
    answer at all), then closes the connection."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(*data, pause_s=pause_s)

    return handler


def ok(body: bytes, *extra: str) -> bytes:
    """A 200 with a content-length body and extra raw header lines."""
    lines = ["HTTP/1.1 200 OK", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def split_request(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """(request line, headers in order, body) of a raw request."""
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *rest = head.decode("latin-1").split("\r\n")
    headers = [(n, v.strip()) for n, _, v in (h.partition(":") for h in rest)]
    return line, headers, body


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, WAIT_S)


async def go_stale(server: ScriptedServer, pool: Http1Pool, last: bytes = b"") -> None:
    """Leave the pool one idle connection that the server closes once the
    next request arrives on it, after sending `last` (nothing: the
    keep-alive race, a request sent as the backend closes); connections
    after it are answered with `second`."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(ok(b"first"))
        await peer.read_request()
        if last:
            await peer.send(last)

    server.handler = handler
    await within((await post(pool, server.url)).read())
    server.handler = answering(ok(b"second"))


async def closed_before_answer(server: ScriptedServer, pool: Http1Pool, *, received: bool) -> None:
    """A request on the server's one connection fails as closed before its
    head, and the pool keeps no connection."""
    with pytest.raises(ConnectionClosed) as info:
        await post(pool, server.url)
    assert (info.value.answered, info.value.received) == (False, received)
    assert server.accepted == 1
    assert pool.open_connections == 0


async def served_on_the_same_connection(
    server: ScriptedServer, pool: Http1Pool, expected: bytes
) -> None:
    """The next request gets `expected` over the one connection so far."""
    second = await post(pool, server.url)
    assert await within(second.read()) == expected
    assert server.accepted == 1


async def served_on_a_second_connection(server: ScriptedServer, pool: Http1Pool) -> None:
    """The next request gets its answer over a new connection (the first
    one was not kept)."""
    server.handler = answering(ok(b"next"))
    assert await within((await post(pool, server.url)).read()) == b"next"
    assert server.accepted == 2


async def post(
    pool: Http1Pool,
    url: str,
    path: str = "/v1/x",
    body: bytes = b"{}",
    headers: Mapping[str, str] | None = None,
    first_byte_s: float = WAIT_S,
    on_sent: Callable[[], None] | None = None,
) -> Response:
    return await pool.request(
        "POST",
        url,
        path,
        body,
        headers or {},
        connect_timeout_s=WAIT_S,
        first_byte_timeout_s=first_byte_s,
        on_sent=on_sent,
    )


async def read_all(response: Response) -> bytes:
    parts = []
    while data := await within(response.chunk()):
        parts.append(data)
    return b"".join(parts)


def free_port() -> int:
    """A port nobody listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    srv = ScriptedServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def pool() -> AsyncIterator[Http1Pool]:
    async with Http1Pool() as p:
        yield p


# --- requests and content-length responses ----------------------------------


async def test_content_length_response_and_the_exact_request_sent(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = answering(
        ok(b'{"ok": true}', "Content-Type: application/json", "X-Request-ID: abc")
    )
    body = b'{"model": "m", "prompt": "hi"}'
    response = await post(
        pool,
        f"{server.url}/prefix/",
        "/v1/x",
        body,
        {"authorization": "Bearer t", "x-tenant": "acme"},
    )
    assert response.status == 200
    assert response.headers == {
        "content-length": "12",
        "content-type": "application/json",
        "x-request-id": "abc",
    }
    assert await within(response.read()) == b'{"ok": true}'
    assert response.ended

    line, headers, sent_body = split_request(server.requests[0])
    assert line == "POST /prefix/v1/x HTTP/1.1"
    assert headers == [
        ("host", f"127.0.0.1:{server.port}"),
        ("content-length", str(len(body))),
        ("authorization", "Bearer t"),
        ("x-tenant", "acme"),
    ]
    assert sent_body == body


async def test_base_url_without_path_and_userinfo_kept_out_of_host(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    url = f"http://user:secret@127.0.0.1:{server.port}"
    response = await post(pool, url, "/health", b"")
    assert await within(response.read()) == b"hello"
    line, headers, sent_body = split_request(server.requests[0])
    assert line == "POST /health HTTP/1.1"
    assert dict(headers) == {"host": f"127.0.0.1:{server.port}", "content-length": "0"}
    assert sent_body == b""


async def test_other_methods_are_sent_as_given(server: ScriptedServer, pool: Http1Pool) -> None:
    response = await pool.request(
        "PUT", server.url, "/a?b=c", b"x", {}, connect_timeout_s=WAIT_S, first_byte_timeout_s=WAIT_S
    )
    await within(response.read())
    assert split_request(server.requests[0])[0] == "PUT /a?b=c HTTP/1.1"


async def test_non_http_url_is_a_value_error(pool: Http1Pool) -> None:
    for url in ("ftp://127.0.0.1/", "127.0.0.1:80", "http:///nohost"):
        with pytest.raises(ValueError, match="not an http"):
            await post(pool, url)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-evil": "a\r\nx-injected: 1"},
        {"x-evil": "a\nb"},
        {"x-evil": "a\rb"},
        {"x-evil\r\nx-injected": "1"},
    ],
)
async def test_header_with_line_break_is_refused_before_connecting(
    server: ScriptedServer, pool: Http1Pool, headers: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="line break"):
        await post(pool, server.url, headers=headers)
    assert server.accepted == 0
    assert pool.open_connections == 0


async def test_response_head_split_into_tiny_writes_is_parsed_whole(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    raw = ok(b"0123456789", "X-Long-Header-Name: some-long-value")

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        # Splits inside the status line, a header name, a value and the body.
        await peer.send(*(raw[i : i + 7] for i in range(0, len(raw), 7)), pause_s=0.002)
        await peer.wait_eof()

    server.handler = handler
    response = await post(pool, server.url)
    assert response.status == 200
    assert response.headers["x-long-header-name"] == "some-long-value"
    assert await within(response.read()) == b"0123456789"


async def test_repeated_header_names_are_joined_with_commas(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = answering(
        ok(b"", "Set-Cookie: a=1", "x-other: z", "set-cookie: b=2", "SET-COOKIE: c=3")
    )
    response = await post(pool, server.url)
    assert response.headers["set-cookie"] == "a=1, b=2, c=3"
    assert response.headers["x-other"] == "z"
    await within(response.read())


async def test_informational_100_continue_is_skipped(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            # The interim head comes alone first: the client must keep waiting.
            await peer.send(
                b"HTTP/1.1 100 Continue\r\nx-interim: 1\r\n\r\n",
                ok(b"final", "x-final: 1"),
                pause_s=0.05,
            )

    server.handler = handler
    response = await post(pool, server.url)
    assert response.status == 200
    assert response.headers == {"content-length": "5", "x-final": "1"}
    assert await within(response.read()) == b"final"
    # The connection stayed in a consistent state: the next exchange reuses it.
    await served_on_the_same_connection(server, pool, b"final")


async def test_204_without_length_ends_at_once_and_keeps_the_connection(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = answering(b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n", ok(b"next"))
    response = await post(pool, server.url)
    assert response.status == 204
    assert await within(response.read()) == b""
    await served_on_the_same_connection(server, pool, b"next")


async def test_error_status_is_a_response_not_an_exception(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = answering(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
    response = await post(pool, server.url)
    assert response.status == 503
    assert await within(response.read()) == b"busy"
    assert pool.open_connections == 1


# --- keep-alive ---------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = answering(ok(b"one"), ok(b"two"), ok(b"three"))
    for expected in (b"one", b"two", b"three"):
        response = await post(pool, server.url)
        assert pool.open_connections == 1
        assert await within(response.read()) == expected
        assert pool.open_connections == 1
    assert server.accepted == 1
    assert len(server.peers[0].requests) == 3


async def test_urls_with_the_same_origin_share_connections(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    for url in (f"{server.url}/a", f"{server.url}/b/", server.url):
        await within((await post(pool, url, "/x")).read())
    assert server.accepted == 1
    lines = [split_request(r)[0] for r in server.requests]
    assert lines == ["POST /a/x HTTP/1.1", "POST /b/x HTTP/1.1", "POST /x HTTP/1.1"]


async def test_concurrent_requests_each_get_a_connection_then_both_are_reused(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    both_arrived = asyncio.Event()

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            if len(peer.server.requests) >= 2:
                both_arrived.set()
            # Neither is answered before the other was sent: they overlap.
            await within(both_arrived.wait())
            await peer.send(ok(b"r"))

    server.handler = handler
    first, second = await within(asyncio.gather(post(pool, server.url), post(pool, server.url)))
    assert pool.open_connections == 2
    await within(first.read())
    await within(second.read())
    for _ in range(4):
        await within((await post(pool, server.url)).read())
    assert server.accepted == 2
    assert pool.open_connections == 2


async def test_connection_close_response_is_not_reused(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    # The server would keep serving: only the client's honouring of the
    # header closes the connection.
    server.handler = answering(ok(b"bye", "Connection: close"), ok(b"again"))
    first = await post(pool, server.url)
    assert await within(first.read()) == b"bye"
    assert pool.open_connections == 0
    await within(server.peers[0].eof.wait())
    second = await post(pool, server.url)
    assert await within(second.read()) == b"again"
    assert server.accepted == 2


async def test_http_1_0_response_without_keep_alive_is_not_reused(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = answering(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await within((await post(pool, server.url)).read())
    await within((await post(pool, server.url)).read())
    assert server.accepted == 2


async def test_idle_connection_expires_after_idle_s(server: ScriptedServer) -> None:
    async with Http1Pool(idle_s=0.05) as pool:
        await within((await post(pool, server.url)).read())
        await asyncio.sleep(0.1)
        await within((await post(pool, server.url)).read())
        assert server.accepted == 2
        # The expired one was closed, not just left behind.
        await within(server.peers[0].eof.wait())
        assert pool.open_connections == 1


async def test_idle_connections_of_unused_origins_are_swept(server: ScriptedServer) -> None:
    other = ScriptedServer()
    await other.start()
    try:
        async with Http1Pool(idle_s=0.05) as pool:
            await within((await post(pool, other.url)).read())
            await asyncio.sleep(0.1)
            # Releasing any connection after idle_s sweeps the other origin's.
            await within((await post(pool, server.url)).read())
            await within(other.peers[0].eof.wait())
            assert pool.open_connections == 1
    finally:
        await other.stop()


async def test_idle_connection_closed_by_server_is_replaced(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_closes(ok(b"first"))  # keep-alive, then gone
    await within((await post(pool, server.url)).read())
    # Let the client see the close while the connection is idle.
    await asyncio.sleep(0.05)
    server.handler = answering(ok(b"second"))
    response = await post(pool, server.url)
    assert await within(response.read()) == b"second"
    assert server.accepted == 2
    assert pool.open_connections == 1


async def test_request_on_connection_closed_as_it_was_sent_is_resent_once(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    await go_stale(server, pool)
    response = await post(pool, server.url, body=b"payload")
    assert await within(response.read()) == b"second"
    assert server.accepted == 2
    # Sent on the stale connection, then once more on the new one.
    assert [split_request(r)[2] for r in server.requests] == [b"{}", b"payload", b"payload"]


async def test_on_sent_runs_after_the_request_left_and_before_the_answer(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    answer = asyncio.Event()
    sent = asyncio.Event()
    seen: list[tuple[int, bool]] = []

    def on_sent() -> None:
        seen.append((len(server.requests), answer.is_set()))
        sent.set()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await answer.wait()
        await peer.send(ok(b"done"))

    server.handler = handler
    request = asyncio.ensure_future(post(pool, server.url, on_sent=on_sent))
    # The hook ran while the server still holds its answer back.
    await within(sent.wait())
    answer.set()
    response = await within(request)
    assert await within(response.read()) == b"done"
    assert seen == [(0, False)]  # once, as the bytes were handed over

    # Nothing was sent where nobody listens: no hook.
    with pytest.raises(ConnectFailed):
        await post(
            pool, f"http://127.0.0.1:{free_port()}", on_sent=lambda: seen.append((-1, False))
        )
    assert seen == [(0, False)]


async def test_on_sent_runs_again_when_a_stale_connection_is_replaced(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    await go_stale(server, pool)
    calls: list[int] = []
    response = await post(pool, server.url, on_sent=lambda: calls.append(server.accepted))
    assert await within(response.read()) == b"second"
    assert calls == [1, 2]  # on the stale connection, then on the new one


async def test_request_answered_in_part_on_reused_connection_is_not_resent(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    await go_stale(server, pool, last=b"HTTP/1.1 200 O")  # some bytes, then gone
    await closed_before_answer(server, pool, received=True)


# --- body framing and streaming -------------------------------------------------


async def test_chunked_body_streams_piece_by_piece_then_reuses_connection(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    go: asyncio.Queue[None] = asyncio.Queue()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_HEAD + chunk(b"alpha"))
        for piece in (b"beta", b"gamma"):
            await go.get()  # the next piece only after the client got the last
            await peer.send(chunk(piece))
        await go.get()
        await peer.send(LAST_CHUNK)
        await answering(ok(b"after"))(peer)

    server.handler = handler
    response = await post(pool, server.url)
    assert response.status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert await within(response.chunk()) == b"alpha"
    go.put_nowait(None)
    assert await within(response.chunk()) == b"beta"
    go.put_nowait(None)
    assert await within(response.chunk()) == b"gamma"
    assert not response.ended
    go.put_nowait(None)
    assert await within(response.chunk()) == b""
    assert response.ended
    assert await within(response.chunk()) == b""  # stays at the end
    response.release()
    assert await response.chunk() == b""  # released: nothing more
    second = await post(pool, server.url)
    assert await within(second.read()) == b"after"
    assert server.accepted == 1


async def test_chunked_body_read_whole(server: ScriptedServer, pool: Http1Pool) -> None:
    server.handler = answering(CHUNKED_HEAD + chunk(b"ab") + chunk(b"cd") + LAST_CHUNK)
    response = await post(pool, server.url)
    assert await within(response.read()) == b"abcd"
    assert pool.open_connections == 1


async def test_content_length_body_streamed_with_chunk(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            raw = ok(b"x" * 30000)
            await peer.send(raw[:1000], raw[1000:], pause_s=0.02)

    server.handler = handler
    response = await post(pool, server.url)
    assert await read_all(response) == b"x" * 30000
    assert response.ended
    response.release()
    assert pool.open_connections == 1


async def test_body_until_close_is_read_whole_and_not_reused(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_closes(
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\npart one, ", b"part two", pause_s=0.02
    )
    response = await post(pool, server.url)
    assert await within(response.read()) == b"part one, part two"
    assert pool.open_connections == 0
    await served_on_a_second_connection(server, pool)


async def test_body_until_close_streamed_with_chunk(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_closes(b"HTTP/1.1 200 OK\r\n\r\nabc", b"def", pause_s=0.02)
    response = await post(pool, server.url)
    assert await read_all(response) == b"abcdef"
    assert response.ended


async def test_body_exactly_max_body_is_accepted(
    server: ScriptedServer, pool: Http1Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http1, "MAX_BODY", 1000)
    server.handler = answering(ok(b"a" * 1000))
    assert await within((await post(pool, server.url)).read()) == b"a" * 1000


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "several-reads"])
async def test_whole_body_over_max_body_is_bad_response(
    server: ScriptedServer, pool: Http1Pool, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    monkeypatch.setattr(http1, "MAX_BODY", 1000)
    raw = ok(b"a" * 5000)

    server.handler = sends_then_waits(*([raw[:600], raw[600:]] if split else [raw]), pause_s=0.02)
    response = await post(pool, server.url)
    with pytest.raises(BadResponse, match="exceeds 1000 bytes"):
        await within(response.read())
    await within(server.peers[0].eof.wait())
    assert pool.open_connections == 0


async def test_chunked_body_over_max_body_is_bad_response(
    server: ScriptedServer, pool: Http1Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http1, "MAX_BODY", 1000)
    server.handler = answering(CHUNKED_HEAD + chunk(b"a" * 800) + chunk(b"b" * 800) + LAST_CHUNK)
    response = await post(pool, server.url)
    with pytest.raises(BadResponse):
        await within(response.read())


async def flow_control_scenario() -> None:
    """A stalled stream consumer stalls the backend; the body then arrives intact.

    Self-contained (own server and pool) so that it also runs on uvloop."""
    high_water = http1.HIGH_WATER
    payload = os.urandom(8 * 1024 * 1024)
    piece = 64 * 1024
    drained = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        # A small send buffer keeps what the kernels hold well below the
        # payload, so the stall can only come from the client.
        peer.writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024
        )
        peer.writer.write(CHUNKED_HEAD)
        for i in range(0, len(payload), piece):
            peer.writer.write(chunk(payload[i : i + piece]))
        peer.writer.write(LAST_CHUNK)
        await peer.writer.drain()
        drained.set()
        await answering(ok(b"next"))(peer)

    server = ScriptedServer()
    server.handler = handler
    await server.start()
    try:
        async with Http1Pool() as pool:
            response = await post(pool, server.url)
            received = [await within(response.chunk())]  # now a stream consumer
            await asyncio.sleep(0.3)  # and a stalled one
            assert not drained.is_set(), "the backend was not slowed down"
            # All that was buffered meanwhile: up to HIGH_WATER, plus the
            # rest of the socket read that crossed it (256 KiB at most).
            buffered = await within(response.chunk())
            assert len(buffered) <= high_water + 256 * 1024
            received.append(buffered)
            received.append(await read_all(response))
            body = b"".join(received)
            assert len(body) == len(payload)
            assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()
            await within(drained.wait())
            response.release()
            assert await within((await post(pool, server.url)).read()) == b"next"
            assert server.accepted == 1
    finally:
        await server.stop()


async def test_stalled_stream_consumer_stalls_the_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "HIGH_WATER", 64 * 1024)
    await flow_control_scenario()


def run_on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_stalled_stream_consumer_stalls_the_backend_on_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # uvloop (what the gateway runs on) has its own transports, whose
    # pause_reading and read sizes differ from asyncio's.
    monkeypatch.setattr(http1, "HIGH_WATER", 64 * 1024)
    await asyncio.to_thread(run_on_uvloop, flow_control_scenario)


async def uvloop_exchanges_scenario() -> None:
    """Keep-alive, the three body framings and the resend on uvloop."""
    server = ScriptedServer()

    async def handler(peer: Peer) -> None:
        if peer is server.peers[0]:
            await peer.read_request()
            await peer.send(ok(b"one"))
            await peer.read_request()
            await peer.send(CHUNKED_HEAD + chunk(b"t") + chunk(b"wo") + LAST_CHUNK)
            await peer.read_request()  # closed unanswered: to be resent
        else:
            await peer.read_request()
            await peer.send(b"HTTP/1.1 200 OK\r\n\r\nthree")

    server.handler = handler
    await server.start()
    try:
        async with Http1Pool() as pool:
            assert await within((await post(pool, server.url)).read()) == b"one"
            streamed = await post(pool, server.url)
            assert await read_all(streamed) == b"two"
            streamed.release()
            assert server.accepted == 1
            assert await within((await post(pool, server.url)).read()) == b"three"
            assert server.accepted == 2
            assert len(server.requests) == 4
            assert pool.open_connections == 0
    finally:
        await server.stop()


async def test_keep_alive_and_framing_on_uvloop() -> None:
    await asyncio.to_thread(run_on_uvloop, uvloop_exchanges_scenario)


# --- broken, slow and malformed answers -------------------------------------


async def test_close_before_answering_on_fresh_connection_is_not_retried(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_closes()
    await closed_before_answer(server, pool, received=False)


async def test_close_mid_body_fails_read_as_answered(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_closes(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
    response = await post(pool, server.url)
    with pytest.raises(ConnectionClosed) as info:
        await within(response.read())
    assert (info.value.answered, info.value.received) == (True, True)
    assert pool.open_connections == 0
    with pytest.raises(HttpClientError, match="already released"):
        await response.read()


async def test_close_mid_chunked_body_fails_chunk_after_the_bytes_that_arrived(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_closes(CHUNKED_HEAD + chunk(b"0123456789"))
    response = await post(pool, server.url)
    assert await within(response.chunk()) == b"0123456789"
    with pytest.raises(ConnectionClosed) as info:
        await within(response.chunk())
    assert info.value.answered is True
    assert not response.ended
    response.close()
    assert pool.open_connections == 0


async def test_connection_refused_is_connect_failed(pool: Http1Pool) -> None:
    with pytest.raises(ConnectFailed, match="failed"):
        await post(pool, f"http://127.0.0.1:{free_port()}")
    assert pool.open_connections == 0


@pytest.mark.skipif(
    sys.platform != "linux", reason="relies on Linux dropping SYNs to a full backlog"
)
async def test_connect_timeout_is_connect_failed(pool: Http1Pool) -> None:
    # A listening socket with a full backlog and no accept() leaves further
    # SYNs unanswered on Linux, so the connect itself hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(ConnectFailed, match="timed out"):
                await pool.request(
                    "POST",
                    f"http://127.0.0.1:{port}",
                    "/",
                    b"",
                    {},
                    connect_timeout_s=0.2,
                    first_byte_timeout_s=WAIT_S,
                )
            assert time.monotonic() - start < 2.0
        finally:
            for filler in fillers:
                filler.close()


async def test_no_answer_within_first_byte_timeout_is_timeout_and_closes(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.wait_eof()

    server.handler = handler
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await post(pool, server.url, first_byte_s=0.2)
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 1.5
    await within(server.peers[0].eof.wait())
    assert pool.open_connections == 0


async def test_a_steady_stream_outlasts_its_per_chunk_timeout_many_times(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    # Eight chunks 0.1 s apart take twice the 0.4 s allowed between chunks:
    # each wait gets its own 0.4 s, whatever the one timer was first set to.
    parts = [chunk(b"%d" % i) for i in range(8)]
    server.handler = sends_then_waits(CHUNKED_HEAD, *parts, LAST_CHUNK, pause_s=0.1)
    response = await post(pool, server.url)
    got = []
    while data := await within(response.chunk(0.4)):
        got.append(data)
    assert b"".join(got) == b"01234567"


async def test_a_stall_after_some_chunks_times_out_on_time(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_waits(CHUNKED_HEAD, chunk(b"a"), chunk(b"b"), pause_s=0.05)
    response = await post(pool, server.url)
    assert await within(response.chunk(5.0)) == b"a"
    assert await within(response.chunk(5.0)) == b"b"
    # A shorter budget than the timer already set: it must not wait 5 s.
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(response.chunk(0.2))
    assert 0.19 <= time.monotonic() - start < 1.5
    # Nothing can be waited for in no time at all.
    with pytest.raises(TimeoutError):
        await within(response.chunk(0.0))


async def test_a_whole_body_that_stops_coming_times_out(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_waits(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    response = await post(pool, server.url)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        await within(response.read(0.2))
    assert 0.19 <= time.monotonic() - start < 1.5


async def test_a_reused_connections_wait_is_not_cut_short_by_the_last_responses_timer(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_HEAD, chunk(b"x"), LAST_CHUNK)
        await peer.read_request()
        await asyncio.sleep(0.4)  # longer than the first response's budget
        await peer.send(ok(b"late"))
        await peer.wait_eof()

    server.handler = handler
    first = await post(pool, server.url)
    assert await read_all_within(first, 0.2) == b"x"
    first.release()
    second = await post(pool, server.url, first_byte_s=2.0)
    assert await within(second.read()) == b"late"
    assert server.accepted == 1


async def read_all_within(response: Response, timeout_s: float) -> bytes:
    parts = []
    while data := await within(response.chunk(timeout_s)):
        parts.append(data)
    return b"".join(parts)


async def test_cancelled_request_closes_its_connection(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.wait_eof()

    server.handler = handler
    task = asyncio.create_task(post(pool, server.url))
    await within(server.request_seen.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await within(server.peers[0].eof.wait())
    assert pool.open_connections == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage that is not http\r\n\r\n",
        b"HTTP/1.1 abc OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "bad-header", "bad-length"],
)
async def test_malformed_head_is_bad_response(
    server: ScriptedServer, pool: Http1Pool, answer: bytes
) -> None:
    server.handler = sends_then_waits(answer)
    with pytest.raises(BadResponse, match="malformed"):
        await post(pool, server.url)
    await within(server.peers[0].eof.wait())
    assert pool.open_connections == 0


async def test_malformed_chunked_body_is_bad_response(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_waits(CHUNKED_HEAD + chunk(b"ok") + b"zz\r\nnot a chunk\r\n")
    response = await post(pool, server.url)
    with pytest.raises(BadResponse):
        await within(response.read())
    await within(server.peers[0].eof.wait())


async def test_protocol_switch_is_bad_response(server: ScriptedServer, pool: Http1Pool) -> None:
    server.handler = answering(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )
    with pytest.raises(BadResponse):
        await post(pool, server.url)
    assert pool.open_connections == 0


async def test_unsolicited_bytes_on_idle_connection_close_it(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_waits(ok(b"first"), b"HTTP/1.1 200 OK\r\n", pause_s=0.02)
    await within((await post(pool, server.url)).read())
    # The stray bytes made the idle connection unusable: the client drops it.
    await within(server.peers[0].eof.wait())
    await served_on_a_second_connection(server, pool)


# --- closing ------------------------------------------------------------------


async def test_response_close_mid_body_closes_the_socket(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_waits(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
    response = await post(pool, server.url)
    assert await within(response.chunk()) == b"0123456789"
    assert not response.ended
    response.close()
    await within(server.peers[0].eof.wait())
    assert pool.open_connections == 0
    response.close()  # idempotent
    await served_on_a_second_connection(server, pool)


async def test_release_before_the_body_ended_closes_the_socket(
    server: ScriptedServer, pool: Http1Pool
) -> None:
    server.handler = sends_then_waits(CHUNKED_HEAD + chunk(b"partial"))
    response = await post(pool, server.url)
    assert await within(response.chunk()) == b"partial"
    response.release()
    await within(server.peers[0].eof.wait())
    assert pool.open_connections == 0


async def test_pool_close_closes_idle_and_in_use_connections(server: ScriptedServer) -> None:
    async def handler(peer: Peer) -> None:
        if peer is server.peers[0]:
            await peer.read_request()
            await peer.send(CHUNKED_HEAD + chunk(b"streaming"))
            await peer.wait_eof()
        else:
            await answering(ok(b"idle"))(peer)

    server.handler = handler
    pool = Http1Pool()
    streaming = await post(pool, server.url)
    assert await within(streaming.chunk()) == b"streaming"
    assert await within((await post(pool, server.url)).read()) == b"idle"
    assert pool.open_connections == 2
    await pool.close()
    assert pool.open_connections == 0
    await within(server.peers[0].eof.wait())
    await within(server.peers[1].eof.wait())


# --- TLS ----------------------------------------------------------------------


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) files for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / "cert.pem"
    key_file = directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[ScriptedServer, Path]]:
    cert_file, key_file = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    srv = ScriptedServer()
    await srv.start(ssl_context=context)
    try:
        yield srv, cert_file
    finally:
        await srv.stop()


async def test_https_request_with_trusted_certificate(
    tls_server: tuple[ScriptedServer, Path],
) -> None:
    server, cert_file = tls_server
    server.handler = answering(ok(b"secure one"), ok(b"secure two"))
    trust = ssl.create_default_context(cafile=str(cert_file))
    async with Http1Pool(ssl_context=trust) as pool:
        url = f"https://localhost:{server.port}/base"
        first = await post(pool, url)
        assert first.status == 200
        assert await within(first.read()) == b"secure one"
        assert await within((await post(pool, url)).read()) == b"secure two"
        assert server.accepted == 1
        line, headers, _ = split_request(server.requests[0])
        assert line == "POST /base/v1/x HTTP/1.1"
        assert dict(headers)["host"] == f"localhost:{server.port}"


async def test_https_with_untrusted_certificate_is_connect_failed(
    tls_server: tuple[ScriptedServer, Path],
) -> None:
    server, _ = tls_server
    # The default context trusts the system's store, where this cert is not.
    async with Http1Pool() as pool:
        with pytest.raises(ConnectFailed) as info:
            await post(pool, f"https://localhost:{server.port}")
        assert isinstance(info.value.__cause__, ssl.SSLError)
        assert pool.open_connections == 0
