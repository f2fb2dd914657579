"""The OpenAI surface: `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /v1/models`.

The gateway validates only what it needs (model, stream flags, the shape of
messages or prompt, output limits) and passes every other field through; the
backend validates the rest and its 4xx errors are relayed as they are.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Stream

from gateway.api.asgi import Answer, ResponseHead
from gateway.api.context import CallContext, authorize, read_json_object, request_id_for
from gateway.api.sse import SseFramer, StreamUsage, usage_from
from gateway.api.usage import draft_for
from gateway.errors import BadRequestError
from gateway.observe.labels import status_of
from gateway.observe.request import RequestObserver
from gateway.observe.request_log import RequestLog
from gateway.policy.compiled import ModelRoute, PriorityClass
from gateway.queueing.classes import PRIORITY_HEADER, resolve_priority
from gateway.queueing.pool import Slot
from gateway.quota.admission import Grant
from gateway.routing.affinity import SESSION_HEADER, session_id_of
from gateway.routing.resolve import RouteDecision, virtual_models_for
from gateway.services import Services, services_of
from gateway.upstream.proxy import UpstreamResponse

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


# --- routing: model resolution headers -------------------------------
def _answer_head(
    ctx: CallContext,
    decision: RouteDecision,
    overhead_s: float,
    grant: Grant,
    slot: Slot,
    stream: bool,
) -> ResponseHead:
    """The headers of a successful answer: which model served and why, the
    gateway's overhead, the rate limits, the queue."""
    headers = {
        "x-request-id": ctx.request_id,
        "x-tollgate-model": decision.route.name,
        "x-tollgate-model-version": decision.version.name,
        "x-tollgate-route": decision.header(),
        "x-tollgate-overhead-ms": f"{overhead_s * 1000:.3f}",
    }
    headers.update(grant.headers)
    headers["x-tollgate-priority"] = slot.priority
    headers["x-tollgate-queue-ms"] = f"{slot.wait_s * 1000:.3f}"
    if stream:
        headers["cache-control"] = "no-cache"
    return ResponseHead(headers)


# --- end routing ---------------------------------------------------------------


def _log(
    request_log: RequestLog,
    ctx: CallContext,
    route: ModelRoute,
    upstream: UpstreamResponse,
    *,
    status: int,
    usage: StreamUsage,
    stream: bool,
    outcome: str,
    ttfb_s: float,
    slot: Slot,
) -> None:
    """Hand the request's log line to `request_log` (written off the request's path)."""
    fields = {
        "request_id": ctx.request_id,
        "tenant": ctx.tenant.tenant_id,
        "app": ctx.principal.app_id,
        "model": route.name,
        "replica": upstream.replica.url,
        "attempts": upstream.num_attempts,
        **(ctx.route.log_fields() if ctx.route is not None else {}),
        "status": status,
        "outcome": outcome,
        "stream": stream,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "priority": slot.priority,
        "queue_ms": round(slot.wait_s * 1000, 3),
        "ttfb_ms": round(ttfb_s * 1000, 3),
        "total_ms": round((time.perf_counter() - ctx.started) * 1000, 3),
    }
    request_log.add(fields)


INFERENCE_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
"""The inference paths and their kinds: what `gateway.app.GatewayApp` serves
without Litestar's router (``forward``)."""


async def forward(
    request: Request[Any, Any, Any], services: Services, path: str, kind: str
) -> Answer:
    """Serve one inference request; whichever way it ends, its metrics and
    trace record the outcome once (an answer's in its ``after`` hook, once it
    was sent or its stream ended)."""
    started = time.perf_counter()
    request_id = request_id_for(request)
    trace = services.tracing.request(request_id, "POST", path, request.headers)
    observer = RequestObserver(services.metrics, trace, started)
    try:
        response = await _serve(request, services, path, kind, request_id, observer)
    except BaseException as exc:
        observer.finish(status_of(exc))
        raise
    return response


