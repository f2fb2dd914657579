"""The OpenAI request bodies the backend accepts, validated strictly.

Fields that change the output in ways this engine does not implement are
refused with a 400 naming the field, never silently ignored. Fields that only
carry metadata (user, metadata, store, service_tier) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.api.errors import InvalidRequest


class StreamOptions(BaseModel):
    """`stream_options` of a streaming request."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None


class TextPart(BaseModel):
    """A text content part; other part types are refused."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text, parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    priority: int = 0
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        if self.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise InvalidRequest(f"{param} is not supported by this backend", param=param)
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this backend", param="logit_bias")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported by this backend", param="logprobs")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings as a tuple, empty strings dropped."""
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_chat(self) -> ChatCompletionRequest:
        if self.tools:
            raise InvalidRequest("tools are not supported by this backend", param="tools")
        if self.tool_choice not in (None, "none"):
            raise InvalidRequest(
                "tool_choice is not supported by this backend", param="tool_choice"
            )
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidRequest(
                "only response_format type 'text' is supported", param="response_format"
            )
        if self.top_logprobs:
            raise InvalidRequest("logprobs are not supported by this backend", param="top_logprobs")
        return self

    @property
    def output_limit(self) -> int | None:
        """max_completion_tokens wins over the older max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self) -> CompletionRequest:
        if self.echo:
            raise InvalidRequest("echo is not supported by this backend", param="echo")
        if self.suffix:
            raise InvalidRequest("suffix is not supported by this backend", param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest("only best_of=1 is supported", param="best_of")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise InvalidRequest("batched prompts are not supported", param="prompt")
        return self

    @property
    def output_limit(self) -> int | None:
        """The requested completion length."""
        return self.max_tokens
