"""Forwarding to backends over one pooled httpx client.

The proxy awaits the backend's status and headers before the gateway commits
its own response, so a backend that refuses the connection is retried on
another replica before any byte reaches the client, and backend errors become
OpenAI-format gateway errors. Retries happen only before the request reached a
backend: a request a backend may have started is never sent twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
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

_decode = msgspec.json.Decoder().decode


@dataclass
class UpstreamResponse:
    """An open backend response whose status and headers have arrived."""

    replica: Replica
    response: httpx.Response
    timeouts: UpstreamTimeouts
    deadline: float
    """time.monotonic() after which the whole exchange is abandoned."""

    async def read(self) -> bytes:
        """The whole body, within the total deadline."""
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                return await self.response.aread()
        except TimeoutError as exc:
            raise UpstreamTimeoutError("the backend did not finish in time") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("the backend connection failed mid-response") from exc
        finally:
            await self.response.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive, each within the between-chunks timeout."""
        iterator = self.response.aiter_raw()
        try:
            while True:
                budget = min(self.timeouts.between_chunks_s, self.deadline - time.monotonic())
                try:
                    async with asyncio.timeout(max(0.0, budget)):
                        chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await self.response.aclose()

    async def close(self) -> None:
        """Drop the connection (cancels the request on the backend)."""
        await self.response.aclose()


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


class UpstreamClient:
    """Sends requests to backends; owns nothing but the shared httpx client."""

    def __init__(self, client: httpx.AsyncClient):
        self._client = client

    async def open(
        self,
        replicas: Sequence[Replica],
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: UpstreamTimeouts,
    ) -> UpstreamResponse:
        """POST `body` to the first replica that accepts the connection and
        return once its status and headers arrived; errors are raised as
        gateway errors."""
        if not replicas:
            raise ServiceUnavailableError("no backend replica is configured for this model")
        deadline = time.monotonic() + timeouts.total_s
        timeout = httpx.Timeout(
            connect=timeouts.connect_s,
            read=timeouts.first_byte_s,
            write=timeouts.connect_s,
            pool=timeouts.connect_s,
        )
        last_error: Exception | None = None
        for replica in replicas:
            request = self._client.build_request(
                "POST",
                replica.url.rstrip("/") + path,
                content=body,
                headers=headers,
                timeout=timeout,
            )
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last_error = exc
                continue  # nothing reached this replica: safe to try the next
            except httpx.TimeoutException as exc:
                raise UpstreamTimeoutError("the backend did not answer in time") from exc
            except httpx.HTTPError as exc:
                raise UpstreamError("the backend connection failed") from exc
            if response.status_code >= 400:
                try:
                    raw = await response.aread()
                except httpx.HTTPError:
                    raw = b""
                finally:
                    await response.aclose()
                raise _error_from_backend(response.status_code, raw, response.headers)
            return UpstreamResponse(replica, response, timeouts, deadline)
        raise ServiceUnavailableError(
            "no backend replica is reachable for this model", retry_after_s=1.0
        ) from last_error