async def _serve(
    request: Request[Any, Any, Any],
    services: Services,
    path: str,
    kind: str,
    request_id: str,
    observer: RequestObserver,
) -> Answer:
    """Authenticate, validate, route and admit the request, then `_proxy` it;
    each step is a span of the request's trace."""
    trace = observer.trace
    span = trace.child("auth")
    ctx = await authorize(request, services, request_id)
    observer.identify(ctx.tenant.tenant_id)
    span.end()
    body = await read_json_object(request, services.settings.max_body_bytes)
    requested = _require_model(body)
    observer.model(ctx.policy, requested)
    stream = _check_fields(body, kind)
    priority = resolve_priority(ctx.policy, ctx.tenant, request.headers.get(PRIORITY_HEADER))
    # --- routing: explicit, small/large or auto; tenant tiers; fallback;
    # canary version. Kept on the context for the log line (and the usage record).
    span = trace.child("route")
    session_id = session_id_of(request.headers.get(SESSION_HEADER))
    decision = services.router.decide(
        ctx.policy,
        ctx.tenant,
        requested,
        body,
        kind,
        priority,
        session_id=session_id,
        request_id=ctx.request_id,
    )
    ctx = ctx.routed(decision)
    route = decision.route
    span.end()
    trace.set("tollgate.model", route.name)
    # --- end routing
    # Quota: reserve prompt + max_tokens (may set max_tokens in the body).
    # From here every exit settles or releases the grant, exactly once.
    span = trace.child("quota")
    grant = await services.quota.admit(
        ctx.policy,
        ctx.tenant,
        ctx.principal.app_id,
        route,
        body,
        kind,
        record=draft_for(ctx, priority, stream),
    )
    span.end()
    try:
        return await _proxy(
            services,
            request,
            ctx,
            route,
            body,
            stream,
            priority,
            grant,
            path,
            kind,
            session_id,
            observer,
        )
    except BaseException as exc:
        grant.finish_after_error(exc)
        raise


