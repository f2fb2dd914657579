"""`Answer`: what the inference fast path sends over ASGI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from litestar import Response
from litestar.response import Stream

from gateway.api.asgi import Answer, ResponseHead


class Connection:
    """An ASGI connection whose client leaves after ``leave_after`` body messages."""

    def __init__(self, leave_after: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave_after = leave_after
        self._left = asyncio.Event()

    async def send(self, message: Any) -> None:
        self.sent.append(message)
        bodies = sum(1 for m in self.sent if m["type"] == "http.response.body")
        if self.leave_after is not None and bodies >= self.leave_after:
            self._left.set()

    async def receive(self) -> Any:
        await self._left.wait()
        return {"type": "http.disconnect"}


async def test_a_whole_body_goes_out_with_litestars_headers() -> None:
    conn = Connection()
    await Answer({"x-request-id": "r1"}, b'{"ok":true}').send(conn.receive, conn.send)
    start, body = conn.sent
    assert start == {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"x-request-id", b"r1"),
            (b"content-type", b"application/json"),
            (b"content-length", b"11"),
        ],
    }
    assert body == {"type": "http.response.body", "body": b'{"ok":true}', "more_body": False}


async def test_a_head_made_ahead_goes_out_as_made_and_the_stream_lets_it_go() -> None:
    head = ResponseHead({"x-request-id": "r1", "x-tollgate-model": "m"})
    assert head.encoded == [(b"x-request-id", b"r1"), (b"x-tollgate-model", b"m")]
    conn = Connection()
    await Answer(head.headers, b"{}", encoded=head.encoded).send(conn.receive, conn.send)
    assert conn.sent[0]["headers"] == [
        *head.encoded,
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
    ]

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"

    answer = Answer(head.headers, chunks=chunks(), encoded=head.encoded)
    conn = Connection()
    await answer.send(conn.receive, conn.send)
    assert conn.sent[0]["headers"] == [
        *head.encoded,
        (b"content-type", b"text/event-stream; charset=utf-8"),
    ]
    assert answer.encoded is None  # nothing of the head stays with a held stream


async def test_a_whole_bodys_after_hook_runs_once_the_body_was_handed_over() -> None:
    conn = Connection()
    seen: list[int] = []

    async def after() -> None:
        seen.append(len(conn.sent))  # the bookkeeping never delays the body

    await Answer({}, b"{}", after=after).send(conn.receive, conn.send)
    assert seen == [2]


async def test_a_whole_bodys_after_hook_runs_even_when_sending_fails() -> None:
    seen: list[str] = []

    async def broken_send(message: Any) -> None:
        raise OSError("connection reset")

    async def after() -> None:
        seen.append("after")

    conn = Connection()
    with pytest.raises(OSError):
        await Answer({}, b"{}", after=after).send(conn.receive, broken_send)
    assert seen == ["after"]


async def test_a_stream_sends_every_chunk_then_the_end_then_runs_after() -> None:
    finished: list[str] = []

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def after() -> None:
        finished.append("after")

    conn = Connection()
    await Answer({"cache-control": "no-cache"}, chunks=chunks(), after=after).send(
        conn.receive, conn.send
    )
    assert conn.sent[0]["headers"] == [
        (b"cache-control", b"no-cache"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
    ]
    assert [(m["body"], m["more_body"]) for m in conn.sent[1:]] == [
        (b"data: 1\n\n", True),
        (b"data: 2\n\n", True),
        (b"", False),
    ]
    assert finished == ["after"]


async def test_a_client_that_leaves_cancels_the_stream_and_the_request_still_finishes() -> None:
    events: list[str] = []

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(30)  # the backend is slow; the client leaves meanwhile
            yield b"data: 2\n\n"
        finally:
            events.append("generator finally")

    async def after() -> None:
        events.append("after")

    conn = Connection(leave_after=1)
    await asyncio.wait_for(
        Answer({}, chunks=chunks(), after=after).send(conn.receive, conn.send), timeout=5
    )
    assert events == ["generator finally", "after"]
    assert [m["body"] for m in conn.sent[1:]] == [b"data: 1\n\n"]
    task = asyncio.current_task()
    assert task is not None and not task.cancelling()


async def test_the_same_answer_as_a_litestar_response() -> None:
    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b"x"

    async def after() -> None:
        pass

    whole = Answer({"x-a": "1"}, b"{}", after=after).to_response()
    assert isinstance(whole, Response) and not isinstance(whole, Stream)
    assert whole.media_type == "application/json"
    assert whole.background is not None
    stream = Answer({"x-a": "1"}, chunks=chunks(), after=after).to_response()
    assert isinstance(stream, Stream)
    assert stream.background is not None
