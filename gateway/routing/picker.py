"""Replica choice within a pool: pure functions of a snapshot.

Every picker takes the replicas that may serve the request (healthy, not
drained, serving the chosen version) as ``ReplicaView`` values and returns
them in the order to try them: the choice first, then the fallbacks for a
retry (connect errors, 5xx before the first byte).

- ``round_robin``: in turn.
- ``least_load``: fewest tokens of work per unit of weight, where a
  replica's tokens are its backend's queued prompt tokens plus active decode
  tokens, plus what the gateway sent it since that reading (or, for backends
  that publish no token figures, the gateway's own in-flight estimates).
  Replicas at their ``max_in_flight`` go last; ties go in turn.
- ``prefix_affinity``: rendezvous (highest random weight) hashing of a key
  (the session id, or a hash of the prompt's first characters) picks a
  preferred replica, so requests that share a prefix find its KV cache; when
  that replica is loaded above ``load_factor`` times the average and more
  than ``load_slack_tokens`` above the least loaded one, least load decides
  instead.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.policy.compiled import BalancerConfig, Replica

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """What a picker knows about one replica at one moment."""

    replica: Replica
    load_tokens: float
    """Tokens of work queued and decoding on it (best estimate)."""
    in_flight: int = 0
    """Requests the gateway has in flight on it."""

    @property
    def url(self) -> str:
        """The replica's URL."""
        return self.replica.url

    @property
    def weight(self) -> float:
        """Its relative capacity (above 0 for a view a picker gets)."""
        return self.replica.weight

    @property
    def full(self) -> bool:
        """Whether it has its ``max_in_flight`` requests from this gateway."""
        return self.in_flight >= self.replica.max_in_flight

    @property
    def relative_load(self) -> float:
        """Load per unit of weight: what least load compares."""
        return self.load_tokens / self.weight


def round_robin(replicas: Sequence[R], turn: int) -> list[R]:
    """The replicas in the order to try them on this `turn`: the chosen one
    first, then the others as fallbacks."""
    if not replicas:
        return []
    start = turn % len(replicas)
    return [*replicas[start:], *replicas[:start]]


def least_load(views: Sequence[ReplicaView], turn: int = 0) -> list[Replica]:
    """Least relative load first; full replicas last; ties in turn."""
    n = len(views)
    keys = [(v.full, v.relative_load, (i - turn) % n, i) for i, v in enumerate(views)]
    keys.sort()
    return [views[k[3]].replica for k in keys]


_MASK = 2**64 - 1


@functools.lru_cache(maxsize=4096)
def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _mix(value: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value from any 64-bit value."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def rendezvous_order(key: str, urls: Sequence[str], weights: Sequence[float]) -> list[int]:
    """Indexes of ``urls`` by weighted rendezvous score for ``key``, highest
    first: every gateway process agrees, and removing a replica moves only
    the keys that preferred it."""
    key_hash = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    scores = []
    for i, (url, weight) in enumerate(zip(urls, weights, strict=True)):
        # A uniform draw in (0, 1) per (key, replica); -w / ln(u) is the
        # weighted rendezvous score.
        u = (_mix(key_hash ^ _hash64(url)) + 1) / (2**64 + 1)
        scores.append((-weight / math.log(u), i))
    scores.sort(reverse=True)
    return [i for _, i in scores]


def within_bound(
    views: Sequence[ReplicaView], index: int, load_factor: float, slack_tokens: float
) -> bool:
    """Whether replica ``index`` may take an affine request: not full, and
    not both above ``load_factor`` times the average relative load and more
    than ``slack_tokens`` above the least loaded replica."""
    view = views[index]
    if view.full:
        return False
    loads = [v.relative_load for v in views]
    average = sum(loads) / len(loads)
    mine = view.relative_load
    return mine <= load_factor * average or mine - min(loads) <= slack_tokens


def prefix_affinity(
    views: Sequence[ReplicaView],
    key: str,
    *,
    load_factor: float,
    slack_tokens: float,
    turn: int = 0,
) -> list[Replica]:
    """The preferred replica for ``key`` first when within the load bound,
    else least load; the rest by least load."""
    if not views:
        return []
    order = rendezvous_order(key, [v.url for v in views], [v.weight for v in views])
    preferred = order[0]
    rest = least_load(views, turn)
    if not within_bound(views, preferred, load_factor, slack_tokens):
        return rest
    chosen = views[preferred].replica
    return [chosen, *(r for r in rest if r is not chosen)]


def pick(
    views: Sequence[ReplicaView], config: BalancerConfig, key: str | None, turn: int
) -> list[Replica]:
    """The order to try ``views`` in under ``config``; ``key`` is the
    affinity key (None: no affinity for this request)."""
    if key is not None and config.affinity != "none":
        return prefix_affinity(
            views,
            key,
            load_factor=config.load_factor,
            slack_tokens=config.load_slack_tokens,
            turn=turn,
        )
    if config.strategy == "round_robin":
        return [v.replica for v in round_robin(views, turn)]
    return least_load(views, turn)


class TurnCounter:
    """A per-pool counter: round robin's state, and least load's tie-breaker."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def next(self, pool: str) -> int:
        """The next turn for `pool`."""
        counter = self._counters.get(pool)
        if counter is None:
            counter = self._counters[pool] = itertools.count()
        return next(counter)
