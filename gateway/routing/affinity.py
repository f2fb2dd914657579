"""The key that ties a request to a replica: its session, or its prompt's prefix."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from gateway.policy.compiled import BalancerConfig

SESSION_HEADER = "x-session-id"
"""A client's session id: sticky canary version and replica affinity."""
MAX_SESSION_ID_CHARS = 256


def session_id_of(value: str | None) -> str | None:
    """A usable session id from the header value (None when absent or empty);
    a longer one is cut, not refused: it only steers routing."""
    if not value:
        return None
    value = value.strip()
    return value[:MAX_SESSION_ID_CHARS] or None


def prompt_prefix(body: Mapping[str, Any], kind: str, limit: int) -> str:
    """The first ``limit`` characters of the prompt as the backend will see it
    in order: each chat message's role and text, or the completion prompt."""
    if kind != "chat":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else str(prompt[:limit])
        return prompt[:limit] if isinstance(prompt, str) else ""
    parts: list[str] = []
    size = 0
    for message in body.get("messages") or ():
        if size >= limit:
            break
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            content = "".join(t for t in texts if isinstance(t, str))
        text = f"{message.get('role')}\x1f{content if isinstance(content, str) else ''}\x1e"
        parts.append(text)
        size += len(text)
    return "".join(parts)[:limit]


def affinity_key(
    config: BalancerConfig, session_id: str | None, body: Mapping[str, Any], kind: str
) -> str | None:
    """The request's affinity key under ``config``, or None for no affinity."""
    if config.affinity == "none":
        return None
    if session_id is not None:
        return "s:" + session_id
    if config.affinity == "session":
        return None
    prefix = prompt_prefix(body, kind, config.prefix_chars)
    digest = hashlib.blake2b(prefix.encode("utf-8", "surrogatepass"), digest_size=12)
    return "p:" + digest.hexdigest()
