"""The ``auto`` classifier: small or large, from explainable features of a request.

Two pure steps:

- ``extract_features(body, kind, config)``: each feature is a number between
  0 and 1 read from the request itself (prompt length, turns, code, math,
  reasoning and long-answer cues, tool definitions, requested ``max_tokens``,
  hints in the system prompt, and cues of a simple task);
- ``classify(features, config)``: ``score = bias + sum(weight * value)``,
  ``large`` when the score reaches the threshold. The reasons are the
  features that moved the score, largest first.

Weights and thresholds come from policy (``routing.auto``); the cue lists are
here, documented in docs/routing.md. Only the first ``_SCAN_CHARS`` characters
of each text are scanned, so a huge prompt costs no more than a long one (its
length still counts through ``prompt_tokens``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from gateway.policy.compiled import ClassifierConfig, FeatureName, ModelTier

FEATURES: tuple[str, ...] = get_args(FeatureName)
_SCAN_CHARS = 16_000
_CHARS_PER_TOKEN = 4
_SHORT_PROMPT_TOKENS = 12
"""Prompts this short add nothing through ``prompt_tokens``."""


def _words(*phrases: str) -> re.Pattern[str]:
    """One case-insensitive pattern matching any phrase as whole words."""
    return re.compile(r"\b(?:" + "|".join(phrases) + r")\b", re.IGNORECASE)


_CODE_FENCE = re.compile(r"```|^(?: {4}|\t)\S", re.MULTILINE)
_CODE_SYNTAX = re.compile(
    r"(?:\bdef \w+\(|\bfunction\s*\w*\(|=>|\bimport \w|#include|\breturn\b[^.\n]*;|"
    r"\w+\([^()\n]*\)\s*[{;:]|\bSELECT\b.+\bFROM\b|[{}]\s*$)",
    re.MULTILINE,
)
_CODE_TERMS = _words(
    r"python",
    r"java(?:script)?",
    r"typescript",
    r"rust",
    r"golang",
    r"go code",
    r"c\+\+",
    r"kotlin",
    r"swift",
    r"ruby",
    r"php",
    r"sql",
    r"bash",
    r"shell script",
    r"regex",
    r"regular expression",
    r"docker(?:file)?",
    r"kubernetes",
    r"react",
    r"django",
    r"node",
    r"api",
    r"rest",
    r"endpoints?",
    r"functions?",
    r"class(?:es)?",
    r"algorithms?",
    r"recursi(?:on|ve)",
    r"(?:time|space) complexity",
    r"unit tests?",
    r"pytest",
    r"stack trace",
    r"bugs?",
    r"debug",
    r"compile[rs]?",
    r"refactor",
    r"deadlocks?",
    r"thread-safe",
    r"concurren(?:t|cy)",
    r"async(?:/await)?",
    r"quer(?:y|ies)",
    r"linked list",
    r"binary (?:search )?tree",
    r"cache",
    r"memory leak",
    r"workflow",
    r"github actions",
    r"cte",
    r"data structures?",
    r"implement",
    r"source code",
    r"script",
)
_MATH_TERMS = _words(
    r"solve",
    r"prove",
    r"proof",
    r"derive",
    r"derivatives?",
    r"integrals?",
    r"probability",
    r"equations?",
    r"expected (?:value|number)",
    r"eigen\w*",
    r"limit",
    r"factor(?:s|ise|ize)?",
    r"modul(?:o|ar)",
    r"mod",
    r"induction",
    r"matri(?:x|ces)",
    r"theorem",
    r"compound(?:ed)? interest",
    r"minimi[sz]e",
    r"maximi[sz]e",
    r"how many ways",
    r"permutations?",
    r"combinations?",
    r"integer solutions?",
    r"geometric series",
    r"divisible",
    r"percentage change",
    r"bayes",
    r"how fast",
    r"catch up",
    r"trailing zeros",
    r"irrational",
    r"area",
    r"perimeter",
    r"volume",
    r"radius",
    r"interest rates?",
    r"mortgage",
    r"loan",
    r"depreciat\w*",
    r"amorti[sz]\w*",
)
_MATH_SYNTAX = re.compile(
    r"(?:\d\s*[*/^]\s*\(?[\dx]|[a-z]\^\d|\d[a-z]\b|\b[a-z]\s*=\s*-?\d|\d+!|sqrt|\bln\(|\be\^|"
    r"\b(?:sin|cos|tan)\b)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?<![\w.])\$?\d[\d,]*(?:\.\d+)?%?")
_QUANTITY_QUESTION = _words(
    r"how (?:many|much|long|far)",
    r"what time",
    r"calculate",
    r"compute",
    r"work out",
    r"find",
)
_REASONING = _words(
    r"step by step",
    r"step-by-step",
    r"explain (?:why|how|your reasoning|carefully)",
    r"why (?:does|did|do|is|are|was|were|would)",
    r"reason(?:ing)?(?: it)?(?: through)?",
    r"trade-?offs?",
    r"pros and cons",
    r"compar(?:e|ing|ison)",
    r"contrast",
    r"analy[sz]e",
    r"analysis",
    r"evaluate",
    r"justify",
    r"defend",
    r"diagnose",
    r"root causes?",
    r"implications",
    r"what would (?:happen|change)",
    r"plan",
    r"strateg(?:y|ies|ic)",
    r"weigh",
    r"prioriti[sz]ed?",
    r"think (?:it )?through",
    r"work through",
    r"how would you",
    r"design",
    r"propose",
    r"recommend (?:one|a strategy)",
    r"can we (?:conclude|trust)",
    r"every case",
    r"which (?:approach|is cleaner|initiatives)",
    r"should we",
    r"explanations?",
    r"how (?:do|can|would|should) (?:you|we|i)",
    r"discuss",
    r"explain",
    r"critique",
    r"argu(?:e|ing|ment|ments)",
    r"convince",
    r"key differences",
    r"walk (?:me |us )?through",
    r"how you'?d",
    r"when (?:you'?d|to|would you) (?:choose|use)",
    r"(?:second-order )?effects",
    r"consequences",
    r"impact",
    r"investigate",
    r"decide",
    r"causes",
    r"model the scenarios",
    r"lessons",
    r"options",
)
_LONG_ANSWER = _words(
    r"essay",
    r"detailed",
    r"in[- ]depth",
    r"comprehensive",
    r"thorough(?:ly)?",
    r"reports?",
    r"long-form",
    r"[\d,]+-word",
    r"outline",
    r"guide",
    r"lesson plan",
    r"business plan",
    r"literature review",
    r"memo",
    r"design document",
    r"structured",
    r"swot",
    r"draft",
    r"story",
    r"cover letter",
    r"policy",
    r"proposal",
    r"article",
    r"blog post",
    r"speech",
    r"\d+ words",
    r"structure",
    r"talk",
    r"presentation",
    r"slides",
    r"curriculum",
    r"syllabus",
)
_SYSTEM_HARD = _words(
    r"expert",
    r"rigorous(?:ly)?",
    r"step by step",
    r"carefully",
    r"detailed",
    r"thorough",
    r"senior",
    r"meticulous",
    r"world-class",
    r"experienced",
    r"reasoning",
)
_SIMPLE = _words(
    r"hi",
    r"hello",
    r"hey",
    r"good (?:morning|night|evening)",
    r"thanks?",
    r"thank you",
    r"translate",
    r"how do (?:you|i) (?:say|write)",
    r"synonym",
    r"antonym",
    r"spell(?:ing)?",
    r"capital of",
    r"who (?:wrote|painted|is the author|was the first)",
    r"what (?:is|are) the (?:capital|currency|population|largest|tallest|main ingredient)",
    r"define",
    r"what does [\w' ]+ (?:mean|stand for)",
    r"fix the grammar",
    r"rephrase",
    r"paraphrase",
    r"rewrite",
    r"convert",
    r"format",
    r"title case",
    r"camelcase",
    r"alphabetical",
    r"sort these",
    r"bullet points",
    r"numbered list",
    r"one sentence",
    r"one word",
    r"one line",
    r"in a sentence",
    r"briefly",
    r"jokes?",
    r"haiku",
    r"rhyme",
    r"name for",
    r"sentiment",
    r"positive or negative",
    r"classify",
    r"extract",
    r"summari[sz]e in",
    r"concise(?:ly)?",
    r"be brief",
    r"keep answers short",
    r"fun fact",
    r"odd one out",
    r"pronounce",
)


@dataclass(frozen=True, slots=True)
class Features:
    """A request's features, each between 0 and 1, and its estimated prompt size."""

    values: Mapping[str, float]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Reason:
    """One feature's share of a score."""

    feature: str
    contribution: float


