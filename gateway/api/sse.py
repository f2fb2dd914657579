"""Server-sent-event framing for passthrough streams.

The backend's bytes are forwarded event by event, unchanged; the framer only
finds event boundaries so the gateway can read the usage event (and hide it
from a client that did not ask for it) without re-encoding anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode
# Just the key: servers differ on whitespace after the colon (`"usage": {`).
_USAGE_MARK = b'"usage"'


@dataclass
class StreamUsage:
    """Token counts read from a stream's usage event."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    seen: bool = False


@dataclass
class SseFramer:
    """Splits a byte stream into whole events (each ending in a blank line)."""

    _buffer: bytes = b""
    usage: StreamUsage = field(default_factory=StreamUsage)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Return the complete events in `chunk` plus what was buffered."""
        data = self._buffer + chunk
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        *events, self._buffer = data.split(b"\n\n")
        return [e + b"\n\n" for e in events]

    def rest(self) -> bytes:
        """Whatever trailed the last complete event."""
        rest, self._buffer = self._buffer, b""
        return rest

    def is_usage_only(self, event: bytes) -> bool:
        """True for the final usage event (no choices); records its counts."""
        if _USAGE_MARK not in event:
            return False
        payload = _parse_data(event)
        if payload is None:
            return False
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.usage = usage_from(usage)
        choices = payload.get("choices")
        return not choices


def usage_from(usage: dict[str, Any]) -> StreamUsage:
    """Read OpenAI's `usage` object."""
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return StreamUsage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(cached or 0),
        seen=True,
    )


def _parse_data(event: bytes) -> dict[str, Any] | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                payload = _decode(line[5:].strip())
            except msgspec.DecodeError:
                return None
            return payload if isinstance(payload, dict) else None
    return None
