"""A small closed-loop HTTP/1.1 load generator on bare asyncio streams.

General-purpose clients (httpx, the openai SDK) spend several hundred
microseconds of CPU per request; on a 2-core machine that would measure the
client, not the server. This one writes pre-built request bytes on keep-alive
connections and parses only the status line, the headers it needs, and
Content-Length or chunked bodies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    """One request as the client saw it."""

    status: int
    ttfb_s: float
    """Until the first body bytes (the whole body when not chunked)."""
    total_s: float
    overhead_ms: float | None
    """The gateway's own `x-tollgate-overhead-ms`, when present."""
    body_bytes: int


def build_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """Raw bytes of a keep-alive POST."""
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> Result:
    """Send one request on an open connection and read the whole response."""
    start = time.perf_counter()
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length: int | None = None
    chunked = False
    overhead: float | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "x-tollgate-overhead-ms":
            overhead = float(value)
    size = 0
    first: float | None = None
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            n = int(size_line.split(b";", 1)[0], 16)
            await reader.readexactly(n + 2)
            if n == 0:
                break
            if first is None:
                first = time.perf_counter()
            size += n
    elif length:
        await reader.readexactly(length)
        size = length
    end = time.perf_counter()
    return Result(status, (first or end) - start, end - start, overhead, size)


async def closed_loop(
    port: int, raw: bytes, concurrency: int, duration_s: float, warmup_s: float = 1.0
) -> tuple[list[Result], float]:
    """`concurrency` connections each sending `raw` back to back for
    `warmup_s + duration_s`; returns results after the warm-up and the
    measured seconds."""
    results: list[Result] = []
    begin = time.perf_counter()
    measure_from = begin + warmup_s
    stop_at = measure_from + duration_s

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                result = await exchange(reader, writer, raw)
                if sent >= measure_from:
                    results.append(result)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, stop_at - measure_from


async def hold_streams(
    port: int, raw: bytes, count: int, on_all_started: asyncio.Event | None = None
) -> list[Result]:
    """Open `count` streaming requests at once and read them to the end;
    `on_all_started` is set once every stream has sent its first bytes."""
    started = 0
    all_started = on_all_started or asyncio.Event()

    async def one() -> Result:
        nonlocal started
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        try:
            start = time.perf_counter()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            first = time.perf_counter()
            started += 1
            if started == count:
                all_started.set()
            size = 0
            while status == 200:
                n = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                await reader.readexactly(n + 2)
                if n == 0:
                    break
                size += n
            return Result(status, first - start, time.perf_counter() - start, None, size)
        finally:
            writer.close()

    return await asyncio.gather(*(one() for _ in range(count)))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
