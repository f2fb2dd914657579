"""The backend's HTTP surface: OpenAI endpoints plus what a router needs.

`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /health` (liveness), `GET /ready` (model loaded and warmed),
`GET /metrics` (Prometheus) and `GET /stats` (JSON load for balancers).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import asdict
from typing import Any, TypeVar

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream
from pydantic import BaseModel, ValidationError

from backend.api.errors import ApiError, InvalidRequest, ModelNotFound, NotReady
from backend.api.protocol import ChatCompletionRequest, CompletionRequest
from backend.serving.generation import GenerationService, GenerationState

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_REQUEST_ID_HEADER = "x-request-id"
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class BackendState:
    """What the handlers need; filled in once the model is loaded."""

    def __init__(self, served_names: tuple[str, ...]):
        self.served_names = served_names
        self.service: GenerationService | None = None
        self.ready = False
        self.started = int(time.time())

    def require(self) -> GenerationService:
        """The generation service, or 503 while the model loads."""
        if self.service is None or not self.ready:
            raise NotReady("the model is still loading")
        return self.service


def _error_response(exc: ApiError) -> Response[bytes]:
    return Response(
        _encode(exc.body()),
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers,
    )


def _handle_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
    return _error_response(exc)


def _handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    status = getattr(exc, "status_code", 500)
    if isinstance(status, int) and 400 <= status < 500:
        # Framework-level client errors (unknown route, wrong method).
        err = ApiError(str(getattr(exc, "detail", exc)))
        err.error_type = "invalid_request_error"  # type: ignore[misc]
        return Response(_encode(err.body()), status_code=status, media_type="application/json")
    log.exception("unhandled_error", path=request.url.path)
    err = ApiError("internal error")
    return Response(_encode(err.body()), status_code=500, media_type="application/json")


async def _parse(request: Request[Any, Any, Any], model: type[M]) -> M:
    raw = await request.body()
    try:
        data = _decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {where}", param=where
            ) from exc
        raise InvalidRequest(f"{where}: {first['msg']}", param=where or None) from exc


def _request_id(request: Request[Any, Any, Any], prefix: str) -> str:
    given = request.headers.get(_REQUEST_ID_HEADER)
    suffix = given if given and len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
    return f"{prefix}-{suffix}"


async def _unless_disconnected(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client hangs up first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            raise asyncio.CancelledError("client disconnected")
        return task.result()
    finally:
        watcher.cancel()


def _usage(state: GenerationState) -> dict[str, Any]:
    return {
        "prompt_tokens": state.prompt_tokens,
        "completion_tokens": state.completion_tokens,
        "total_tokens": state.prompt_tokens + state.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": state.cached_tokens},
    }


def create_app(state: BackendState) -> Litestar:
    """Build the backend's Litestar app around a (possibly still loading) state."""

    def check_model(name: str) -> str:
        if name not in state.served_names:
            raise ModelNotFound(f"The model '{name}' does not exist on this backend", param="model")
        return name

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
        body = await _parse(request, ChatCompletionRequest)
        model = check_model(body.model)
        service = state.require()
        messages = [
            {"role": m.role if m.role != "developer" else "system", "content": m.text()}
            for m in body.messages
        ]
        prompt_ids = service.tokenizer.apply_chat_template(messages)
        request_id = _request_id(request, "chatcmpl")
        req = service.build_request(request_id, prompt_ids, body, body.output_limit)
        gen = GenerationState(request_id=request_id, prompt_tokens=len(prompt_ids))
        deltas = service.stream(req, gen)
        if body.stream:
            return await _stream_chat(deltas, gen, model, body.include_usage)

        async def collect() -> str:
            return "".join([d async for d in deltas])

        text = await _unless_disconnected(request, collect())
        payload = {
            "id": request_id,
            "object": "chat.completion",
            "created": gen.created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": _usage(gen),
        }
        return Response(_encode(payload), media_type="application/json")

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
        body = await _parse(request, CompletionRequest)
        model = check_model(body.model)
        service = state.require()
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt_ids = service.tokenizer.encode(prompt)
        elif isinstance(prompt[0], str):
            prompt_ids = service.tokenizer.encode(str(prompt[0]))
        else:
            prompt_ids = [int(t) for t in prompt]
            vocab = service.tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in prompt_ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        request_id = _request_id(request, "cmpl")
        req = service.build_request(request_id, prompt_ids, body, body.output_limit)
        gen = GenerationState(request_id=request_id, prompt_tokens=len(prompt_ids))
        deltas = service.stream(req, gen)
        if body.stream:
            return await _stream_text(deltas, gen, model, body.include_usage)

        async def collect() -> str:
            return "".join([d async for d in deltas])

        text = await _unless_disconnected(request, collect())
        payload = {
            "id": request_id,
            "object": "text_completion",
            "created": gen.created,
            "model": model,
            "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}
            ],
            "usage": _usage(gen),
        }
        return Response(_encode(payload), media_type="application/json")

    @get("/v1/models")
    async def models() -> Response[bytes]:
        data = [
            {"id": name, "object": "model", "created": state.started, "owned_by": "tollgate"}
            for name in state.served_names
        ]
        return Response(_encode({"object": "list", "data": data}), media_type="application/json")

    @get("/health")
    async def health() -> Response[bytes]:
        service = state.service
        if service is not None and not service.engine.healthy:
            return Response(
                _encode({"status": "engine_failed"}), status_code=503, media_type="application/json"
            )
        return Response(_encode({"status": "ok"}), media_type="application/json")

    @get("/ready")
    async def ready() -> Response[bytes]:
        ok = state.ready and state.service is not None and state.service.engine.healthy
        return Response(
            _encode({"ready": ok}), status_code=200 if ok else 503, media_type="application/json"
        )

    @get("/stats")
    async def stats() -> Response[bytes]:
        service = state.require()
        payload = asdict(service.engine.stats)
        payload["max_model_len"] = service.max_model_len
        return Response(_encode(payload), media_type="application/json")

    @get("/metrics")
    async def metrics() -> Response[bytes]:
        service = state.require()
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return Litestar(
        route_handlers=[chat_completions, completions, models, health, ready, stats, metrics],
        exception_handlers={ApiError: _handle_api_error, Exception: _handle_unexpected},
        openapi_config=None,
        debug=False,
    )


