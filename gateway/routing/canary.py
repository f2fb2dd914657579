"""Which version of a model serves a request: a weighted split, sticky per key."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from gateway.policy.compiled import ModelVersion


def unit_hash(key: str) -> float:
    """A stable draw in [0, 1) from ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_version(versions: Sequence[ModelVersion], model: str, key: str) -> ModelVersion:
    """The version for ``key`` (a session id, else the request id) among
    ``versions`` in proportion to their weights. The same key always gets the
    same version while the weights stay; raising a canary's weight moves only
    keys towards it (the split is cumulative in the listed order)."""
    if len(versions) == 1:
        return versions[0]
    total = sum(v.weight for v in versions)
    point = unit_hash(f"{model}\x00{key}") * total
    running = 0.0
    for version in versions:
        running += version.weight
        if point < running:
            return version
    return next(v for v in reversed(versions) if v.weight > 0)
