"""The `auto` classifier: features and decisions table by table, and the
shipped classifier against the shipped labelled set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.policy.compiled import ClassifierConfig
from gateway.policy.loader import load_policy
from gateway.routing.classifier import FEATURES, Features, classify, extract_features
from gateway.routing.evaluation import LABELLED_SET, evaluate, read_examples

REPO = Path(__file__).resolve().parents[4]
CONFIG = ClassifierConfig(
    threshold=0.5,
    weights={name: 1.0 for name in FEATURES} | {"simple_task": -0.5},
    long_prompt_tokens=1000,
    long_output_tokens=1000,
    many_turns=5,
)


def shipped() -> ClassifierConfig:
    config = load_policy(REPO / "tenants", REPO / "policies").routing.auto
    assert config is not None
    return config


def chat(text: str, *, system: str | None = None, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": text}], **fields}


@pytest.mark.parametrize(
    ("body", "feature", "low", "high"),
    [
        (chat("Hi!"), "simple_task", 0.5, 1.0),
        (chat("Hi!"), "code", 0.0, 0.0),
        (chat("```python\nprint(1)\n```\nwhy?"), "code", 1.0, 1.0),
        (chat("Write a Python function that reverses a linked list."), "code", 0.9, 1.0),
        (chat("Solve 3x^2 - 12 = 0 and prove it has two roots."), "math", 1.0, 1.0),
        (chat("What is 15 + 27?"), "math", 0.0, 0.0),
        (chat("Explain step by step why the sky is blue."), "reasoning", 0.9, 1.0),
        (chat("Write a detailed, comprehensive report."), "long_answer", 0.9, 1.0),
        (chat("hello", tools=[{"type": "function"}]), "tools", 1.0, 1.0),
        (chat("hello", max_tokens=500), "max_tokens", 0.5, 0.5),
        (chat("hello", max_completion_tokens=2000), "max_tokens", 1.0, 1.0),
        (chat("hello", system="You are an expert. Be rigorous."), "system_hint", 1.0, 1.0),
        (chat("hello", system="Reply concisely."), "simple_task", 0.75, 0.75),
        (chat("x " * 4000), "prompt_tokens", 1.0, 1.0),
        (chat("hello there"), "prompt_tokens", 0.0, 0.0),
    ],
)
def test_features(body: dict[str, Any], feature: str, low: float, high: float) -> None:
    value = extract_features(body, "chat", CONFIG).values[feature]
    assert low <= value <= high


@pytest.mark.parametrize(
    ("user_turns", "expected"), [(1, 0.0), (2, 0.25), (3, 0.5), (5, 1.0), (9, 1.0)]
)
def test_turns_feature(user_turns: int, expected: float) -> None:
    messages: list[dict[str, str]] = []
    for i in range(user_turns):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
    features = extract_features({"messages": messages[:-1]}, "chat", CONFIG)
    assert features.values["turns"] == expected


def test_every_feature_is_between_0_and_1() -> None:
    for _, _, body in read_examples(LABELLED_SET):
        values = extract_features(body, "chat", CONFIG).values
        assert set(values) == set(FEATURES)
        assert all(0.0 <= v <= 1.0 for v in values.values()), values


def test_text_completions_have_features_too() -> None:
    features = extract_features({"prompt": "def f(x):\n    return x"}, "text", CONFIG)
    assert features.values["code"] > 0.5 and features.values["turns"] == 0.0


@pytest.mark.parametrize(
    ("values", "tier", "score", "first_reason"),
    [
        ({}, "small", 0.0, None),
        ({"code": 1.0}, "large", 1.0, "code+"),
        ({"code": 0.4}, "small", 0.4, "code+"),
        ({"code": 0.6, "simple_task": 1.0}, "small", 0.1, "code+"),
        ({"math": 0.5, "reasoning": 0.5}, "large", 1.0, "math+"),
        ({"simple_task": 1.0, "tools": 1.0}, "large", 0.5, "tools+"),
        ({"simple_task": 1.0}, "small", -0.5, "simple_task-"),
    ],
)
def test_classify(values: dict[str, float], tier: str, score: float, first_reason: str | None):
    result = classify(Features(values, 10), CONFIG)
    assert (result.tier, result.score) == (tier, score)
    names = result.reason_names()
    assert (names[0] if names else None) == first_reason
    contributions = [abs(r.contribution) for r in result.reasons]
    assert contributions == sorted(contributions, reverse=True)


def test_bias_and_threshold_come_from_config() -> None:
    config = ClassifierConfig(threshold=0.0, bias=0.1)
    assert classify(Features({}, 1), config).tier == "large"
    config = ClassifierConfig(threshold=0.2, bias=0.1)
    assert classify(Features({}, 1), config).tier == "small"


def test_the_labelled_set_is_large_varied_and_labelled() -> None:
    records = [json.loads(line) for line in LABELLED_SET.read_text().splitlines()]
    assert len(records) >= 200
    assert len({r["id"] for r in records}) == len(records)
    labels = Counter(r["label"] for r in records)
    assert labels["easy"] >= 80 and labels["hard"] >= 80
    categories = {r["category"] for r in records}
    for wanted in ("chitchat", "lookup", "formatting", "math", "code", "reasoning", "analysis"):
        assert wanted in categories
    assert any(r["request"].get("tools") for r in records)
    assert any(len(r["request"]["messages"]) > 2 for r in records)


def test_shipped_classifier_meets_its_targets_on_the_shipped_set() -> None:
    result = evaluate(read_examples(LABELLED_SET), shipped())
    assert result.accuracy >= 0.85, result
    assert result.recall_large >= 0.95, result
    assert 0.3 <= result.small_share <= 0.8


def test_read_examples_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "label": "easy", "request": {"messages": []}}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_examples(path)
