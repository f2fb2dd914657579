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
here, documented in docs/routing.md. Cues are matched as whole words on the
lowercased text, from a text's first 3,000 and last 1,000 characters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from gateway.policy.compiled import ClassifierConfig, FeatureName, ModelTier

FEATURES: tuple[str, ...] = get_args(FeatureName)
_SCAN_HEAD_CHARS = 3000
_SCAN_TAIL_CHARS = 1000
"""Cues are read from a text's first and last characters only (instructions
sit at the start or the end of a long prompt), so a huge prompt costs no more
than a long one; its length still counts through ``prompt_tokens``."""
_CHARS_PER_TOKEN = 4
_SHORT_PROMPT_TOKENS = 12
"""Prompts this short add nothing through ``prompt_tokens``."""

# fmt: off
# Cue phrases by group: lowercase words as the tokenizer splits them. Within a
# group, overlapping phrases count once (the longest).
_CUES: dict[str, tuple[str, ...]] = {
    "code": (
        "python", "java", "javascript", "typescript", "rust", "golang", "go code", "c++",
        "kotlin", "swift", "ruby", "php", "sql", "bash", "shell script", "regex",
        "regular expression", "docker", "dockerfile", "kubernetes", "react", "django", "node",
        "api", "rest", "endpoint", "endpoints", "function", "functions", "class", "classes",
        "algorithm", "algorithms", "recursion", "recursive", "time complexity",
        "space complexity", "unit test", "unit tests", "pytest", "stack trace", "bug", "bugs",
        "debug", "compile", "compiler", "compilers", "compiles", "refactor", "deadlock",
        "deadlocks", "thread-safe", "concurrent", "concurrency", "async", "async/await",
        "query", "queries", "linked list", "binary tree", "binary search tree", "cache",
        "memory leak", "workflow", "github actions", "cte", "data structure",
        "data structures", "implement", "source code", "script",
    ),
    "math": (
        "solve", "prove", "proof", "derive", "derivative", "derivatives", "integral",
        "integrals", "probability", "equation", "equations", "expected value",
        "expected number", "eigenvalue", "eigenvalues", "eigenvector", "eigenvectors", "limit",
        "factor", "factors", "factorise", "factorize", "modulo", "modular", "mod", "induction",
        "matrix", "matrices", "theorem", "compound interest", "compounded interest", "minimise",
        "minimize", "maximise", "maximize", "how many ways", "permutation", "permutations",
        "combination", "combinations", "integer solution", "integer solutions",
        "geometric series", "divisible", "percentage change", "bayes", "how fast", "catch up",
        "trailing zeros", "irrational", "area", "perimeter", "volume", "radius",
        "interest rate", "interest rates", "mortgage", "loan", "depreciate", "depreciates",
        "depreciated", "depreciation", "amortise", "amortize", "amortisation", "amortization",
    ),
    "quantity": (
        "how many", "how much", "how long", "how far", "what time", "calculate", "compute",
        "work out", "find",
    ),
    "reasoning": (
        "step by step", "step-by-step", "explain", "explain why", "explain how",
        "explain your reasoning", "explain carefully", "why does", "why did", "why do",
        "why is", "why are", "why was", "why were", "why would", "reason", "reasoning",
        "reason it through", "reason through", "trade-off", "trade-offs", "tradeoff",
        "tradeoffs", "pros and cons", "compare", "comparing", "comparison", "contrast",
        "analyse", "analyze", "analysis", "evaluate", "justify", "defend", "diagnose",
        "root cause", "root causes", "implications", "what would happen", "what would change",
        "plan", "strategy", "strategies", "strategic", "weigh", "prioritise", "prioritize",
        "prioritised", "prioritized", "think through", "think it through", "work through",
        "how would you", "design", "propose", "recommend one", "recommend a strategy",
        "can we conclude", "can we trust", "every case", "which approach", "which is cleaner",
        "which initiatives", "should we", "explanation", "explanations", "how do you",
        "how can you", "how should you", "how do we", "how can we", "how would we",
        "how should we", "how do i", "how can i", "how would i", "how should i", "discuss",
        "critique", "argue", "arguing", "argument", "arguments", "convince", "key differences",
        "walk me through", "walk us through", "walk through", "how you'd", "when you'd choose",
        "when you'd use", "when to choose", "when to use", "when would you choose",
        "when would you use", "effects", "consequences", "impact", "investigate", "decide",
        "causes", "model the scenarios", "lessons", "options",
    ),
    "long_answer": (
        "essay", "detailed", "in-depth", "in depth", "comprehensive", "thorough", "thoroughly",
        "report", "reports", "long-form", "outline", "guide", "lesson plan", "business plan",
        "literature review", "memo", "design document", "structured", "swot", "draft", "story",
        "cover letter", "policy", "proposal", "article", "blog post", "speech", "structure",
        "talk", "presentation", "slides", "curriculum", "syllabus",
    ),
    "system_hint": (
        "expert", "rigorous", "rigorously", "step by step", "carefully", "detailed", "thorough",
        "senior", "meticulous", "world-class", "experienced", "reasoning",
    ),
    "simple": (
        "hi", "hello", "hey", "good morning", "good night", "good evening", "thanks", "thank",
        "thank you", "translate", "how do you say", "how do i say", "how do you write",
        "how do i write", "synonym", "antonym", "spell", "spelling", "capital of", "who wrote",
        "who painted", "who is the author", "who was the first", "what is the capital",
        "what is the currency", "what is the population", "what is the largest",
        "what is the tallest", "what is the main ingredient", "what are the capital",
        "define", "fix the grammar", "rephrase", "paraphrase", "rewrite", "convert", "format",
        "title case", "camelcase", "alphabetical", "sort these", "bullet points",
        "numbered list", "one sentence", "one word", "one line", "in a sentence", "briefly",
        "joke", "jokes", "haiku", "rhyme", "name for", "sentiment", "positive or negative",
        "classify", "extract", "summarise in", "summarize in", "concise", "concisely",
        "be brief", "keep answers short", "fun fact", "odd one out", "pronounce",
    ),
}
# fmt: on
_PHRASE_GROUPS: dict[str, tuple[str, ...]] = {}
"""Phrase -> the groups it is a cue of."""
_PREFIXES: set[str] = set()
"""Every phrase and every leading run of its words: where matching goes on."""
for _group, _phrases in _CUES.items():
    for _phrase in _phrases:
        _PHRASE_GROUPS[_phrase] = (*_PHRASE_GROUPS.get(_phrase, ()), _group)
        _words = _phrase.split(" ")
        _PREFIXES.update(" ".join(_words[:n]) for n in range(1, len(_words) + 1))

