"""What the engine core reports per request after each step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class RequestUpdate:
    """New tokens for one request, and whether it is done.

    When generation ends on a stop token id, that token is the last item of
    `new_token_ids` (it counts as a generated token, as in the usage numbers)
    and is repeated in `stop_token_id` so the caller leaves it out of the text;
    `printable_token_ids` does that.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    """Prompt tokens served from the prefix cache at first admission (0 if never admitted)."""
    stop_token_id: int | None = None
    """The stop token id that ended the request, if one did."""

    @property
    def printable_token_ids(self) -> list[int]:
        """`new_token_ids` without the stop token that ended the request."""
        if self.stop_token_id is None:
            return self.new_token_ids
        return self.new_token_ids[:-1]
