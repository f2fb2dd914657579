"""The served model's tokenizer: encode, chat template, decode, streaming decode.

Built on the `tokenizers` library and a sandboxed Jinja chat template read from the
model folder (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`), which
starts far faster than `transformers.AutoTokenizer` and renders the same prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class ChatTemplateMissingError(ValueError):
    """The model folder has no chat template."""


def _token_text(value: Any) -> str | None:
    """Special tokens appear either as strings or as `{"content": ...}` objects."""
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


def _as_id_set(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text <-> token ids for one model."""

    def __init__(
        self,
        backend: Any,
        chat_template: str | None,
        eos_token_ids: frozenset[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        self._backend = backend
        self._template_source = chat_template
        self._template: Any = None
        self.eos_token_ids = eos_token_ids
        """Ids that end generation: the tokenizer's EOS plus the model config's."""
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """Load from a Hugging Face model folder."""
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        eos_ids: set[int] = set()
        if eos is not None and (eos_id := backend.token_to_id(eos)) is not None:
            eos_ids.add(eos_id)
        for name in ("config.json", "generation_config.json"):
            eos_ids |= _as_id_set(_read_json(model_dir / name).get("eos_token_id"))
        return cls(backend, _chat_template(model_dir, config), frozenset(eos_ids), bos, eos)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, special tokens left out by default."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for `messages`, ending with the assistant's turn opener."""
        if self._template_source is None:
            raise ChatTemplateMissingError("this model has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self._template_source)
        return str(
            self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        )

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered chat prompt (the template supplies special tokens)."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def incremental(self) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one completion."""
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens instead of the whole output: the window
    starts one emission behind (`prefix_offset`) so that decoders which drop a
    leading space at the start of a decode treat old and new text alike. A trailing
    U+FFFD is how an incomplete UTF-8 sequence decodes, so text up to it is released
    and the rest waits for the tokens that complete the character; `flush()`
    releases whatever is still held at the end. The deltas plus `flush()`
    concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._held_emitted = 0
        """Characters past the read offset already emitted while a character was incomplete."""
        self.text = ""
        """All text emitted so far."""

    @property
    def token_ids(self) -> list[int]:
        """Every id pushed so far."""
        return self._ids

    def push(self, token_ids: Iterable[int]) -> str:
        """Append ids; return the newly complete text (possibly empty)."""
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return any held-back text (call once, when the completion ends)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        start = len(prefix_text) + self._held_emitted
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            delta = new_text.rstrip(REPLACEMENT_CHAR)[start:]
            self._held_emitted += len(delta)
        else:
            delta = new_text[start:]
            if len(new_text) > len(prefix_text):
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                self._held_emitted = 0
        self.text += delta
        return delta
