"""Prompt token counting: the documented estimate and the tokenizer fallback."""

from __future__ import annotations

from pathlib import Path

from gateway.policy.compiled import ModelRoute, Pool, UpstreamTimeouts
from gateway.quota.tokens import PromptCounter, count_chat, count_text


def route(tokenizer: str | None = None) -> ModelRoute:
    pool = Pool("p", "tollgate", (), UpstreamTimeouts(1, 1, 1, 1))
    return ModelRoute("m", "m", "small", 4096, pool, tokenizer)


def test_chat_estimate_is_bytes_over_four_plus_overheads() -> None:
    messages = [
        {"role": "system", "content": "abcd" * 10},  # 40 bytes -> 10
        {"role": "user", "content": "hé", "name": "bob"},  # 3 bytes -> 1, name 3 -> 1
    ]
    assert count_chat(messages) == 3 + (4 + 10) + (4 + 1 + 1)


def test_chat_content_parts_count_their_text() -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "x" * 8}, {"type": "text", "text": "y"}],
        }
    ]
    assert count_chat(messages) == 3 + 4 + 2 + 1


def test_text_prompts_strings_and_token_ids() -> None:
    assert count_text("abcdefgh") == 2
    assert count_text(["abcd", "ab"]) == 2
    assert count_text([1, 2, 3]) == 3
    assert count_text([[1, 2], [3]]) == 3


def test_counter_falls_back_to_the_estimate_without_a_usable_tokenizer(tmp_path: Path) -> None:
    counter = PromptCounter()
    body = {"messages": [{"role": "user", "content": "abcd" * 4}]}
    estimate = counter.count(route(), body, "chat")
    assert estimate == 3 + 4 + 4
    assert counter.count(route(str(tmp_path / "missing.json")), body, "chat") == estimate
    assert counter.count(route(), {"prompt": "abcd" * 4}, "text") == 4
