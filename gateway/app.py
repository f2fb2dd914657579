"""`create_app(settings)`: the gateway's Litestar app.

Nothing is built at import. The lifespan owns the long-lived parts (the
pooled upstream session, the control-plane httpx client, the policy watcher,
the authenticator, the metrics registry, the tracer) and one exception
handler turns every domain error into OpenAI's error format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import structlog
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.types import Receive, Scope, Send

from gateway.api.admin import admin_backends, admin_policies, healthz, readyz
from gateway.api.metrics import metrics
from gateway.api.openai import INFERENCE_ROUTES, chat_completions, completions, forward, list_models
from gateway.api.usage import usage_export
from gateway.auth.keys import KeyResolver
from gateway.auth.verifier import Authenticator
from gateway.errors import GatewayError
from gateway.observe.metrics import GatewayMetrics
from gateway.observe.request_log import RequestLog
from gateway.observe.tracing import Tracing, build_tracing
from gateway.policy.watcher import PolicyWatcher
from gateway.queueing.registry import PoolQueues
from gateway.quota.admission import build_quota
from gateway.routing.picker import TurnCounter
from gateway.routing.router import Router
from gateway.services import Services, services_of
from gateway.settings import GatewaySettings
from gateway.upstream.health import ReplicaBook
from gateway.upstream.monitor import ReplicaMonitor
from gateway.upstream.proxy import UpstreamClient, new_connections
from gateway.usage.drainer import build_drainer

log = structlog.get_logger("tollgate.gateway")
_encode = msgspec.json.Encoder().encode


def _error_response(
    request: Request[Any, Any, Any], status: int, body: dict[str, Any], headers: dict[str, str]
) -> Response[bytes]:
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        headers = {**headers, "x-request-id": request_id}
    return Response(
        _encode(body), status_code=status, media_type="application/json", headers=headers
    )


def _handle_gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return _error_response(request, exc.status_code, exc.body(), exc.headers)


def _handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    # Framework-level errors (unknown path, wrong method) in the same format.
    status = exc.status_code
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": exc.detail, "type": kind, "param": None, "code": None}}
    return _error_response(request, status, body, dict(exc.headers or {}))


def _handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled_error", path=request.url.path)
    body = {
        "error": {
            "message": "internal error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    return _error_response(request, 500, body, {})


def _response_for_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """What the app's exception handlers answer for ``exc`` (the fast path's errors)."""
    if isinstance(exc, GatewayError):
        return _handle_gateway_error(request, exc)
    if isinstance(exc, HTTPException):
        return _handle_http_exception(request, exc)
    return _handle_unexpected(request, exc)


class GatewayApp(Litestar):
    """The Litestar app, with a fast path for the inference endpoints.

    ``POST /v1/chat/completions`` and ``POST /v1/completions`` (exact paths)
    go straight to their handler, which returns an ``Answer`` sent over ASGI
    (``gateway.api.asgi``): no router, no handler signature, no response
    classes, about a fifth of the gateway's CPU per request. Their errors
    go through the same exception handlers as every other path's; anything
    else (other methods or paths, a trailing slash, lifespan) is Litestar's.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve the inference paths directly, pass everything else to Litestar."""
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = INFERENCE_ROUTES.get(scope["path"])
            if kind is not None:
                # What Litestar.__call__ sets up for a request.
                scope["app"] = scope["litestar_app"] = self
                scope.setdefault("state", {})
                await self._serve_inference(scope, receive, send, kind)
                return
        await super().__call__(scope, receive, send)

    async def _serve_inference(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        try:
            answer = await forward(request, services_of(request), scope["path"], kind)
        except Exception as exc:
            response = _response_for_error(request, exc)
            await response.to_asgi_response(app=None, request=request)(scope, receive, send)
            return
        await answer.send(receive, send)


def create_app(settings: GatewaySettings, *, tracing: Tracing | None = None) -> Litestar:
    """Build the gateway app; its parts start in the lifespan. ``tracing``
    replaces the one ``settings.otel_endpoint`` configures (tests)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
        metrics = GatewayMetrics()
        tracer = tracing if tracing is not None else build_tracing(settings.otel_endpoint)
        async with (
            httpx.AsyncClient(limits=limits, http2=False) as http,
            new_connections() as upstream_connections,
        ):
            watcher = PolicyWatcher(
                settings.tenants_dir, settings.policies_dir, poll_interval_s=settings.policy_poll_s
            )
            await watcher.start()
            quota = build_quota(settings)
            quota.on_denial.append(metrics.quota_denied)
            quota.start()
            # Usage ledger: the drainer moves records from the quota
            # store into Parquet; with the memory store it must run here.
            drainer = None
            if settings.ledger_drainer or settings.store == "memory":
                drainer = build_drainer(settings, quota)
                drainer.start()
            try:
                authenticator = Authenticator(settings.auth, KeyResolver(settings.auth, http))
                # Reloads reconfigure the same queues: waiting requests keep their place.
                queues = PoolQueues(watcher.current)
                watcher.on_change.append(queues.configure)
                # Replica health and load: probed and polled in the background,
                # reconfigured on reload (known replicas keep their state).
                replicas = ReplicaBook(watcher.current)
                monitor = ReplicaMonitor(replicas, http)
                watcher.on_change.append(monitor.configure)
                turns = TurnCounter()
                request_log = RequestLog()
                app.state.services = Services(
                    settings=settings,
                    http=http,
                    authenticator=authenticator,
                    policies=watcher,
                    upstream=UpstreamClient(
                        upstream_connections, replicas, on_error=metrics.upstream_error
                    ),
                    turns=turns,
                    queues=queues,
                    quota=quota,
                    replicas=replicas,
                    router=Router(replicas, queues, turns),
                    metrics=metrics,
                    tracing=tracer,
                    request_log=request_log,
                )
                monitor.start()
                log.info("gateway_ready", policy_version=watcher.current.version)
                try:
                    yield
                finally:
                    request_log.flush()
                    await monitor.stop()
            finally:
                await quota.stop()
                if drainer is not None:
                    await drainer.stop()  # after the last settlements: flushes them
                await watcher.stop()
                # Flushes the spans still batched (blocking: off the loop).
                await asyncio.to_thread(tracer.shutdown)

    return GatewayApp(
        route_handlers=[
            chat_completions,
            completions,
            list_models,
            admin_policies,
            admin_backends,
            metrics,
            healthz,
            readyz,
            usage_export,
        ],
        exception_handlers={
            GatewayError: _handle_gateway_error,
            HTTPException: _handle_http_exception,
            Exception: _handle_unexpected,
        },
        lifespan=[lifespan],
        openapi_config=None,
        request_max_body_size=settings.max_body_bytes,
        debug=False,
    )


def create_app_from_env() -> Litestar:
    """The app with settings from `TOLLGATE_*` variables: the factory each
    worker process calls under `tollgate gateway --workers N`."""
    from gateway.logging import configure_logging

    settings = GatewaySettings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)
