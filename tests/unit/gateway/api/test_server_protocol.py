"""`HeadHoldingTransport` and the uvicorn protocol that uses it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.api.server_protocol import CoalescingHttpToolsProtocol, HeadHoldingTransport
from tests.support.processes import free_port, wait_http

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorded:
    """The socket side of a transport: every write call, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def holding(recorded: Recorded) -> HeadHoldingTransport:
    return HeadHoldingTransport(recorded, asyncio.get_running_loop())  # type: ignore[arg-type]


async def test_a_head_and_the_body_behind_it_leave_in_one_write() -> None:
    recorded = Recorded()
    transport = holding(recorded)
    transport.write(HEAD)
    assert recorded.writes == []
    transport.write(b"{}")
    assert recorded.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)
    assert recorded.writes == [HEAD + b"{}"]  # the pending flush finds nothing


async def test_a_head_alone_leaves_on_the_next_turn_of_the_loop() -> None:
    recorded = Recorded()
    transport = holding(recorded)
    transport.write(HEAD)
    await asyncio.sleep(0)
    assert recorded.writes == [HEAD]
    transport.write(b"5\r\nhello\r\n")
    assert recorded.writes == [HEAD, b"5\r\nhello\r\n"]


async def test_other_bytes_pass_straight_through() -> None:
    recorded = Recorded()
    transport = holding(recorded)
    transport.write(b"HTTP/1.1 looks like a head but has no blank line")
    transport.write(b"0\r\n\r\n")
    assert recorded.writes == [b"HTTP/1.1 looks like a head but has no blank line", b"0\r\n\r\n"]


async def test_closing_writes_a_held_head_first_and_abort_drops_it() -> None:
    recorded = Recorded()
    transport = holding(recorded)
    transport.write(HEAD)
    transport.close()
    assert recorded.writes == [HEAD] and recorded.closed

    dropped = Recorded()
    transport = holding(dropped)
    transport.write(HEAD)
    transport.abort()
    await asyncio.sleep(0)
    assert dropped.writes == [] and dropped.aborted


async def test_everything_else_is_the_real_transports() -> None:
    recorded = Recorded()
    transport = holding(recorded)
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
    assert not transport.is_closing()


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.01)  # the head leaves alone, before the first chunk
        for part in (b"a", b"b"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = scope["path"].encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        _app, port=port, log_level="warning", lifespan="on", http=CoalescingHttpToolsProtocol
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", 30)
    yield url
    running.should_exit = True
    thread.join(10)


def test_whole_and_streamed_answers_keep_alive_on_one_connection(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for path in ("/one", "/stream", "/two", "/stream", "/three"):
            response = client.get(path)
            assert response.status_code == 200
            assert response.content == (b"ab" if path == "/stream" else path.encode())
        assert response.http_version == "HTTP/1.1"
