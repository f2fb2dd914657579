"""GatewayMetrics and RequestObserver without a server: what one request
records, exactly once, under bounded labels; and the rendered exposition."""

from __future__ import annotations

import pytest

from gateway.api.sse import StreamUsage
from gateway.observe.metrics import GatewayMetrics, Histogram, render
from gateway.observe.request import RequestObserver
from gateway.observe.state import StateSnapshot
from gateway.observe.tracing import NO_TRACING
from gateway.policy.compiled import Policy
from gateway.queueing.registry import PoolQueues
from gateway.upstream.health import ReplicaBook
from tests.support.prometheus import Scrape, parse

EMPTY = StateSnapshot((), (), 0, 0, True, None, True, 0)


def observer(metrics: GatewayMetrics) -> RequestObserver:
    trace = NO_TRACING.request("rid", "POST", "/v1/chat/completions", {})
    return RequestObserver(metrics, trace, started=0.0)


def rendered(metrics: GatewayMetrics, state: StateSnapshot = EMPTY) -> Scrape:
    return parse(render(metrics.freeze(), state).decode())


def test_a_full_request_records_every_family_once(policy: Policy) -> None:
    metrics = GatewayMetrics()
    obs = observer(metrics)
    obs.identify("acme")
    obs.model(policy, "smollm2")
    obs.queued("local", "standard", 0.0)
    obs.sent(0.0004)
    obs.first_byte()
    obs.first_byte()  # only the first counts
    obs.usage(StreamUsage(prompt_tokens=10, completion_tokens=3, cached_tokens=4, seen=True))
    obs.finish(200)
    obs.finish(500)  # already finished: nothing
    m = rendered(metrics)
    labels = {"tenant": "acme", "model": "smollm2"}
    assert m.get("tollgate_requests_total", status="200", **labels) == 1
    assert m.value("tollgate_requests_total", status="500", **labels) is None
    assert m.get("tollgate_request_duration_seconds_count", **labels) == 1
    assert m.get("tollgate_time_to_first_token_seconds_count", **labels) == 1
    assert m.get("tollgate_gateway_overhead_seconds_count", model="smollm2") == 1
    assert m.get("tollgate_gateway_overhead_seconds_bucket", model="smollm2", le="0.0005") == 1
    assert m.get("tollgate_gateway_overhead_seconds_bucket", model="smollm2", le="0.00025") == 0
    assert m.get("tollgate_queue_wait_seconds_count", pool="local", priority="standard") == 1
    assert m.get("tollgate_tokens_total", kind="prompt", **labels) == 10
    assert m.get("tollgate_tokens_total", kind="completion", **labels) == 3
    assert m.get("tollgate_tokens_total", kind="cached", **labels) == 4
    assert m.get("tollgate_in_flight_requests", model="smollm2") == 0


def test_in_flight_counts_from_the_model_until_finish(policy: Policy) -> None:
    metrics = GatewayMetrics()
    first, second = observer(metrics), observer(metrics)
    for obs in (first, second):
        obs.identify("acme")
        obs.model(policy, "smollm2")
    assert rendered(metrics).get("tollgate_in_flight_requests", model="smollm2") == 2
    first.finish(200)
    assert rendered(metrics).get("tollgate_in_flight_requests", model="smollm2") == 1
    second.finish(499)
    assert rendered(metrics).get("tollgate_in_flight_requests", model="smollm2") == 0


def test_an_early_refusal_is_unknown_and_other(policy: Policy) -> None:
    metrics = GatewayMetrics()
    observer(metrics).finish(401)
    named = observer(metrics)
    named.identify("acme")
    named.model(policy, "gpt-4o")  # not in the policy
    named.finish(404)
    m = rendered(metrics)
    assert m.get("tollgate_requests_total", tenant="unknown", model="other", status="401") == 1
    assert m.get("tollgate_requests_total", tenant="acme", model="other", status="404") == 1
    assert not m.matching("tollgate_in_flight_requests", model="gpt-4o")


def test_unreported_usage_counts_no_tokens(policy: Policy) -> None:
    metrics = GatewayMetrics()
    obs = observer(metrics)
    obs.identify("acme")
    obs.model(policy, "smollm2")
    obs.usage(StreamUsage())
    obs.finish(200)
    assert sum(rendered(metrics).matching("tollgate_tokens_total").values()) == 0


def test_series_are_cached_per_label_set() -> None:
    metrics = GatewayMetrics()
    series = metrics.series("acme", "smollm2")
    assert metrics.series("acme", "smollm2") is series
    assert metrics.series("globex", "smollm2").per_model is series.per_model
    assert metrics.series("acme", "other").per_model is not series.per_model


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    metrics = GatewayMetrics()
    for wait in (0.0, 0.001, 0.0011, 600.0, 601.0):
        metrics.queue_waited("local", "batch", wait)
    m = rendered(metrics)
    labels = {"pool": "local", "priority": "batch"}
    assert m.get("tollgate_queue_wait_seconds_bucket", le="0.001", **labels) == 2
    assert m.get("tollgate_queue_wait_seconds_bucket", le="0.005", **labels) == 3
    assert m.get("tollgate_queue_wait_seconds_bucket", le="600.0", **labels) == 4
    assert m.get("tollgate_queue_wait_seconds_bucket", le="+Inf", **labels) == 5
    assert m.get("tollgate_queue_wait_seconds_count", **labels) == 5
    assert m.get("tollgate_queue_wait_seconds_sum", **labels) == pytest.approx(1201.0021)
    h = Histogram((1.0, 2.0))
    h.observe(1.0)
    h.observe(3.0)
    assert h.counts == [1, 0, 1] and h.total == 4.0


