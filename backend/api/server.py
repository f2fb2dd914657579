"""The backend's HTTP surface: OpenAI endpoints plus what a router needs.

`POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
`GET /health` (liveness), `GET /ready` (model loaded and warmed),
`GET /metrics` (Prometheus) and `GET /stats` (JSON load for balancers).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
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
        return await _respond(request, service, body, prompt_ids, model, _CHAT)

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
        return await _respond(request, service, body, prompt_ids, model, _TEXT)

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


@dataclass(frozen=True)
class _Format:
    """How one endpoint shapes its objects; the flow is the same for both."""

    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[str, str | None], dict[str, Any]]
    """Whole-response choice from (text, finish_reason)."""
    delta: Callable[[str | None, str | None], dict[str, Any]]
    """Stream choice from (text or None for an empty delta, finish_reason)."""
    opening: dict[str, Any] | None
    """A first stream choice sent before any text (chat announces the role)."""


def _chat_delta(text: str | None, finish: str | None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_delta(text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


_CHAT = _Format(
    id_prefix="chatcmpl",
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    choice=lambda text, finish: {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish,
    },
    delta=_chat_delta,
    opening={
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    },
)
_TEXT = _Format(
    id_prefix="cmpl",
    object="text_completion",
    chunk_object="text_completion",
    choice=_text_delta,
    delta=_text_delta,
    opening=None,
)


async def _respond(
    request: Request[Any, Any, Any],
    service: GenerationService,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    model: str,
    fmt: _Format,
) -> Response[bytes] | Stream:
    """Run the request and answer whole or as a stream, in `fmt`'s shape."""
    request_id = _request_id(request, fmt.id_prefix)
    # The engine keys its streams by id, and a client may send the same
    # x-request-id twice at once: the engine gets an id of its own.
    engine_id = f"{request_id}.{uuid.uuid4().hex[:12]}"
    req = service.build_request(engine_id, prompt_ids, body, body.output_limit)
    gen = GenerationState(request_id=request_id, prompt_tokens=len(prompt_ids))
    deltas = service.stream(req, gen)
    if body.stream:
        return await _stream(deltas, gen, model, body.include_usage, fmt)

    async def collect() -> str:
        return "".join([d async for d in deltas])

    text = await _unless_disconnected(request, collect())
    payload = {
        "id": request_id,
        "object": fmt.object,
        "created": gen.created,
        "model": model,
        "choices": [fmt.choice(text, gen.finish_reason)],
        "usage": _usage(gen),
    }
    return Response(_encode(payload), media_type="application/json")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


async def _stream(
    deltas: AsyncGenerator[str, None],
    gen: GenerationState,
    model: str,
    include_usage: bool,
    fmt: _Format,
) -> Stream:
    # Await the first text before committing to a 200 stream, so queue-full
    # and similar refusals still become proper HTTP errors.
    try:
        first: str | None = await deltas.__anext__()
    except StopAsyncIteration:
        first = None

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": gen.request_id,
            "object": fmt.chunk_object,
            "created": gen.created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = None
        return out

    async def events() -> AsyncIterator[bytes]:
        try:
            if fmt.opening is not None:
                yield _sse(chunk([fmt.opening]))
            if first:
                yield _sse(chunk([fmt.delta(first, None)]))
            async for text in deltas:
                yield _sse(chunk([fmt.delta(text, None)]))
        finally:
            # A client that hangs up while we wait to send must still free
            # the request's KV blocks now, not whenever the generator is
            # garbage-collected.
            await deltas.aclose()
        yield _sse(chunk([fmt.delta(None, gen.finish_reason)]))
        if include_usage:
            final = chunk([])
            final["usage"] = _usage(gen)
            yield _sse(final)
        yield b"data: [DONE]\n\n"

    return Stream(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
