"""A fast fake OpenAI-compatible backend, for measuring the gateway itself and
for faults a real backend cannot be made to produce.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies, chunked
responses) on a bare asyncio protocol, so that it costs far less CPU per
request than the gateway in front of it; a benchmark then measures the
gateway, not the fake.

Run: ``python -m tests.support.fake_upstream --port 9000 [--completion-tokens 16]``

Per-request behaviour can be set with an ``x_fake`` object in the request body
(the gateway passes unknown fields through):

- ``delay_ms``: wait before sending the status line;
- ``delay_jitter_ms``: add a uniformly random ``[-j, +j]`` to ``delay_ms``
  (model calls never take exactly the same time, and a fixed delay keeps a
  closed-loop load generator's clients in lock-step);
- ``completion_tokens``: tokens to "generate" (capped by ``max_tokens``);
- ``prompt_tokens``: the prompt token count to report (default: bytes / 4);
- ``chunk_interval_ms``: pause between stream chunks;
- ``stall_after_chunks``: stop sending (but keep the connection) after N chunks;
- ``close_after_chunks``: drop the connection after N chunks;
- ``status``: answer with this HTTP status and an OpenAI-format error.

``GET /fake/counters`` reports requests seen, completed, and cancelled (the
client closed the connection before the response ended), so tests can see a
cancellation reach the backend. ``POST /fake/reset`` zeroes them.

``--step-ms A --step-per-seq-ms B`` simulate a batched decoder, for
balancing benchmarks: every running request gets one token per step, and a
step takes ``A + B * running`` milliseconds, so a replica with more work
answers more slowly (as a real continuous-batching engine does). ``GET
/stats`` reports the tokens still to generate as ``active_decode_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass
class Counters:
    """What the fake has seen since start or the last reset."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    in_flight: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class FakeConfig:
    """Defaults for every request; ``x_fake`` in a body overrides them."""

    completion_tokens: int = 16
    chunk_interval_ms: float = 0.0
    delay_ms: float = 0.0
    model: str = "smollm2"
    step_ms: float = 0.0
    """Simulated decode step (0: tokens cost no time); see the module docstring."""
    step_per_seq_ms: float = 0.0
    status: int = 200
    """Status of every completion (``x_fake.status`` overrides): a failing replica."""


