"""The answer of an inference request, sent straight over ASGI.

`POST /v1/chat/completions` and `POST /v1/completions` are the gateway's hot
path: `gateway.app.GatewayApp` hands them to their handler without Litestar's
router, handler signature parsing and response classes (about a fifth of the
gateway's CPU per request, measured with py-spy), and the handler returns an
`Answer` that is sent here as two ASGI messages, or as a stream of them.
Every other path, and these paths' errors, still go through Litestar, so
errors keep one format.

The bytes on the wire are the ones Litestar's `Response` and `Stream` send:
the same headers in the same order (the handler's, then ``content-type`` and,
for a whole body, ``content-length``). A stream is cancelled when its client
disconnects, as Litestar's is: a task waits for ``http.disconnect`` and
cancels the sending task, so the body generator's ``finally`` (settle,
release, log) runs at once; ``after`` runs once the stream is over either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from litestar import Response
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream
from litestar.types import HTTPResponseStartEvent, Receive, Send

JSON_TYPE = b"application/json"
EVENT_STREAM_TYPE = b"text/event-stream; charset=utf-8"
"""What Litestar sends for ``media_type="text/event-stream"`` (charset added)."""


@dataclass(slots=True)
class ResponseHead:
    """An answer's headers, and the same encoded for ASGI when made: the
    handler makes them while the backend works, so that encoding them is
    not on the way from the backend's answer to the client."""

    headers: dict[str, str]
    encoded: list[tuple[bytes, bytes]] = field(init=False)

    def __post_init__(self) -> None:
        self.encoded = encode_headers(self.headers)


def encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """``headers`` as ASGI's list of byte pairs."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


@dataclass(slots=True)
class Answer:
    """A successful response of an inference request: a whole JSON ``body``,
    or the server-sent events of ``chunks``."""

    headers: dict[str, str]
    body: bytes = b""
    chunks: AsyncGenerator[bytes, None] | None = None
    after: Callable[[], Awaitable[None]] | None = None
    """Runs once the answer is over: a whole body handed to the server, or a
    stream that ended, was cancelled, or never started. The request's
    bookkeeping (log line, metrics, settling) goes here, so that the client
    does not wait for it."""
    encoded: list[tuple[bytes, bytes]] | None = None
    """``headers`` already encoded (`ResponseHead`); encoded when sent if None."""

    def to_response(self) -> Response[bytes] | Stream:
        """The same answer as a Litestar response (paths Litestar routes)."""
        background = BackgroundTask(self.after) if self.after is not None else None
        if self.chunks is None:
            return Response(
                self.body,
                media_type="application/json",
                headers=self.headers,
                background=background,
            )
        return Stream(
            self.chunks, media_type="text/event-stream", headers=self.headers, background=background
        )

    async def send(self, receive: Receive, send: Send) -> None:
        """Send the answer on an ASGI connection."""
        if self.chunks is None:
            length = (b"content-length", str(len(self.body)).encode())
            try:
                await send(self._start((b"content-type", JSON_TYPE), length))
                await send({"type": "http.response.body", "body": self.body, "more_body": False})
            finally:
                if self.after is not None:
                    await self.after()
            return
        # The head is let go once sent: nothing of it stays referenced for
        # the stream's whole life (1,000 held streams count every byte).
        start = self._start((b"content-type", EVENT_STREAM_TYPE))
        self.encoded = None
        await send(start)
        del start
        try:
            await _send_chunks(self.chunks, receive, send)
        finally:
            if self.after is not None:
                await self.after()

    def _start(self, *extra: tuple[bytes, bytes]) -> HTTPResponseStartEvent:
        encoded = self.encoded if self.encoded is not None else encode_headers(self.headers)
        headers = [*encoded, *extra]
        return {"type": "http.response.start", "status": 200, "headers": headers}


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_chunks(chunks: AsyncGenerator[bytes, None], receive: Receive, send: Send) -> None:
    """Send ``chunks`` as body messages until they end or the client leaves."""
    task = asyncio.current_task()
    assert task is not None
    sending = True
    left = False

    def on_disconnect(watch: asyncio.Task[None]) -> None:
        nonlocal left
        # A done callback runs between the task's steps; once `sending` is
        # off the stream is over and the disconnect must not cancel anything.
        if sending and not watch.cancelled() and watch.exception() is None:
            left = True
            task.cancel()

    watch = asyncio.get_running_loop().create_task(_until_disconnect(receive))
    watch.add_done_callback(on_disconnect)
    try:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not left:
            raise
        task.uncancel()  # the client left: end the stream, not the request task
    finally:
        sending = False
        watch.cancel()
        # Runs the generator's `finally` now (settle, release, log) when the
        # client left while it was suspended at a `yield`.
        await chunks.aclose()
