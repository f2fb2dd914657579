"""Prompt token counts for admission, on every request, so they must be cheap.

Without a tokenizer the count is an estimate:

    chat:  3 + sum over messages of (4 + ceil(bytes(text) / 4))
    text:  ceil(bytes(prompt) / 4)   (token-id prompts: their length)

where `text` is a message's string content (or the text parts of a content
array; other parts count as their JSON size) plus its `name`. Four UTF-8
bytes per token is the usual figure for English with BPE tokenizers; the 4
tokens per message and 3 per reply stand for the chat template's role
markers. The estimate only sizes the reservation: settlement charges the
prompt tokens the backend reports, so an estimate that is off moves tokens
between reservation and settlement but never loses them.

A model whose policy names a `tokenizer` (a local `tokenizer.json`, or a
folder holding one) is counted with it when the `tokenizers` package is
installed (it comes with the `backend` extra). Nothing is ever downloaded:
anything else falls back to the estimate, logged once per tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog

from gateway.policy.compiled import ModelRoute

log = structlog.get_logger("tollgate.quota")

BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
REPLY_OVERHEAD = 3

_encode = msgspec.json.Encoder().encode


class _Encoder(Protocol):
    def __call__(self, text: str) -> int: ...


def _estimate(text: str) -> int:
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / BYTES_PER_TOKEN)


def _message_texts(message: dict[str, Any]) -> list[str]:
    """The strings of a message that reach the model as prompt text."""
    texts: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part is not None:
                texts.append(_encode(part).decode())
    elif content is not None:
        texts.append(_encode(content).decode())
    name = message.get("name")
    if isinstance(name, str):
        texts.append(name)
    return texts


def count_chat(messages: list[Any], tokens_of: _Encoder = _estimate) -> int:
    """Prompt tokens of a chat request (`messages` already checked to be dicts)."""
    total = REPLY_OVERHEAD
    for message in messages:
        total += MESSAGE_OVERHEAD
        if isinstance(message, dict):
            total += sum(tokens_of(text) for text in _message_texts(message))
    return total


def count_text(prompt: Any, tokens_of: _Encoder = _estimate) -> int:
    """Prompt tokens of a completions request: a string, a list of strings, or
    token ids (a list of ints, or a list of such lists)."""
    if isinstance(prompt, str):
        return tokens_of(prompt)
    if isinstance(prompt, list):
        total = 0
        for item in prompt:
            if isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
            else:
                total += count_text(item, tokens_of)
        return total
    return 0 if prompt is None else tokens_of(_encode(prompt).decode())


class PromptCounter:
    """Counts prompts per model: its tokenizer when usable, else the estimate.

    Tokenizers are loaded on first use and kept for the process's life.
    """

    def __init__(self) -> None:
        self._encoders: dict[str, _Encoder | None] = {}

    def count(self, route: ModelRoute, body: dict[str, Any], kind: str) -> int:
        """Prompt tokens of `body` (a chat request when `kind == "chat"`)."""
        tokens_of = self._encoder(route.tokenizer) if route.tokenizer else None
        if tokens_of is None:
            tokens_of = _estimate
        if kind == "chat":
            messages = body.get("messages")
            return count_chat(messages if isinstance(messages, list) else [], tokens_of)
        return count_text(body.get("prompt"), tokens_of)

    def _encoder(self, name: str) -> _Encoder | None:
        if name not in self._encoders:
            self._encoders[name] = _load_tokenizer(name)
        return self._encoders[name]


def _load_tokenizer(name: str) -> _Encoder | None:
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        log.warning("tokenizer_not_found", tokenizer=name, fallback="estimate")
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        log.warning("tokenizers_not_installed", tokenizer=name, fallback="estimate")
        return None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # a corrupt file must not take requests down
        log.warning("tokenizer_unreadable", tokenizer=name, error=str(exc), fallback="estimate")
        return None

    def tokens_of(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return tokens_of