async def _first_then(
    deltas: AsyncGenerator[str, None],
) -> tuple[str | None, AsyncGenerator[str, None]]:
    """Await the first delta so queue-full and similar errors become HTTP errors,
    not a broken stream."""
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        return None, deltas
    return first, deltas


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


async def _stream_chat(
    deltas: AsyncGenerator[str, None], gen: GenerationState, model: str, include_usage: bool
) -> Stream:
    first, rest = await _first_then(deltas)

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": gen.request_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return out

    async def events() -> AsyncIterator[bytes]:
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}, None))
            if first:
                yield _sse(chunk({"content": first}, None))
            async for text in rest:
                yield _sse(chunk({"content": text}, None))
        finally:
            # A client that hangs up while we wait to send must still free
            # the request's KV blocks now, not whenever the generator is
            # garbage-collected.
            await rest.aclose()
        yield _sse(chunk({}, gen.finish_reason))
        if include_usage:
            final = chunk({}, None)
            final["choices"] = []
            final["usage"] = _usage(gen)
            yield _sse(final)
        yield b"data: [DONE]\n\n"

    return Stream(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def _stream_text(
    deltas: AsyncGenerator[str, None], gen: GenerationState, model: str, include_usage: bool
) -> Stream:
    first, rest = await _first_then(deltas)

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": gen.request_id,
            "object": "text_completion",
            "created": gen.created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return out

    async def events() -> AsyncIterator[bytes]:
        try:
            if first:
                yield _sse(chunk(first, None))
            async for text in rest:
                yield _sse(chunk(text, None))
        finally:
            await rest.aclose()
        yield _sse(chunk("", gen.finish_reason))
        if include_usage:
            final = chunk("", None)
            final["choices"] = []
            final["usage"] = _usage(gen)
            yield _sse(final)
        yield b"data: [DONE]\n\n"

    return Stream(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
