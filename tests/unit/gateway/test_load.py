"""Reading replica load per pool kind, from payloads in each kind's format."""

from __future__ import annotations

import json

import pytest

from gateway.upstream.load import LoadFormatError, ReplicaLoad, parse_load

TOLLGATE_STATS = {
    "num_running": 3,
    "num_waiting": 2,
    "queued_prompt_tokens": 900,
    "active_decode_tokens": 412,
    "kv_usage": 0.25,
    "num_free_blocks": 96,
    "num_total_blocks": 128,
    "prefix_cache_queries": 10,
    "prefix_cache_hits": 4,
    "num_preemptions_total": 0,
    "max_num_seqs": 32,
    "max_waiting": 256,
    "max_model_len": 2048,
}

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 5.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="llama"} 12345.0
"""

OLD_VLLM_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.75
"""

TRTLLM_METRICS = """\
# HELP tensorrt_llm:num_requests_running Number of requests currently running on GPU.
# TYPE tensorrt_llm:num_requests_running gauge
tensorrt_llm:num_requests_running{model_name="llama",engine_type="trtllm"} 4.0
# HELP tensorrt_llm:num_requests_waiting Number of requests waiting to be processed.
# TYPE tensorrt_llm:num_requests_waiting gauge
tensorrt_llm:num_requests_waiting{model_name="llama",engine_type="trtllm"} 0.0
# HELP trtllm_request_success_total Count of successfully processed requests.
# TYPE trtllm_request_success_total counter
trtllm_request_success_total{model_name="llama",finished_reason="stop"} 17.0
"""


def test_tollgate_stats_give_token_level_load() -> None:
    load = parse_load("tollgate", json.dumps(TOLLGATE_STATS).encode())
    assert load == ReplicaLoad(
        running=3,
        waiting=2,
        queued_prompt_tokens=900,
        active_decode_tokens=412,
        kv_usage=0.25,
        max_running=32,
    )


def test_vllm_metrics_sum_engines_and_average_kv_usage() -> None:
    load = parse_load("vllm", VLLM_METRICS.encode())
    assert load.running == 7
    assert load.waiting == 7
    assert load.kv_usage == pytest.approx(0.375)
    assert load.queued_prompt_tokens is None and load.active_decode_tokens is None


def test_older_vllm_names_are_read() -> None:
    load = parse_load("vllm", OLD_VLLM_METRICS.encode())
    assert (load.running, load.waiting, load.kv_usage) == (1, None, 0.75)


def test_trtllm_metrics() -> None:
    load = parse_load("trtllm", TRTLLM_METRICS.encode())
    assert (load.running, load.waiting, load.kv_usage) == (4, 0, None)


def test_a_kind_without_load_reads_as_unknown_not_idle() -> None:
    assert parse_load("openai", b"anything") == ReplicaLoad()
    assert parse_load("vllm", b"# nothing here\n") == ReplicaLoad()


@pytest.mark.parametrize(
    ("kind", "body"),
    [("tollgate", b"not json"), ("tollgate", b"[1, 2]"), ("vllm", b"vllm:x{ 1 2 3")],
)
def test_malformed_payloads_are_format_errors(kind: str, body: bytes) -> None:
    with pytest.raises(LoadFormatError):
        parse_load(kind, body)  # type: ignore[arg-type]
