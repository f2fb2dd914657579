"""deploy/grafana/tollgate-dashboard.json: well-formed, parameterised by data
source, tenant and model, and reading only metrics that the gateway and the
backend really export (names scraped from a running gateway's /metrics and
rendered by the backend's own metric registry)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import StartGateway, gateway_env
from tests.deploy.support import (
    DEPLOY,
    dashboard_panels,
    metric_families,
    promql_metric_names,
    sample_names,
    template_metric_names,
)
from tests.support.processes import FakeUpstreamProcess

DASHBOARD = DEPLOY / "grafana/tollgate-dashboard.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def used_metric_names(dashboard: dict[str, Any]) -> set[str]:
    names = set()
    for _, expr in queries(dashboard):
        names |= promql_metric_names(expr)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            names |= template_metric_names(query if isinstance(query, str) else query["query"])
    return names


def backend_exposition() -> str:
    """What the backend's /metrics serves, from its own registry (no model needed)."""
    from backend.scheduler.stats import SchedulerStats
    from backend.serving.metrics import EngineMetrics

    zero = {f.name: 0 for f in dataclasses.fields(SchedulerStats)}
    return EngineMetrics("smollm2", lambda: SchedulerStats(**zero)).render().decode()


def gateway_exposition(
    start_gateway: StartGateway,
    policy_dirs: tuple[Path, Path],
    fake_upstream: FakeUpstreamProcess,
    mint: Callable[..., str],
) -> str:
    """A real gateway's /metrics after one request went through it."""
    gateway = start_gateway(gateway_env(fake_upstream.url, *policy_dirs))
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {mint()}"},
        json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    scrape = httpx.get(f"{gateway.url}/metrics", timeout=10)
    assert scrape.status_code == 200
    return scrape.text


# --- the PromQL reader itself ---------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.99, sum by (le, priority) "
            '(rate(tollgate_queue_wait_seconds_bucket{pool=~"$pool"}[$__rate_interval])))',
            {"tollgate_queue_wait_seconds_bucket"},
        ),
        (
            'sum(rate(vllm:prefix_cache_hits_total{job=~"$j"}[5m])) '
            "/ clamp_min(sum(rate(vllm:prefix_cache_queries_total[5m])), 1e-9)",
            {"vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"},
        ),
        (
            "time() - min(tollgate_policy_last_reload_timestamp_seconds)",
            {"tollgate_policy_last_reload_timestamp_seconds"},
        ),
        ('a_total{x="{y}"} and on (instance) b offset 5m > bool 2e3', {"a_total", "b"}),
        (
            "sum without (le) (vllm:e2e_request_latency_seconds_count)",
            {"vllm:e2e_request_latency_seconds_count"},
        ),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_suffix_rules_follow_the_metric_type() -> None:
    families = metric_families(
        "# TYPE c counter\n# TYPE old_total counter\n# TYPE h histogram\n# TYPE g gauge\n"
    )
    names = sample_names(families)
    assert {"c_total", "old_total", "h_bucket", "h_sum", "h_count", "g"} <= names
    assert "g_total" not in names and "c_bucket" not in names and "g_bucket" not in names


# --- the dashboard -------------------------------------------------------------------


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for name in ("tenant", "model"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), panel["title"]


def test_dashboard_panels_cover_the_service(dashboard: dict[str, Any]) -> None:
    metrics_by_title: dict[str, set[str]] = {}
    for title, expr in queries(dashboard):
        metrics_by_title.setdefault(title, set()).update(promql_metric_names(expr))
    used = set().union(*metrics_by_title.values())
    for needed in (
        "tollgate_requests_total",
        "tollgate_time_to_first_token_seconds_bucket",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_gateway_overhead_seconds_bucket",
        "tollgate_queue_wait_seconds_bucket",
        "tollgate_queue_depth",
        "tollgate_tokens_total",
        "tollgate_quota_denials_total",
        "tollgate_replica_healthy",
        "tollgate_policy_reloads_total",
        "tollgate_quota_store_up",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert needed in used, f"no panel reads {needed}"
    by_status = [e for _, e in queries(dashboard) if "tollgate_requests_total" in e]
    assert any("by (status)" in e for e in by_status)
    assert any(
        "by (tenant, kind)" in e for _, e in queries(dashboard) if "tollgate_tokens_total" in e
    )
    tenant_filtered = [e for _, e in queries(dashboard) if 'tenant=~"$tenant"' in e]
    model_filtered = [e for _, e in queries(dashboard) if 'model=~"$model"' in e]
    assert tenant_filtered and model_filtered


def test_backend_metrics_on_the_dashboard_are_exported(dashboard: dict[str, Any]) -> None:
    exported = sample_names(metric_families(backend_exposition()))
    used = {n for n in used_metric_names(dashboard) if ":" in n}
    assert used, "the dashboard has backend panels"
    assert not used - exported, f"not exported by the backend: {sorted(used - exported)}"


def test_every_dashboard_metric_is_exported(
    dashboard: dict[str, Any],
    start_gateway: StartGateway,
    policy_dirs: tuple[Path, Path],
    fake_upstream: FakeUpstreamProcess,
    mint: Callable[..., str],
) -> None:
    gateway = metric_families(gateway_exposition(start_gateway, policy_dirs, fake_upstream, mint))
    assert "tollgate_replica_healthy" in gateway
    exported = sample_names(gateway) | sample_names(metric_families(backend_exposition()))
    missing = sorted(used_metric_names(dashboard) - exported)
    assert not missing, f"the dashboard reads metrics nobody exports: {missing}"