@dataclass(frozen=True, slots=True)
class Classification:
    """What the classifier decided, and why."""

    tier: ModelTier
    score: float
    reasons: tuple[Reason, ...]
    """The features that moved the score, largest first."""

    def reason_names(self, limit: int = 3) -> list[str]:
        """The leading reasons' feature names (``+`` pushed towards large)."""
        return [f"{r.feature}{'+' if r.contribution > 0 else '-'}" for r in self.reasons[:limit]]


def _text_of(content: Any) -> str:
    """Text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


@dataclass(frozen=True, slots=True)
class _Texts:
    system: str
    task: str
    """The last user message (the prompt, for text completions)."""
    everything: str
    user_turns: int


def _texts(body: Mapping[str, Any], kind: str) -> _Texts:
    if kind != "chat":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(p for p in prompt if isinstance(p, str))
        text = prompt if isinstance(prompt, str) else ""
        return _Texts("", text, text, 1)
    system: list[str] = []
    users: list[str] = []
    every: list[str] = []
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        text = _text_of(message.get("content"))
        every.append(text)
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            users.append(text)
    return _Texts("\n".join(system), users[-1] if users else "", "\n".join(every), len(users))


def _log_scale(value: int, low: int, high: int) -> float:
    """0 at or below ``low``, 1 at or above ``high``, logarithmic in between:
    going from 20 to 40 tokens says as much as going from 400 to 800."""
    if value <= low:
        return 0.0
    if value >= high:
        return 1.0
    return math.log(value / low) / math.log(high / low)


def _capped(*parts: float) -> float:
    return min(1.0, sum(parts))


def _hits(pattern: re.Pattern[str], text: str, each: float) -> float:
    return min(1.0, each * len(pattern.findall(text)))


def extract_features(body: Mapping[str, Any], kind: str, config: ClassifierConfig) -> Features:
    """The features of one request body (``kind`` is ``chat`` or ``text``)."""
    texts = _texts(body, kind)
    task = texts.task[:_SCAN_CHARS]
    everything = texts.everything[:_SCAN_CHARS]
    system = texts.system[:_SCAN_CHARS]
    prompt_tokens = len(texts.everything) // _CHARS_PER_TOKEN + 1

    code = _capped(
        1.0 if _CODE_FENCE.search(everything) else 0.0,
        _hits(_CODE_SYNTAX, everything, 0.4),
        _hits(_CODE_TERMS, task, 0.5),
    )
    numbers = len(_NUMBER.findall(task))
    maths = _capped(
        _hits(_MATH_TERMS, task, 0.5),
        0.5 if _MATH_SYNTAX.search(task) else 0.0,
        0.5 if numbers >= 2 and _QUANTITY_QUESTION.search(task) else 0.0,
        0.5 if numbers >= 3 and "?" in task else 0.0,
    )
    tools = body.get("tools") or body.get("functions")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    turns = max(0, texts.user_turns - 1) / max(1, config.many_turns - 1)
    values = {
        "prompt_tokens": _log_scale(prompt_tokens, _SHORT_PROMPT_TOKENS, config.long_prompt_tokens),
        "turns": min(1.0, turns),
        "code": code,
        "math": maths,
        "reasoning": _hits(_REASONING, task, 0.5),
        "long_answer": _hits(_LONG_ANSWER, task, 0.5),
        "tools": 1.0 if tools else 0.0,
        "max_tokens": min(1.0, int(max_tokens) / config.long_output_tokens)
        if isinstance(max_tokens, int)
        else 0.0,
        "system_hint": _hits(_SYSTEM_HARD, system, 0.5),
        "simple_task": _capped(_hits(_SIMPLE, task, 0.5), _hits(_SIMPLE, system, 0.25)),
    }
    return Features(values, prompt_tokens)


def classify(features: Features, config: ClassifierConfig) -> Classification:
    """The tier for ``features`` under ``config``'s weights and threshold."""
    score = config.bias
    reasons: list[Reason] = []
    for name in FEATURES:
        contribution = config.weights.get(name, 0.0) * features.values.get(name, 0.0)
        if contribution:
            score += contribution
            reasons.append(Reason(name, round(contribution, 3)))
    reasons.sort(key=lambda r: -abs(r.contribution))
    tier: ModelTier = "large" if score >= config.threshold else "small"
    return Classification(tier, round(score, 3), tuple(reasons))
