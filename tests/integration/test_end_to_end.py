"""The whole path with real parts: openai client -> gateway -> backend -> SmolLM2."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from tests.support.openai_schema import validate
from tests.support.processes import BackendProcess, InProcessGateway

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def client(gw: InProcessGateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=token, max_retries=0, timeout=120)


def test_chat_completion_matches_the_backend_and_reports_usage(
    gateway: InProcessGateway, backend: BackendProcess, mint: Callable[..., str]
) -> None:
    raw = client(gateway, mint()).chat.completions.with_raw_response.create(
        model="smollm2",
        messages=PROMPT,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    validate(completion.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    text = completion.choices[0].message.content or ""
    assert text.strip()
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 24
    assert raw.headers["x-tollgate-model"] == "smollm2"
    assert raw.headers["x-request-id"]
    assert float(raw.headers["x-tollgate-overhead-ms"]) >= 0
    # The same greedy request straight to the backend gives the same text: the
    # gateway relayed what the model generated.
    direct = httpx.post(
        f"{backend.url}/v1/chat/completions",
        json={"model": "smollm2", "messages": PROMPT, "max_tokens": 24, "temperature": 0},
        timeout=120,
    ).json()
    assert direct["choices"][0]["message"]["content"] == text
    assert "Paris" in text


def test_streaming_with_usage(gateway: InProcessGateway, mint: Callable[..., str]) -> None:
    oa = client(gateway, mint())
    chunks = list(
        oa.chat.completions.create(
            model="smollm2",
            messages=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    for chunk in chunks:
        validate(
            chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse"
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = oa.chat.completions.create(
        model="smollm2",
        messages=PROMPT,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    assert text == final.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens > 0
    assert chunks[-1].usage.completion_tokens > 0
    assert sum(1 for c in chunks if c.usage is not None) == 1


def test_streaming_without_usage_hides_the_usage_chunk(
    gateway: InProcessGateway, mint: Callable[..., str]
) -> None:
    chunks = list(
        client(gateway, mint()).chat.completions.create(
            model="smollm2",
            messages=PROMPT,
            max_tokens=8,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert chunks
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_text_completion(gateway: InProcessGateway, mint: Callable[..., str]) -> None:
    done = client(gateway, mint()).completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    validate(done.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    assert done.choices[0].text
    assert done.usage is not None and done.usage.prompt_tokens > 0


def test_models_lists_only_what_the_tenant_may_use(
    gateway: InProcessGateway, mint: Callable[..., str]
) -> None:
    acme = {m.id for m in client(gateway, mint("acme")).models.list()}
    globex = {m.id for m in client(gateway, mint("globex")).models.list()}
    assert {"smollm2", "smollm2-small", "small", "large", "auto"} <= acme
    # A free tenant: the small model, and the routing names that lead to it.
    assert globex == {"smollm2-small", "small", "auto"}


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    validate(body, "ErrorResponse")
    error: dict[str, object] = body["error"]
    return error


@pytest.mark.parametrize(
    ("headers", "content", "status", "code"),
    [
        (
            {},
            b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}]}',
            401,
            "missing_token",
        ),
        (
            {"authorization": "Bearer not-a-jwt"},
            b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}]}',
            401,
            "invalid_token",
        ),
        (None, b'{"model": "smollm2", "messages": [', 400, None),
        (
            None,
            b'{"model":"gpt-17","messages":[{"role":"user","content":"hi"}]}',
            404,
            "model_not_found",
        ),
        (None, b'{"model":"smollm2","messages":"hi"}', 400, None),
        (
            None,
            b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"max_tokens":-1}',
            400,
            None,
        ),
    ],
)
def test_bad_input_gets_openai_errors(
    gateway: InProcessGateway,
    mint: Callable[..., str],
    headers: dict[str, str] | None,
    content: bytes,
    status: int,
    code: str | None,
) -> None:
    sent = headers if headers is not None else {"authorization": f"Bearer {mint()}"}
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=content,
        headers={**sent, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status
    error = _error(response)
    if code is not None:
        assert error["code"] == code
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_sdk_exception_types(gateway: InProcessGateway, mint: Callable[..., str]) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "bad").chat.completions.create(model="smollm2", messages=PROMPT)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client(gateway, mint()).chat.completions.create(model="nope", messages=PROMPT)  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, mint("globex")).chat.completions.create(model="smollm2", messages=PROMPT)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client(gateway, mint()).chat.completions.create(
            model="smollm2",
            messages=PROMPT,
            n=3,  # type: ignore[arg-type]
        )
