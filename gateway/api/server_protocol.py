"""uvicorn's HTTP protocol, with a response's head and body sent in one write.

uvicorn writes a response's status line and headers to the socket when the
app sends ``http.response.start``, and the body with the next message: two
system calls and two TCP segments for every whole JSON answer, and a client
woken twice. `CoalescingHttpToolsProtocol` gives uvicorn a transport that
holds the head until the next write, so that a head and a body sent in one
step of the app (every non-streamed answer) leave together. A head with
nothing right behind it (a stream waiting for its first event) is written
on the next turn of the event loop, and closing the connection writes it
first, so nothing is reordered or lost.

`tollgate gateway` passes the class to uvicorn as its ``http`` protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"


class HeadHoldingTransport:
    """A transport that holds a response head until the next write."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data``, joined to a held head; hold it if it is a head."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
            return
        if isinstance(data, bytes) and data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Write a held head now (dropped if the connection is closing)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def abort(self) -> None:
        """Drop a held head and the connection."""
        self._held = None
        self._transport.abort()

    def close(self) -> None:
        """Write a held head, then close."""
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        # Everything else (flow control, extra info, is_closing, abort) is the
        # real transport's.
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `HeadHoldingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Wrap the connection's transport, then set up as uvicorn does."""
        holding = HeadHoldingTransport(transport, asyncio.get_running_loop())
        super().connection_made(holding)  # type: ignore[arg-type]