_MAX_PHRASE_WORDS = max(len(p.split(" ")) for p in _PHRASE_GROUPS)
_TOKEN = re.compile(r"[a-z0-9+#]+(?:['/-][a-z0-9+#]+)*")
_WHAT_DOES_MEAN = re.compile(r"\bwhat does\b[^.?!\n]{1,40}?\b(?:mean|stand for)\b")
_WORD_COUNT = re.compile(r"\b\d[\d,]*[- ]words?\b")
_CODE_FENCE = re.compile(r"```|^(?: {4}|\t)\S", re.MULTILINE)
_CODE_LINE_STARTS = (
    "def ",
    "class ",
    "import ",
    "from ",
    "#include",
    "function ",
    "return ",
    "const ",
    "let ",
    "var ",
    "select ",
    "public ",
    "fn ",
    "func ",
    "for (",
    "if (",
    "while (",
)
_CODE_LINE_ENDS = ("{", "}", ";", "):")
_MATH_SYNTAX = re.compile(
    r"\d\s*[*/^]\s*\(?[\dx]|[a-z]\^\d|\d[a-z]\b|\b[a-z] ?= ?-?\d|\d!|sqrt|\bln\(|\be\^|"
    r"\b(?:sin|cos|tan)\b"
)
_NUMBER = re.compile(r"(?<![\w.])\$?\d[\d,]*(?:\.\d+)?%?")


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


