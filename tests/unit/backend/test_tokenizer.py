"""Streaming detokenization on a byte-level BPE tokenizer that splits characters."""

from __future__ import annotations

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")

from backend.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

TEXT = "héllo wörld 你好 🚀"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _backend():
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(["hello world", "hello there", "the world"] * 20, trainer)
    return backend


@pytest.fixture
def tokenizer(tmp_path) -> Tokenizer:
    _backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|im_end|>"}, "chat_template": TEMPLATE})
    )
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0]}))
    return Tokenizer.from_dir(tmp_path)


def test_deltas_never_split_characters_and_concatenate_to_decode(tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # multi-byte characters span several tokens
    detok = tokenizer.incremental()
    deltas = [detok.push([token]) for token in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT == detok.text
    assert any(d == "" for d in deltas)  # something was held back


def test_special_tokens_are_skipped_and_pushes_may_be_batched(tokenizer) -> None:
    end = tokenizer.encode("<|im_end|>")
    ids = tokenizer.encode(TEXT) + end
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(deltas) + detok.flush() == TEXT


def test_incomplete_tail_is_released_by_flush(tokenizer) -> None:
    ids = tokenizer.encode("ok 🚀")
    detok = tokenizer.incremental()
    streamed = detok.push(ids[:-1])
    assert streamed == "ok "
    assert detok.flush() == tokenizer.decode(ids[:-1])[len("ok ") :]


def test_chat_template_and_eos(tokenizer) -> None:
    prompt = tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer.encode("<|im_start|>")[0]
    assert tokenizer.eos_token_ids == frozenset({0, 2})
