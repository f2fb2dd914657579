"""Forwarding to backends over the process's pool of keep-alive connections.

The proxy awaits the backend's status and headers before the gateway commits
its own response, so a replica that refuses the connection, drops it before
answering, or answers 5xx is retried on the next replica before any byte
reaches the client (a non-streamed body is read whole first, so a replica
that dies mid-response is retried too); after bytes reached the client
nothing is retried. Backend errors become OpenAI-format gateway errors.

Every attempt is booked on its replica (``gateway.upstream.health``): its
tokens count as in flight there until the response ends, and its outcome
feeds passive health (connect errors, disconnects, 5xx, timeouts and broken
streams are failures; any other answer a success). Each failed attempt is
also reported to the client's ``on_error`` hook (metrics) with its pool and
one of ``ERROR_KINDS``.

This is the one hot path that does not use httpx: its requests go over
`gateway.upstream.http1`, which spends a fraction of a general-purpose
client's CPU per request (docs/decisions.md). Control-plane calls (JWKS,
load and health probes) keep httpx.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from gateway.errors import (
    BadRequestError,
    GatewayError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.policy.compiled import Replica, UpstreamTimeouts
from gateway.upstream.health import ReplicaBook, Ticket, report_failure, report_success
from gateway.upstream.http1 import (
    ConnectFailed,
    ConnectionClosed,
    Http1Pool,
    HttpClientError,
    Response,
)

_decode = msgspec.json.Decoder().decode

ErrorKind = Literal["connect", "timeout", "status", "stream"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("connect", "timeout", "status", "stream")
"""How an attempt failed: no usable connection before the response
(``connect``), no answer or no end within the deadlines (``timeout``), a 5xx
answer (``status``), the connection broke after the status line (``stream``)."""

ErrorHook = Callable[[str, ErrorKind], None]
"""Called with (pool, kind) for every failed attempt."""


def new_connections() -> Http1Pool:
    """The process's upstream connections: unlimited in number (the priority
    queues bound concurrency), kept alive between requests."""
    return Http1Pool()


@dataclass
class UpstreamResponse:
    """An open backend response whose status and headers have arrived."""

    replica: Replica
    response: Response
    timeouts: UpstreamTimeouts
    deadline: float
    """time.monotonic() after which the whole exchange is abandoned."""
    ticket: Ticket | None = None
    """The request's booking on its replica (None without a ReplicaBook)."""
    num_attempts: int = 1
    """Replicas tried for this request, this one included."""
    pool: str = ""
    on_error: ErrorHook | None = None

    def __del__(self) -> None:
        # Safety net, as for queue slots: a stream whose generator never ran
        # (the client left before the first byte) never reaches chunks()'s
        # `finally`, and a booking left open would count as load forever.
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            ticket.end()

    def _finish(self, failure: str | None, kind: ErrorKind = "stream") -> None:
        """End the booking once; ``failure`` counts against the replica's health."""
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            if failure is not None:
                report_failure(ticket.state, failure)
            ticket.end()
        if failure is not None and self.on_error is not None:
            self.on_error(self.pool, kind)

    async def read(self) -> bytes:
        """The whole body, within the total deadline."""
        try:
            body = await self.response.read(max(0.0, self.deadline - time.monotonic()))
        except TimeoutError as exc:
            self._finish("the response did not finish in time", "timeout")
            raise UpstreamTimeoutError("the backend did not finish in time") from exc
        except HttpClientError as exc:
            self._finish(f"connection broke mid-response: {type(exc).__name__}")
            raise UpstreamError("the backend connection failed mid-response") from exc
        self._finish(None)
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive, each within the between-chunks timeout;
        a broken connection raises ``HttpClientError``."""
        response = self.response
        try:
            while True:
                budget = min(self.timeouts.between_chunks_s, self.deadline - time.monotonic())
                chunk = await response.chunk(max(0.0, budget))
                if not chunk:
                    return
                yield chunk
        except (TimeoutError, HttpClientError) as exc:
            kind: ErrorKind = "timeout" if isinstance(exc, TimeoutError) else "stream"
            self._finish(f"stream broke: {type(exc).__name__}", kind)
            raise
        finally:
            self.close_now()

    def close_now(self) -> None:
        """Drop the connection unless the body was read to its end; dropping
        it is what cancels the request on the backend."""
        self._finish(None)
        if self.response.ended:
            self.response.release()
        else:
            self.response.close()

    async def close(self) -> None:
        """Drop the connection (cancels the request on the backend)."""
        self.close_now()


def _error_from_backend(status: int, body: bytes, headers: Mapping[str, str]) -> GatewayError:
    """Map a backend's 4xx/5xx onto the gateway's error of the same meaning."""
    message = "the backend returned an error"
    param = None
    code = None
    try:
        payload: Any = _decode(body)
        err = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param = err.get("param")
            code = err.get("code")
    except (msgspec.DecodeError, AttributeError):
        pass
    if status == 404:
        return NotFoundError(message, code=code, param=param)
    if status == 429:
        retry = headers.get("retry-after", "1")
        return RateLimitError(
            message,
            retry_after_s=float(retry) if retry.isdigit() else 1.0,
            code=code or "backend_overloaded",
        )
    if 400 <= status < 500:
        return BadRequestError(message, code=code, param=param)
    if status == 503:
        return ServiceUnavailableError("the backend is not ready")
    return UpstreamError(f"the backend failed with status {status}")


class _TryNext(Exception):
    """This replica failed before answering: try the next one, or raise ``error``."""

    def __init__(self, error: GatewayError, *, answered: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.answered = answered
        """Whether the replica answered (a 5xx) rather than failing to connect."""


# Failures before any response byte that leave the request safe to send
# elsewhere: nothing reached the client yet.
_RETRYABLE = (ConnectFailed, ConnectionClosed)


class UpstreamClient:
    """Sends requests to backends over the shared connection pool."""

    def __init__(
        self,
        connections: Http1Pool,
        book: ReplicaBook | None = None,
        *,
        on_error: ErrorHook | None = None,
    ):
        self._connections = connections
        self._book = book
        self._on_error = on_error

    async def open(
        self,
        replicas: Sequence[Replica],
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: UpstreamTimeouts,
        *,
        cost: int = 0,
        deadline: float | None = None,
        pool: str = "",
        on_sent: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """POST `body` to `replicas` in order until one answers below 500 and
        return once its status and headers arrived; errors are raised as
        gateway errors. `cost` (prompt + max_tokens) is booked as in flight
        on the replica until the response ends; `pool` names the replicas'
        pool to the error hook; `on_sent` runs each time the request went out
        (see `Http1Pool.request`)."""
        if not replicas:
            raise ServiceUnavailableError("no backend replica is configured for this model")
        if deadline is None:
            deadline = time.monotonic() + timeouts.total_s
        last: GatewayError | None = None
        last_answered = False
        for attempt, replica in enumerate(replicas, 1):
            try:
                upstream = await self._attempt(
                    replica, path, body, headers, timeouts, deadline, cost, pool, on_sent
                )
            except _TryNext as retry:
                # A backend's own error says more than a refused connection.
                if last is None or retry.answered or not last_answered:
                    last, last_answered = retry.error, retry.answered
                continue
            upstream.num_attempts = attempt
            return upstream
        assert last is not None
        raise last

    async def complete(
        self,
        replicas: Sequence[Replica],
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: UpstreamTimeouts,
        *,
        cost: int = 0,
        pool: str = "",
        on_sent: Callable[[], None] | None = None,
    ) -> tuple[UpstreamResponse, bytes]:
        """`open`, then read the whole body; a replica whose connection breaks
        mid-response is retried on the next one (nothing reached the client)."""
        deadline = time.monotonic() + timeouts.total_s
        remaining = list(replicas)
        tried = 0
        while True:
            upstream = await self.open(
                remaining,
                path,
                body,
                headers,
                timeouts,
                cost=cost,
                deadline=deadline,
                pool=pool,
                on_sent=on_sent,
            )
            used = upstream.num_attempts
            tried += used
            upstream.num_attempts = tried
            try:
                return upstream, await upstream.read()
            except UpstreamTimeoutError:
                raise
            except UpstreamError:
                remaining = remaining[used:]
                if not remaining:
                    raise

    async def _attempt(
        self,
        replica: Replica,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: UpstreamTimeouts,
        deadline: float,
        cost: int,
        pool: str,
        on_sent: Callable[[], None] | None,
    ) -> UpstreamResponse:
        state = self._book.get(replica.url) if self._book is not None else None
        ticket = state.begin(cost) if state is not None else None
        upstream: UpstreamResponse | None = None
        try:
            try:
                # The first-byte timeout bounds the wait for the status line
                # and headers; chunks() then applies the between-chunks budget.
                response = await self._connections.request(
                    "POST",
                    replica.url,
                    path,
                    body,
                    headers,
                    connect_timeout_s=timeouts.connect_s,
                    first_byte_timeout_s=timeouts.first_byte_s,
                    on_sent=on_sent,
                )
            except _RETRYABLE as exc:
                failure = ServiceUnavailableError(
                    "no backend replica is reachable for this model", retry_after_s=1.0
                )
                failure.__cause__ = exc
                self._failed(ticket, pool, "connect", f"{type(exc).__name__} before the response")
                raise _TryNext(failure, answered=False) from exc
            except TimeoutError as exc:
                self._failed(ticket, pool, "timeout", "no response within first_byte_s")
                raise UpstreamTimeoutError("the backend did not answer in time") from exc
            except HttpClientError as exc:
                self._failed(ticket, pool, "connect", f"{type(exc).__name__} before the response")
                raise UpstreamError("the backend connection failed") from exc
            if response.status >= 400:
                try:
                    raw = await response.read(timeouts.first_byte_s)
                except (HttpClientError, TimeoutError):
                    raw = b""  # the status alone says enough
                error = _error_from_backend(response.status, raw, response.headers)
                if response.status >= 500:
                    self._failed(ticket, pool, "status", f"status {response.status}")
                    raise _TryNext(error, answered=True)
                _succeeded(ticket)  # the replica works; the request was refused
                raise error
            _succeeded(ticket, keep=True)
            upstream = UpstreamResponse(
                replica, response, timeouts, deadline, ticket, pool=pool, on_error=self._on_error
            )
            return upstream
        finally:
            if upstream is None and ticket is not None:
                ticket.end()

    def _failed(self, ticket: Ticket | None, pool: str, kind: ErrorKind, reason: str) -> None:
        if ticket is not None:
            report_failure(ticket.state, reason)
            ticket.end()
        if self._on_error is not None:
            self._on_error(pool, kind)


def _succeeded(ticket: Ticket | None, *, keep: bool = False) -> None:
    if ticket is not None:
        report_success(ticket.state)
        if not keep:
            ticket.end()