class _Progress:
    """Tokens one request has yet to generate."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


class _Decoder:
    """A batched decoder's timing: each step gives every running sequence one
    token and takes ``step_ms + step_per_seq_ms * running``."""

    def __init__(self, step_ms: float, per_seq_ms: float) -> None:
        self.step_s = step_ms / 1000
        self.per_seq_s = per_seq_ms / 1000
        self.running: dict[int, asyncio.Queue[None]] = {}
        self._ids = 0
        self._task: asyncio.Task[None] | None = None

    async def tokens(self, count: int) -> Any:
        """Yield once per generated token, at the simulated pace."""
        self._ids += 1
        key = self._ids
        queue: asyncio.Queue[None] = asyncio.Queue()
        self.running[key] = queue
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            for _ in range(count):
                await queue.get()
                yield None
        finally:
            self.running.pop(key, None)

    async def _run(self) -> None:
        while self.running:
            await asyncio.sleep(self.step_s + self.per_seq_s * len(self.running))
            for queue in list(self.running.values()):
                queue.put_nowait(None)


class _Connection(asyncio.Protocol):
    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they
        # have the same methods: cast rather than assert.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        if self.busy:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._serve(method, target, body))

    async def _serve(self, method: str, target: str, body: bytes) -> None:
        try:
            await self.server.handle(self, method, target.split("?", 1)[0], body)
        except asyncio.CancelledError:
            pass
        finally:
            self.busy = False
            if not self.closed:
                self._next()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def respond(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self.write(head.encode() + body)

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FakeUpstream:
    """The fake backend's request handling, independent of the socket layer."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.started = int(time.time())
        self.active_tokens = 0
        """Tokens the requests in flight have yet to generate."""
        self.decoder = (
            _Decoder(config.step_ms, config.step_per_seq_ms) if config.step_ms > 0 else None
        )

    async def handle(self, conn: _Connection, method: str, path: str, body: bytes) -> None:
        """Answer one request on `conn`."""
        if method == "GET":
            self._get(conn, path)
            return
        if path == "/fake/reset":
            self.counters = Counters()
            conn.respond(200, b"{}")
            return
        if path not in ("/v1/chat/completions", "/v1/completions"):
            conn.respond(404, _error("not found", "invalid_request_error"))
            return
        request: dict[str, Any] = json.loads(body or b"{}")
        fake: dict[str, Any] = request.get("x_fake") or {}
        self.counters.requests += 1
        self.counters.in_flight += 1
        finished = False
        try:
            delay = float(fake.get("delay_ms", self.config.delay_ms))
            jitter = float(fake.get("delay_jitter_ms", 0.0))
            if jitter:
                delay = max(0.0, delay + random.uniform(-jitter, jitter))
            if delay:
                await asyncio.sleep(delay / 1000)
            status = int(fake.get("status", self.config.status))
            if status != 200:
                conn.respond(status, _error(f"fake status {status}", "server_error"))
                finished = True
                return
            usage = self._usage(request, fake, len(body))
            chat = path == "/v1/chat/completions"
            progress = _Progress(usage["completion_tokens"])
            self.active_tokens += progress.left
            try:
                if request.get("stream"):
                    finished = await self._stream(conn, request, fake, usage, chat, progress)
                else:
                    if self.decoder is not None:
                        async for _ in self.decoder.tokens(progress.left):
                            progress.left -= 1
                            self.active_tokens -= 1
                    conn.respond(200, json.dumps(_completion(request, usage, chat)).encode())
                    finished = True
            finally:
                self.active_tokens -= progress.left
        finally:
            self.counters.in_flight -= 1
            if finished:
                self.counters.completed += 1
            else:
                self.counters.cancelled += 1

    def _get(self, conn: _Connection, path: str) -> None:
        if path in ("/health", "/ready"):
            conn.respond(200, b'{"status":"ok"}')
        elif path == "/v1/models":
            data = [{"id": self.config.model, "object": "model", "created": self.started}]
            conn.respond(200, json.dumps({"object": "list", "data": data}).encode())
        elif path == "/fake/counters":
            conn.respond(200, json.dumps(asdict(self.counters)).encode())
        elif path == "/stats":
            stats = {
                "num_running": self.counters.in_flight,
                "num_waiting": 0,
                "queued_prompt_tokens": 0,
                "active_decode_tokens": self.active_tokens,
                "kv_usage": 0.0,
                "max_num_seqs": 256,
                "max_waiting": 1024,
            }
            conn.respond(200, json.dumps(stats).encode())
        elif path == "/metrics":
            text = (
                f"vllm:num_requests_running {self.counters.in_flight}\n"
                "vllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0.0\n"
            )
            conn.respond(200, text.encode(), "text/plain; version=0.0.4")
        else:
            conn.respond(404, _error("not found", "invalid_request_error"))

    def _usage(self, request: dict[str, Any], fake: dict[str, Any], size: int) -> dict[str, int]:
        wanted = int(fake.get("completion_tokens", self.config.completion_tokens))
        cap = request.get("max_completion_tokens") or request.get("max_tokens")
        completion = min(wanted, int(cap)) if cap else wanted
        prompt = int(fake.get("prompt_tokens", max(1, size // 4)))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _stream(
        self,
        conn: _Connection,
        request: dict[str, Any],
        fake: dict[str, Any],
        usage: dict[str, int],
        chat: bool,
        progress: _Progress,
    ) -> bool:
        ticks = self.decoder.tokens(progress.left) if self.decoder is not None else None
        try:
            return await self._stream_tokens(conn, request, fake, usage, chat, progress, ticks)
        finally:
            if ticks is not None:
                await ticks.aclose()

    async def _stream_tokens(
        self,
        conn: _Connection,
        request: dict[str, Any],
        fake: dict[str, Any],
        usage: dict[str, int],
        chat: bool,
        progress: _Progress,
        ticks: Any,
    ) -> bool:
        conn.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        interval = float(fake.get("chunk_interval_ms", self.config.chunk_interval_ms)) / 1000
        stall_after = fake.get("stall_after_chunks")
        close_after = fake.get("close_after_chunks")
        rid = "cmpl-fake"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        for i in range(usage["completion_tokens"]):
            if ticks is not None:
                await ticks.__anext__()
            progress.left -= 1
            self.active_tokens -= 1
            if conn.closed:
                return False
            if stall_after is not None and i >= int(stall_after):
                await asyncio.sleep(3600)
            if close_after is not None and i >= int(close_after):
                conn.drop()
                return False
            last = i == usage["completion_tokens"] - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                delta = {"content": "tok "}
                choice["delta"] = delta if i else {"role": "assistant", **delta}
                choice["logprobs"] = None
            else:
                choice["text"] = "tok "
                choice["logprobs"] = None
            event = {"id": rid, "object": obj, "created": created, "model": request.get("model")}
            event["choices"] = [choice]
            _chunk(conn, b"data: " + json.dumps(event).encode() + b"\n\n")
            self.counters.completion_tokens += 1
            if interval:
                await asyncio.sleep(interval)
            else:
                await asyncio.sleep(0)
        options = request.get("stream_options") or {}
        if options.get("include_usage"):
            event = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": request.get("model"),
                "choices": [],
                "usage": usage,
            }
            _chunk(conn, b"data: " + json.dumps(event).encode() + b"\n\n")
        _chunk(conn, b"data: [DONE]\n\n")
        conn.write(b"0\r\n\r\n")
        return not conn.closed


def _chunk(conn: _Connection, data: bytes) -> None:
    conn.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def _error(message: str, kind: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}
    ).encode()


def _completion(request: dict[str, Any], usage: dict[str, int], chat: bool) -> dict[str, Any]:
    text = "tok " * usage["completion_tokens"]
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    return {
        "id": "cmpl-fake",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "choices": [choice],
        "usage": usage,
    }


async def serve(host: str, port: int, config: FakeConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    upstream = FakeUpstream(config)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(upstream), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated decode step")
    parser.add_argument("--step-per-seq-ms", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=200, help="status of every completion")
    args = parser.parse_args(argv)
    config = FakeConfig(
        completion_tokens=args.completion_tokens,
        chunk_interval_ms=args.chunk_interval_ms,
        delay_ms=args.delay_ms,
        step_ms=args.step_ms,
        step_per_seq_ms=args.step_per_seq_ms,
        status=args.status,
    )
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port, config))
    except ImportError:
        asyncio.run(serve(args.host, args.port, config))


if __name__ == "__main__":
    main()
