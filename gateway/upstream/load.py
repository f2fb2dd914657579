"""How loaded a replica is, read the way its kind publishes it.

The pool kinds differ only here:

- ``tollgate``: the built-in backend's ``GET /stats`` (JSON), which has the
  token-level figures a token-aware balancer needs;
- ``vllm``: its Prometheus ``GET /metrics``;
- ``trtllm``: ``trtllm-serve``'s Prometheus ``GET /prometheus/metrics``;
- ``openai``: any compatible endpoint; it publishes no load, so the gateway
  relies on its own in-flight counts.

Metric names have moved between releases of both engines, so each figure is
looked up under every name it is known by; a figure no name yields stays
``None`` (unknown) rather than 0, so a balancer never mistakes "not
published" for "idle".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from gateway.policy.compiled import PoolKind


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One reading of a replica's load; ``None`` where the kind does not say."""

    running: int | None = None
    """Requests being decoded."""
    waiting: int | None = None
    """Requests queued inside the backend."""
    queued_prompt_tokens: int | None = None
    """Prompt tokens not yet prefilled."""
    active_decode_tokens: int | None = None
    """Upper bound on tokens the running requests may still generate."""
    kv_usage: float | None = None
    """Fraction of the KV cache in use, 0..1."""
    max_running: int | None = None
    """Most requests the backend runs at once."""


LOAD_PATHS: dict[PoolKind, str | None] = {
    "tollgate": "/stats",
    "vllm": "/metrics",
    "trtllm": "/prometheus/metrics",
    "openai": None,
}

# Known names per figure, newest first. vLLM renamed gpu_cache_usage_perc to
# kv_cache_usage_perc; trtllm-serve has used both a "tensorrt_llm:" and a
# "trtllm_" prefix.
_RUNNING = (
    "vllm:num_requests_running",
    "tensorrt_llm:num_requests_running",
    "trtllm:num_requests_running",
    "trtllm_num_requests_running",
)
_WAITING = (
    "vllm:num_requests_waiting",
    "tensorrt_llm:num_requests_waiting",
    "trtllm:num_requests_waiting",
    "trtllm_num_requests_waiting",
)
_KV_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "tensorrt_llm:kv_cache_usage_perc",
    "tensorrt_llm:gpu_cache_usage_perc",
    "trtllm:kv_cache_utilization",
    "trtllm_kv_cache_utilization",
)


class LoadFormatError(ValueError):
    """A load payload that cannot be read as its kind's format."""


def parse_tollgate_stats(body: bytes) -> ReplicaLoad:
    """Read the built-in backend's ``/stats`` JSON."""
    try:
        data: Any = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise LoadFormatError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadFormatError("stats must be a JSON object")

    def count(name: str) -> int | None:
        value = data.get(name)
        return int(value) if isinstance(value, int | float) else None

    kv = data.get("kv_usage")
    return ReplicaLoad(
        running=count("num_running"),
        waiting=count("num_waiting"),
        queued_prompt_tokens=count("queued_prompt_tokens"),
        active_decode_tokens=count("active_decode_tokens"),
        kv_usage=float(kv) if isinstance(kv, int | float) else None,
        max_running=count("max_num_seqs"),
    )


def parse_prometheus(text: str) -> ReplicaLoad:
    """Read vLLM's or trtllm-serve's Prometheus exposition. Series with
    several label sets (one per model, say) are summed; ratios averaged."""
    sums: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                sums.setdefault(sample.name, []).append(float(sample.value))
    except ValueError as exc:
        raise LoadFormatError(f"not Prometheus text: {exc}") from exc

    def first(names: tuple[str, ...]) -> list[float] | None:
        for name in names:
            # prometheus_client reports metric names with ':' unchanged.
            if name in sums:
                return sums[name]
        return None

    running, waiting, kv = first(_RUNNING), first(_WAITING), first(_KV_USAGE)
    return ReplicaLoad(
        running=int(sum(running)) if running is not None else None,
        waiting=int(sum(waiting)) if waiting is not None else None,
        kv_usage=sum(kv) / len(kv) if kv else None,
    )


def parse_load(kind: PoolKind, body: bytes) -> ReplicaLoad:
    """Read a load payload of `kind`."""
    if kind == "tollgate":
        return parse_tollgate_stats(body)
    if kind in ("vllm", "trtllm"):
        return parse_prometheus(body.decode("utf-8", errors="replace"))
    return ReplicaLoad()


async def read_load(
    client: httpx.AsyncClient, kind: PoolKind, base_url: str, timeout_s: float
) -> ReplicaLoad:
    """Fetch and read one replica's load; an ``openai`` replica reads as
    unknown without a request. Errors raise ``httpx.HTTPError`` or
    ``LoadFormatError``."""
    path = LOAD_PATHS[kind]
    if path is None:
        return ReplicaLoad()
    response = await client.get(base_url.rstrip("/") + path, timeout=timeout_s)
    response.raise_for_status()
    return parse_load(kind, response.content)