def test_a_frozen_snapshot_does_not_move(policy: Policy) -> None:
    metrics = GatewayMetrics()
    observer(metrics).finish(200)
    frozen = metrics.freeze()
    observer(metrics).finish(200)
    m = parse(render(frozen, EMPTY).decode())
    assert m.get("tollgate_requests_total", tenant="unknown", model="other", status="200") == 1


def test_denials_and_upstream_errors() -> None:
    metrics = GatewayMetrics()
    metrics.quota_denied("acme", "tokens_per_minute")
    metrics.quota_denied("acme", "tokens_per_minute")
    metrics.upstream_error("local", "connect")
    m = rendered(metrics)
    assert m.get("tollgate_quota_denials_total", tenant="acme", reason="tokens_per_minute") == 2
    assert m.get("tollgate_upstream_errors_total", pool="local", kind="connect") == 1


def test_two_gateways_in_one_process_never_share_a_series(policy: Policy) -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    obs = observer(one)
    obs.finish(200)
    labels = {"tenant": "unknown", "model": "other", "status": "200"}
    assert rendered(one).get("tollgate_requests_total", **labels) == 1
    assert not rendered(two).matching("tollgate_requests_total")


def test_the_state_families_come_from_the_snapshot(policy: Policy) -> None:
    book = ReplicaBook(policy)
    queues = PoolQueues(policy)
    state = StateSnapshot(
        replicas=book.status(),
        queues=queues.stats(),
        reloads_ok=3,
        reloads_failed=1,
        last_reload_ok=False,
        last_reload_at=1_750_000_000.0,
        store_up=False,
        breaker_trips=2,
    )
    m = rendered(GatewayMetrics(), state)
    url = policy.pools["local"].replicas[0].url
    assert m.get("tollgate_replica_healthy", pool="local", replica=url) == 1
    assert m.types["tollgate_replica_requests"] == "counter"
    for cls in policy.priority_classes:
        assert m.value("tollgate_queue_depth", pool="local", priority=cls) == 0
        for reason in ("queue_full", "queue_timeout"):
            labels = {"pool": "local", "priority": cls, "reason": reason}
            assert m.value("tollgate_queue_rejections_total", **labels) == 0
    assert m.get("tollgate_policy_reloads_total", result="ok") == 3
    assert m.get("tollgate_policy_reloads_total", result="error") == 1
    assert m.get("tollgate_policy_last_reload_success") == 0
    assert m.get("tollgate_policy_last_reload_timestamp_seconds") == 1_750_000_000.0
    assert m.get("tollgate_quota_store_up") == 0
    assert m.get("tollgate_quota_store_breaker_trips_total") == 2


def test_no_created_samples_are_exposed(policy: Policy) -> None:
    metrics = GatewayMetrics()
    observer(metrics).finish(200)
    text = render(metrics.freeze(), EMPTY).decode()
    assert "_created" not in text


def test_every_family_is_typed(policy: Policy) -> None:
    metrics = GatewayMetrics()
    observer(metrics).finish(200)
    types = rendered(metrics).types
    for name in ("tollgate_requests", "tollgate_tokens", "tollgate_quota_denials"):
        assert types[name] == "counter"
    for name in ("tollgate_request_duration_seconds", "tollgate_gateway_overhead_seconds"):
        assert types[name] == "histogram"
    assert types["tollgate_in_flight_requests"] == "gauge"


def test_label_values_are_escaped_for_the_parser() -> None:
    metrics = GatewayMetrics()
    odd = 'a"b\\c\nd'
    metrics.series(odd, "smollm2").statuses[200] = 1
    metrics.upstream_error(odd, "stream")
    m = rendered(metrics)
    assert m.get("tollgate_requests_total", tenant=odd, model="smollm2", status="200") == 1
    assert m.get("tollgate_upstream_errors_total", pool=odd, kind="stream") == 1


def test_an_idle_process_still_describes_every_family() -> None:
    text = render(GatewayMetrics().freeze(), EMPTY).decode()
    for name in (
        "tollgate_requests_total",
        "tollgate_request_duration_seconds",
        "tollgate_time_to_first_token_seconds",
        "tollgate_queue_wait_seconds",
        "tollgate_gateway_overhead_seconds",
        "tollgate_tokens_total",
        "tollgate_quota_denials_total",
        "tollgate_upstream_errors_total",
        "tollgate_in_flight_requests",
    ):
        assert f"# TYPE {name} " in text
    parse(text)