async def _proxy(
    services: Services,
    request: Request[Any, Any, Any],
    ctx: CallContext,
    route: ModelRoute,
    body: dict[str, Any],
    stream: bool,
    priority: PriorityClass,
    grant: Grant,
    path: str,
    kind: str,
    session_id: str | None,
    observer: RequestObserver,
) -> Answer:
    """Queue, forward and relay an admitted request; settles `grant` when the
    response is complete (errors are finished by the caller)."""
    assert ctx.route is not None
    decision = ctx.route
    trace = observer.trace
    client_wants_usage = False
    body["model"] = decision.version.upstream_model
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
    raw = b""
    # Queueing: a slot of the pool, held from here until the response ends
    # (released below, after the body is read or in the stream's `finally`);
    # the queue orders by the tokens the quota reserved (prompt + max_tokens).
    queue = services.queues.for_pool(pool)
    cost = grant.reserved_tokens
    span = trace.child("queue")
    async with queue.admit(priority, ctx.tenant.tenant_id, cost, request.receive) as slot:
        span.end()
        observer.queued(pool.name, slot.priority, slot.wait_s)
        upstream_span = trace.child("upstream", client=True)
        trace.inject(headers, upstream_span)
        # --- routing: replicas in the order to try them, from the
        # load and health as they are when the slot is granted; the upstream
        # client retries the next one before any byte reached the client.
        replicas = services.router.replicas_for(decision, body, kind, session_id)
        # --- end routing
        sent_at = time.perf_counter()
        overhead = sent_at - ctx.started - slot.wait_s
        observer.sent(overhead)
        grant.sent = True
        head: list[ResponseHead] = []

        def prepare_head() -> None:
            # Runs once the request is on its way (again on a retry: once is
            # enough): the answer's headers, made while the backend works.
            if not head:
                head.append(_answer_head(ctx, decision, overhead, grant, slot, stream))

        request_args = (replicas, path, payload, headers, pool.timeouts)
        if stream:
            upstream = await services.upstream.open(
                *request_args, cost=cost, pool=pool.name, on_sent=prepare_head
            )
            slot.keep()
        else:
            # Read whole while holding the slot, so that a replica dying
            # mid-response is retried on the next one.
            upstream, raw = await services.upstream.complete(
                *request_args, cost=cost, pool=pool.name, on_sent=prepare_head
            )
    ttfb = time.perf_counter() - sent_at
    grant.record.replica = upstream.replica.url
    upstream_span.set("tollgate.replica", upstream.replica.url)
    prepare_head()
    response_head = head[0]

    def ended(usage: StreamUsage, outcome: str) -> None:
        # The request's end, either way it went: its usage record, settling,
        # metrics and log line. Never awaits: a stream's end may run under
        # cancellation.
        grant.record.observe(usage)
        grant.settle_soon(_used_tokens(usage))
        observer.usage(usage)
        upstream_span.end()
        observer.finish(200)
        _log(
            services.request_log,
            ctx,
            route,
            upstream,
            status=200,
            usage=usage,
            stream=stream,
            outcome=outcome,
            ttfb_s=ttfb,
            slot=slot,
        )

    if not stream:

        async def finish() -> None:
            # After the body went to the server: the client does not wait
            # for any of this. Settling runs in the background too, without
            # waiting for the store's round trip.
            try:
                reported = _decode(raw).get("usage")
                # No usage object: unknown (the reservation is charged), not zero.
                usage = usage_from(reported) if isinstance(reported, dict) else StreamUsage()
            except (msgspec.DecodeError, AttributeError):
                usage = StreamUsage()
            observer.first_byte()
            ended(usage, "ok")

        return Answer(response_head.headers, raw, after=finish, encoded=response_head.encoded)

    async def events() -> AsyncGenerator[bytes, None]:
        framer = SseFramer()
        outcome = "cancelled"
        try:
            async for chunk in upstream.chunks():
                grant.record.first_token()  # usage ledger: time to first token
                # is_usage_only runs on every event so usage is always read;
                # the usage event is forwarded only when the client asked.
                kept = [
                    e
                    for e in framer.feed(chunk)
                    if not framer.is_usage_only(e) or client_wants_usage
                ]
                if kept:
                    observer.first_byte()
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
            # First, and without awaiting: this may run under cancellation.
            grant.record.stream_ended(outcome)
            slot.release()
            ended(framer.usage, outcome)
            await upstream.close()

    # `after` runs after the response even when the stream never started
    # (the client left first), so the request is still finished once.
    return Answer(
        response_head.headers,
        chunks=events(),
        after=observer.after_stream,
        encoded=response_head.encoded,
    )


def _used_tokens(usage: StreamUsage) -> int | None:
    """Tokens the backend reported, or None when it reported none."""
    return usage.prompt_tokens + usage.completion_tokens if usage.seen else None


def _sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + _encode(body) + b"\n\n"


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """Chat completions, streamed or not (``GatewayApp`` serves the exact path
    itself; Litestar routes the rest, e.g. a trailing slash, here)."""
    answer = await forward(request, services_of(request), "/v1/chat/completions", "chat")
    return answer.to_response()


@post("/v1/completions", status_code=200)
async def completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """Text completions, streamed or not (see ``chat_completions``)."""
    answer = await forward(request, services_of(request), "/v1/completions", "text")
    return answer.to_response()


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The models this tenant may use."""
    ctx = await authorize(request, services_of(request))
    created = int(ctx.policy.loaded_at.timestamp())
    names = [route.name for route in ctx.policy.models_for(ctx.tenant)]
    names += virtual_models_for(ctx.policy, ctx.tenant)  # small, large, auto
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "tollgate"}
        for name in names
    ]
    return Response(
        _encode({"object": "list", "data": data}),
        media_type="application/json",
        headers={"x-request-id": ctx.request_id},
    )
