"""Replica choice within a pool.

Round robin for now, as a pure function of a counter and the replica list;
token-aware balancing replaces it behind the same signature.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TypeVar

R = TypeVar("R")


def round_robin(replicas: Sequence[R], turn: int) -> list[R]:
    """The replicas in the order to try them on this `turn`: the chosen one
    first, then the others as fallbacks for connect errors."""
    if not replicas:
        return []
    start = turn % len(replicas)
    return [*replicas[start:], *replicas[:start]]


class TurnCounter:
    """A per-pool counter; the only state round robin needs."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def next(self, pool: str) -> int:
        """The next turn for `pool`."""
        counter = self._counters.get(pool)
        if counter is None:
            counter = self._counters[pool] = itertools.count()
        return next(counter)
