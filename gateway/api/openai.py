"""The OpenAI surface: `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models`.

The gateway validates only what it needs (model, stream flags, the shape of
messages or prompt, output limits) and passes every other field through; the
backend validates the rest and its 4xx errors are relayed as they are.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, get, post
from litestar.response import Stream

from gateway.api.context import CallContext, authorize, read_json_object
from gateway.api.sse import SseFramer, StreamUsage, usage_from
from gateway.errors import BadRequestError, NotFoundError, PermissionDeniedError
from gateway.policy.compiled import ModelRoute
from gateway.routing.picker import round_robin
from gateway.services import Services, services_of
from gateway.upstream.proxy import UpstreamResponse

log = structlog.get_logger("tollgate.request")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("'model' is required and must be a string", param="model")
    return model


def _check_fields(body: dict[str, Any], kind: str) -> bool:
    """Validate what the gateway itself relies on; returns the stream flag."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequestError("'stream_options' must be an object", param="stream_options")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise BadRequestError(f"'{name}' must be a positive integer", param=name)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' must be a non-empty array", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequestError(
                    f"messages[{i}] must be an object with a 'role'", param=f"messages.{i}"
                )
    elif "prompt" not in body:
        raise BadRequestError("'prompt' is required", param="prompt")
    return stream


def _route(ctx: CallContext, name: str) -> ModelRoute:
    route = ctx.policy.models.get(name)
    if route is None:
        raise NotFoundError(f"The model '{name}' does not exist", param="model")
    if not ctx.tenant.may_use(name):
        raise PermissionDeniedError(
            f"tenant '{ctx.tenant.tenant_id}' may not use the model '{name}'",
            code="model_not_allowed",
            param="model",
        )
    return route


def _response_headers(ctx: CallContext, route: ModelRoute, overhead_s: float) -> dict[str, str]:
    return {
        "x-request-id": ctx.request_id,
        "x-tollgate-model": route.name,
        "x-tollgate-route": "explicit",
        "x-tollgate-overhead-ms": f"{overhead_s * 1000:.3f}",
    }


def _log(
    ctx: CallContext,
    route: ModelRoute,
    upstream: UpstreamResponse,
    *,
    status: int,
    usage: StreamUsage,
    stream: bool,
    outcome: str,
    ttfb_s: float,
) -> None:
    log.info(
        "request",
        request_id=ctx.request_id,
        tenant=ctx.tenant.tenant_id,
        app=ctx.principal.app_id,
        model=route.name,
        replica=upstream.replica.url,
        status=status,
        outcome=outcome,
        stream=stream,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        ttfb_ms=round(ttfb_s * 1000, 3),
        total_ms=round((time.perf_counter() - ctx.started) * 1000, 3),
    )


async def _forward(
    request: Request[Any, Any, Any], services: Services, path: str, kind: str
) -> Response[bytes] | Stream:
    ctx = await authorize(request, services)
    body = await read_json_object(request, services.settings.max_body_bytes)
    route = _route(ctx, _require_model(body))
    stream = _check_fields(body, kind)
    client_wants_usage = False
    body["model"] = route.upstream_model
    if stream:
        # Always ask the backend for usage so a streamed request is never
        # unaccounted; the usage event reaches the client only if it asked.
        options = dict(body.get("stream_options") or {})
        client_wants_usage = bool(options.get("include_usage"))
        options["include_usage"] = True
        body["stream_options"] = options
    payload = _encode(body)
    headers = {"content-type": "application/json", "x-request-id": ctx.request_id}
    pool = route.pool
    replicas = round_robin(pool.replicas, services.turns.next(pool.name))
    sent_at = time.perf_counter()
    overhead = sent_at - ctx.started
    upstream = await services.upstream.open(replicas, path, payload, headers, pool.timeouts)
    ttfb = time.perf_counter() - sent_at
    response_headers = _response_headers(ctx, route, overhead)

    if not stream:
        raw = await upstream.read()
        try:
            parsed = _decode(raw)
            usage = usage_from(parsed.get("usage") or {})
        except (msgspec.DecodeError, AttributeError):
            usage = StreamUsage()
        _log(ctx, route, upstream, status=200, usage=usage, stream=False, outcome="ok", ttfb_s=ttfb)
        return Response(raw, media_type="application/json", headers=response_headers)

    async def events() -> AsyncIterator[bytes]:
        framer = SseFramer()
        outcome = "cancelled"
        try:
            async for chunk in upstream.chunks():
                # is_usage_only runs on every event so usage is always read;
                # the usage event is forwarded only when the client asked.
                kept = [
                    e
                    for e in framer.feed(chunk)
                    if not framer.is_usage_only(e) or client_wants_usage
                ]
                if kept:
                    yield b"".join(kept)
            rest = framer.rest()
            if rest:
                yield rest
            outcome = "ok"
        except TimeoutError:
            outcome = "upstream_timeout"
            yield _sse_error("the backend stopped sending", "upstream_timeout")
        except Exception:
            outcome = "upstream_error"
            yield _sse_error("the backend connection failed mid-stream", "upstream_error")
        finally:
            await upstream.close()
            _log(
                ctx,
                route,
                upstream,
                status=200,
                usage=framer.usage,
                stream=True,
                outcome=outcome,
                ttfb_s=ttfb,
            )

    return Stream(
        events(),
        media_type="text/event-stream",
        headers={**response_headers, "cache-control": "no-cache"},
    )


def _sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + _encode(body) + b"\n\n"


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """Chat completions, streamed or not."""
    return await _forward(request, services_of(request), "/v1/chat/completions", "chat")


@post("/v1/completions", status_code=200)
async def completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """Text completions, streamed or not."""
    return await _forward(request, services_of(request), "/v1/completions", "text")


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The models this tenant may use."""
    ctx = await authorize(request, services_of(request))
    created = int(ctx.policy.loaded_at.timestamp())
    data = [
        {"id": route.name, "object": "model", "created": created, "owned_by": "tollgate"}
        for route in ctx.policy.models_for(ctx.tenant)
    ]
    return Response(
        _encode({"object": "list", "data": data}),
        media_type="application/json",
        headers={"x-request-id": ctx.request_id},
    )
