"""Replica health and load bookkeeping (gateway.upstream.health), with the
time passed in: ejection, backoff, restoration, and the load estimate."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.policy.compiled import (
    HealthConfig,
    ModelRoute,
    ModelVersion,
    Policy,
    Pool,
    Pricing,
    Replica,
    UpstreamTimeouts,
)
from gateway.upstream.health import ReplicaBook, ReplicaState
from gateway.upstream.load import ReplicaLoad

CONFIG = HealthConfig(
    failures_to_eject=3,
    successes_to_restore=2,
    ejection_base_s=2.0,
    ejection_max_s=10.0,
    load_interval_s=0.5,
)


def state(config: HealthConfig = CONFIG) -> ReplicaState:
    return ReplicaState("http://r:1", "p", "tollgate", config)


def test_ejected_after_n_consecutive_failures_only() -> None:
    s = state()
    s.record_failure(0.0, "boom")
    s.record_failure(0.1, "boom")
    s.record_success(0.2)  # a success in between resets the count
    s.record_failure(0.3, "boom")
    s.record_failure(0.4, "boom")
    assert s.routable(0.5)
    s.record_failure(0.5, "boom")
    assert s.status == "ejected" and not s.routable(0.6)
    assert s.ejected_until == pytest.approx(2.5)
    assert (s.num_failures, s.num_ejections, s.last_error) == (5, 1, "boom")


def test_requests_and_probes_count_apart() -> None:
    s = state()
    # Probes pass, requests fail: still ejected (answers /health, fails work).
    for t in (0.0, 0.1, 0.2):
        s.record_success(t, probe=True)
        s.record_failure(t + 0.05, "status 500")
    assert s.status == "ejected"
    # Failed probes alone eject too, whatever the requests do.
    s = state()
    for t in (0.0, 0.1, 0.2):
        s.record_success(t)
        s.record_failure(t + 0.05, "GET /ready: status 503", probe=True)
    assert s.status == "ejected"


def test_restored_after_m_probe_successes_once_the_ejection_time_passed() -> None:
    s = state()
    for t in (0.0, 0.1, 0.2):
        s.record_failure(t, "down")
    # Probes succeed during the ejection: counted, but it stays out until 2.2.
    s.record_success(1.0, probe=True)
    s.record_success(1.5, probe=True)
    assert not s.routable(2.0)
    s.record_success(2.3, probe=True)
    assert s.routable(2.3)


@pytest.mark.parametrize(
    ("events", "routable_at_end"),
    [
        # a failed probe resets the successes
        ([("ok", 2.3), ("fail", 2.4), ("ok", 2.5)], False),
        ([("ok", 2.3), ("fail", 2.4), ("ok", 2.5), ("ok", 2.6)], True),
        # request successes (not probes) do not restore
        ([("req", 2.3), ("req", 2.4), ("req", 2.5)], False),
    ],
)
def test_restoration_needs_consecutive_probe_successes(
    events: list[tuple[str, float]], routable_at_end: bool
) -> None:
    s = state()
    for t in (0.0, 0.1, 0.2):
        s.record_failure(t, "down")
    for kind, t in events:
        if kind == "fail":
            s.record_failure(t, "still down")
        else:
            s.record_success(t, probe=kind == "ok")
    assert s.routable(events[-1][1]) is routable_at_end


def test_ejections_in_a_row_back_off_exponentially_up_to_the_maximum() -> None:
    s = state()
    now = 0.0
    lengths = []
    for _ in range(5):
        for _ in range(3):
            s.record_failure(now, "flap")
        lengths.append(round(s.ejected_until - now, 6))
        now = s.ejected_until + 0.1
        s.record_success(now, probe=True)
        s.record_success(now, probe=True)
        assert s.routable(now)
    assert lengths == [2.0, 4.0, 8.0, 10.0, 10.0]
    # Healthy for longer than the maximum: the next ejection starts over.
    now += 11.0
    for _ in range(3):
        s.record_failure(now, "again")
    assert s.ejected_until - now == pytest.approx(2.0)


def test_without_probes_a_replica_returns_when_its_time_is_up() -> None:
    s = state(HealthConfig(liveness_path=None, readiness_path=None, failures_to_eject=1))
    s.record_failure(0.0, "x")
    assert not s.routable(1.0)
    assert s.routable(2.1)
    assert s.status == "healthy"


def test_load_estimate_is_the_backends_figure_plus_what_was_sent_since() -> None:
    s = state()
    early = s.begin(100, now=1.0)
    s.record_load(ReplicaLoad(queued_prompt_tokens=50, active_decode_tokens=250), started_at=2.0)
    assert s.load_tokens(2.1, stale_after_s=2.0) == 300  # the early request is in the reading
    late = s.begin(40, now=2.5)
    assert s.load_tokens(2.6, stale_after_s=2.0) == 340
    late.end()
    late.end()  # idempotent
    assert s.load_tokens(2.7, stale_after_s=2.0) == 300
    # A stale reading gives way to the gateway's own in-flight estimate.
    assert s.load_tokens(10.0, stale_after_s=2.0) == 100
    early.end()
    assert (s.in_flight, s.in_flight_tokens, s.tokens_since_load) == (0, 0, 0)


def test_a_new_reading_recounts_what_it_cannot_contain_yet() -> None:
    s = state()
    a = s.begin(10, now=1.0)
    b = s.begin(20, now=3.0)
    s.record_load(ReplicaLoad(queued_prompt_tokens=0, active_decode_tokens=10), started_at=2.0)
    assert s.tokens_since_load == 20
    a.end()
    b.end()
    assert s.tokens_since_load == 0


def test_backends_without_token_figures_use_the_in_flight_estimate() -> None:
    s = state()
    s.begin(70, now=1.0)
    s.record_load(ReplicaLoad(running=3, waiting=1), started_at=1.5)
    assert s.load_tokens(1.6, stale_after_s=2.0) == 70


def _policy(replicas: tuple[Replica, ...], health: HealthConfig = CONFIG) -> Policy:
    pool = Pool("p", "tollgate", replicas, UpstreamTimeouts(1, 1, 1, 1), health=health)
    return Policy(
        version="v",
        loaded_at=datetime.now(UTC),
        tenants={},
        models={"m": ModelRoute("m", "m-up", "small", 100, pool)},
        pools={"p": pool},
        priority_classes={},
        pricing=Pricing("USD", {}),
    )


def test_book_views_skip_ejected_drained_and_other_versions_replicas() -> None:
    replicas = (Replica("http://a", 1), Replica("http://b", 2), Replica("http://c", 0))
    policy = _policy(replicas)
    book = ReplicaBook(policy)
    pool = policy.pools["p"]
    assert [v.url for v in book.views(pool, now=0.0)] == ["http://a", "http://b"]
    state_a = book.get("http://a")
    assert state_a is not None and state_a.deep_probe_model == "m-up"
    for t in (0.0, 0.1, 0.2):
        state_a.record_failure(t, "x")
    assert [v.url for v in book.views(pool, now=0.3)] == ["http://b"]
    assert book.retry_after_s(pool, now=0.3) == pytest.approx(1.9)
    canary = ModelVersion("next", "m-next", 1, frozenset({"http://a"}))
    assert book.views(pool, canary, now=0.3) == []
    statuses = {s.url: s for s in book.status(now=0.3)}
    assert statuses["http://a"].status == "ejected" and statuses["http://a"].ejected_for_s > 0


def test_book_keeps_state_across_reloads_and_forgets_dropped_replicas() -> None:
    book = ReplicaBook(_policy((Replica("http://a", 1), Replica("http://b", 1))))
    a = book.get("http://a")
    assert a is not None
    a.begin(5)
    book.configure(_policy((Replica("http://a", 1),), HealthConfig(failures_to_eject=9)))
    assert book.get("http://a") is a and a.in_flight == 1
    assert a.config.failures_to_eject == 9
    assert book.get("http://b") is None