def _window(text: str) -> str:
    """The part of ``text`` cues are read from, lowercased."""
    if len(text) <= _SCAN_HEAD_CHARS + _SCAN_TAIL_CHARS:
        return text.lower()
    return (text[:_SCAN_HEAD_CHARS] + "\n" + text[-_SCAN_TAIL_CHARS:]).lower()


def _cue_counts(text: str) -> dict[str, int]:
    """Cue phrases of each group in ``text`` (lowercase); within a group,
    overlapping phrases count once, the longest."""
    tokens = _TOKEN.findall(text)
    counts: dict[str, int] = {}
    free_from: dict[str, int] = {}
    size = len(tokens)
    for i, token in enumerate(tokens):
        if token not in _PREFIXES:
            continue
        phrase = token
        matches: list[tuple[int, tuple[str, ...]]] = []
        for n in range(1, min(_MAX_PHRASE_WORDS, size - i) + 1):
            if n > 1:
                phrase = f"{phrase} {tokens[i + n - 1]}"
                if phrase not in _PREFIXES:
                    break
            groups = _PHRASE_GROUPS.get(phrase)
            if groups is not None:
                matches.append((n, groups))
        for n, groups in reversed(matches):  # the longest first
            for group in groups:
                if free_from.get(group, 0) <= i:
                    counts[group] = counts.get(group, 0) + 1
                    free_from[group] = i + n
    return counts


def _code_lines(text: str) -> int:
    """Lines of ``text`` (lowercase) that look like code."""
    count = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and (
            stripped.startswith(_CODE_LINE_STARTS)
            or stripped.endswith(_CODE_LINE_ENDS)
            or "=>" in stripped
            or "();" in stripped
        ):
            count += 1
    return count


def extract_features(body: Mapping[str, Any], kind: str, config: ClassifierConfig) -> Features:
    """The features of one request body (``kind`` is ``chat`` or ``text``)."""
    texts = _texts(body, kind)
    task = _window(texts.task)
    everything = task if texts.everything == texts.task else _window(texts.everything)
    cues = _cue_counts(task)
    system_cues = _cue_counts(_window(texts.system)) if texts.system else {}
    prompt_tokens = len(texts.everything) // _CHARS_PER_TOKEN + 1

    code = _capped(
        1.0 if _CODE_FENCE.search(everything) else 0.0,
        0.4 * _code_lines(everything),
        0.5 * cues.get("code", 0),
    )
    numbers = len(_NUMBER.findall(task))
    maths = _capped(
        0.5 * cues.get("math", 0),
        0.5 if _MATH_SYNTAX.search(task) else 0.0,
        0.5 if numbers >= 2 and cues.get("quantity") else 0.0,
        0.5 if numbers >= 3 and "?" in task else 0.0,
    )
    simple = cues.get("simple", 0) + (1 if _WHAT_DOES_MEAN.search(task) else 0)
    tools = body.get("tools") or body.get("functions")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    turns = max(0, texts.user_turns - 1) / max(1, config.many_turns - 1)
    values = {
        "prompt_tokens": _log_scale(prompt_tokens, _SHORT_PROMPT_TOKENS, config.long_prompt_tokens),
        "turns": min(1.0, turns),
        "code": code,
        "math": maths,
        "reasoning": _capped(0.5 * cues.get("reasoning", 0)),
        "long_answer": _capped(
            0.5 * cues.get("long_answer", 0), 0.5 * len(_WORD_COUNT.findall(task))
        ),
        "tools": 1.0 if tools else 0.0,
        "max_tokens": min(1.0, max_tokens / config.long_output_tokens)
        if isinstance(max_tokens, int)
        else 0.0,
        "system_hint": _capped(0.5 * system_cues.get("system_hint", 0)),
        "simple_task": _capped(0.5 * simple, 0.25 * system_cues.get("simple", 0)),
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
