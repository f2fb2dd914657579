"""The ``auto`` classifier against a labelled set (``tollgate route eval``).

The shipped set is ``tests/data/route_prompts.jsonl``: one JSON object per
line with ``id``, ``label`` (``easy``: the small model serves it well;
``hard``: it needs the large one), ``category`` and ``request`` (a chat
completion body: ``messages`` and optionally ``max_tokens`` and ``tools``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.policy.compiled import ClassifierConfig, ModelTier
from gateway.routing.classifier import classify, extract_features

LABELLED_SET = Path(__file__).resolve().parents[2] / "tests" / "data" / "route_prompts.jsonl"
"""The shipped labelled set (present in a source checkout)."""

LABEL_TIERS: Mapping[str, ModelTier] = {"easy": "small", "hard": "large"}

Example = tuple[str, str, Mapping[str, Any]]
"""(id, label, chat completion body)."""


def read_examples(path: Path) -> list[Example]:
    """The labelled requests in a JSON-lines file; ValueError names a bad line."""
    examples: list[Example] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            example = (str(record["id"]), str(record["label"]), record["request"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a labelled request ({exc})") from exc
        if example[1] not in LABEL_TIERS or not isinstance(example[2], dict):
            raise ValueError(f"{path}:{number}: label must be easy or hard, request an object")
        examples.append(example)
    return examples


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The classifier against labelled requests (``tollgate route eval``)."""

    num_examples: int
    num_correct: int
    true_large: int
    false_large: int
    false_small: int
    misses: tuple[tuple[str, str, float], ...]
    """(id, expected tier, score) of every wrong decision."""

    @property
    def accuracy(self) -> float:
        """Share of decisions that match the label."""
        return self.num_correct / self.num_examples if self.num_examples else 0.0

    @property
    def precision_large(self) -> float:
        """Of the requests sent to large, the share labelled hard."""
        sent = self.true_large + self.false_large
        return self.true_large / sent if sent else 0.0

    @property
    def recall_large(self) -> float:
        """Of the requests labelled hard, the share sent to large."""
        hard = self.true_large + self.false_small
        return self.true_large / hard if hard else 0.0

    @property
    def small_share(self) -> float:
        """Share of all requests sent to small."""
        sent_small = self.num_examples - self.true_large - self.false_large
        return sent_small / self.num_examples if self.num_examples else 0.0


def evaluate(examples: Sequence[Example], config: ClassifierConfig) -> Evaluation:
    """Classify every ``(id, label, chat body)``; labels are ``easy`` or ``hard``."""
    correct = true_large = false_large = false_small = 0
    misses: list[tuple[str, str, float]] = []
    for example_id, label, body in examples:
        expected = LABEL_TIERS[label]
        got = classify(extract_features(body, "chat", config), config)
        if got.tier == expected:
            correct += 1
            true_large += expected == "large"
        else:
            misses.append((example_id, expected, got.score))
            if got.tier == "large":
                false_large += 1
            else:
                false_small += 1
    return Evaluation(len(examples), correct, true_large, false_large, false_small, tuple(misses))
