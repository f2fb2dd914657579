"""The pure queue scheduler: weights between classes, DRR between tenants,
bounded queues, removal. No clocks, no event loop."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from gateway.queueing.scheduler import ClassConfig, FairScheduler, QueueEntry

Entry = QueueEntry[str]


def make(
    classes: dict[str, float], *, quantum: int = 100, max_len: int = 100_000
) -> FairScheduler[str]:
    """A scheduler whose classes have the given weights; priority = listing order."""
    return FairScheduler(
        [
            ClassConfig(name, weight, priority=i, max_queue_length=max_len)
            for i, (name, weight) in enumerate(classes.items())
        ],
        quantum=quantum,
    )


def push(s: FairScheduler[str], cls: str, tenant: str, cost: int = 100, label: str = "") -> Entry:
    entry = QueueEntry(tenant, cls, cost, label or f"{cls}/{tenant}")
    assert s.push(entry).accepted
    return entry


def drain(s: FairScheduler[str], n: int | None = None) -> list[str]:
    out: list[str] = []
    while n is None or len(out) < n:
        entry = s.pop()
        if entry is None:
            break
        out.append(entry.waiter)
    return out


def test_empty_scheduler_pops_nothing() -> None:
    s = make({"a": 1})
    assert s.pop() is None
    assert len(s) == 0 and not s


def test_fifo_within_one_tenant() -> None:
    s = make({"a": 1})
    for i in range(5):
        push(s, "a", "t", label=str(i))
    assert drain(s) == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    ("weights", "costs", "pops", "expected"),
    [
        # Equal costs: shares follow the weights exactly.
        ({"hi": 3, "lo": 1}, {"hi": 100, "lo": 100}, 40, {"hi": 30, "lo": 10}),
        ({"hi": 16, "lo": 1}, {"hi": 100, "lo": 100}, 34, {"hi": 32, "lo": 2}),
        ({"hi": 1, "lo": 1}, {"hi": 100, "lo": 100}, 20, {"hi": 10, "lo": 10}),
        # Shares are of tokens: a class of 4x bigger requests gets 1/4 as many
        # at equal weight.
        ({"hi": 1, "lo": 1}, {"hi": 100, "lo": 400}, 50, {"hi": 40, "lo": 10}),
        # Three classes.
        (
            {"a": 4, "b": 2, "c": 1},
            {"a": 10, "b": 10, "c": 10},
            70,
            {"a": 40, "b": 20, "c": 10},
        ),
    ],
)
def test_backlogged_classes_share_by_weight(
    weights: dict[str, float], costs: dict[str, int], pops: int, expected: dict[str, int]
) -> None:
    s = make(weights)
    for cls in weights:
        for _ in range(200):
            push(s, cls, "t", costs[cls], label=cls)
    assert Counter(drain(s, pops)) == expected


def test_a_low_class_is_never_starved() -> None:
    s = make({"interactive": 100, "batch": 1})
    for _ in range(500):
        push(s, "interactive", "t", label="i")
    push(s, "batch", "t", label="b")
    order = drain(s, 200)
    assert "b" in order
    assert order.index("b") <= 101


def test_ties_go_to_the_lower_priority_number() -> None:
    # Both classes start level; "first" is listed first, so priority 0.
    s = make({"first": 1, "second": 1})
    push(s, "second", "t", label="second")
    push(s, "first", "t", label="first")
    assert drain(s) == ["first", "second"]


def test_an_idle_class_banks_no_credit() -> None:
    s = make({"a": 1, "b": 1})
    for _ in range(50):
        push(s, "a", "t", label="a")
    assert drain(s, 40) == ["a"] * 40
    # "b" was idle while "a" ran 40 requests; it rejoins level with "a" instead
    # of taking the next 40 in a row.
    for _ in range(10):
        push(s, "b", "t", label="b")
    assert drain(s, 6) == ["b", "a", "b", "a", "b", "a"]


def test_interactive_arrival_overtakes_a_batch_backlog() -> None:
    s = make({"interactive": 16, "batch": 1})
    for _ in range(100):
        push(s, "batch", "t", label="b")
    assert drain(s, 10) == ["b"] * 10
    push(s, "interactive", "u", label="i")
    assert drain(s, 1) == ["i"]


@pytest.mark.parametrize(
    ("quantum", "expected"),
    [
        # Quantum = one request: tenants alternate.
        (100, ["A", "B", "A", "B", "A", "B"]),
        # Quantum = three requests: bursts of three each.
        (300, ["A", "A", "A", "B", "B", "B"]),
    ],
)
def test_drr_alternates_tenants_by_quantum(quantum: int, expected: list[str]) -> None:
    s = make({"c": 1}, quantum=quantum)
    for _ in range(20):
        push(s, "c", "A", 100, label="A")
    for _ in range(20):
        push(s, "c", "B", 100, label="B")
    assert drain(s, 6) == expected


def test_drr_is_fair_in_tokens_not_requests() -> None:
    s = make({"c": 1}, quantum=100)
    for _ in range(200):
        push(s, "c", "big", 1000, label="big")
    for _ in range(2000):
        push(s, "c", "small", 100, label="small")
    tokens: Counter[str] = Counter()
    for label in drain(s, 440):
        tokens[label] += 1000 if label == "big" else 100
    # Equal token shares, within one large request.
    assert abs(tokens["big"] - tokens["small"]) <= 1000
    assert tokens["big"] + tokens["small"] >= 40_000


def test_a_flooding_tenant_gets_no_more_than_a_steady_one() -> None:
    s = make({"c": 1})
    for _ in range(500):
        push(s, "c", "flood", label="flood")
    served: Counter[str] = Counter()
    # The steady tenant keeps one request queued at all times.
    push(s, "c", "steady", label="steady")
    for _ in range(100):
        entry = s.pop()
        assert entry is not None
        served[entry.waiter] += 1
        if entry.waiter == "steady":
            push(s, "c", "steady", label="steady")
    assert served == {"flood": 50, "steady": 50}


def test_a_new_tenant_joins_the_back_of_the_round_with_no_deficit() -> None:
    s = make({"c": 1}, quantum=100)
    for _ in range(5):
        push(s, "c", "A", label="A")
    for _ in range(5):
        push(s, "c", "B", label="B")
    assert drain(s, 1) == ["A"]
    push(s, "c", "C", label="C")
    # C joins behind B, the tenant after A in the round; A's visit is over.
    assert drain(s, 5) == ["B", "C", "A", "B", "A"]


def _reference_drr(quantum: int, queues: dict[str, list[int]], n: int) -> list[str]:
    """Textbook DRR, one quantum per visit, no shortcuts."""
    rounds: deque[str] = deque(queues)
    pending = {t: deque(costs) for t, costs in queues.items()}
    deficit = dict.fromkeys(queues, 0)
    out: list[str] = []
    while rounds and len(out) < n:
        tenant = rounds[0]
        deficit[tenant] += quantum
        while pending[tenant] and pending[tenant][0] <= deficit[tenant] and len(out) < n:
            deficit[tenant] -= pending[tenant].popleft()
            out.append(tenant)
        rounds.popleft()
        if pending[tenant]:
            if len(out) < n:
                rounds.append(tenant)
            else:
                rounds.appendleft(tenant)
        else:
            deficit[tenant] = 0
    return out


@pytest.mark.parametrize("seed", range(20))
def test_drr_shortcut_matches_textbook_drr(seed: int) -> None:
    # Costs far above the quantum exercise the skip over fruitless rounds.
    rng = random.Random(seed)
    quantum = rng.choice([1, 7, 64, 512])
    queues = {
        f"t{i}": [rng.randint(1, 5000) for _ in range(rng.randint(1, 15))]
        for i in range(rng.randint(1, 5))
    }
    s = make({"c": 1}, quantum=quantum)
    for tenant, costs in queues.items():
        for cost in costs:
            push(s, "c", tenant, cost, label=tenant)
    total = sum(len(c) for c in queues.values())
    assert drain(s) == _reference_drr(quantum, queues, total)


# --- bounded queues ---------------------------------------------------------


@pytest.mark.parametrize(
    ("queued", "arrival", "accepted", "evicted_from"),
    [
        # Full with one tenant's flood: another tenant pushes its newest out.
        ({"A": 4}, "B", True, "A"),
        # The flooder itself is refused.
        ({"A": 4}, "A", False, None),
        # Balanced: nobody is two ahead of the newcomer's own count... refuse.
        ({"A": 2, "B": 2}, "A", False, None),
        # ...but a newcomer with nothing queued takes from the largest.
        ({"A": 3, "B": 1}, "C", True, "A"),
        ({"A": 1, "B": 1, "C": 1, "D": 1}, "E", False, None),
        # One ahead is not enough (it would only swap who is ahead).
        ({"A": 3, "B": 1}, "B", True, "A"),
        ({"A": 2, "B": 2}, "B", False, None),
    ],
)
def test_a_full_class_refuses_or_pushes_out_the_largest_tenant(
    queued: dict[str, int], arrival: str, accepted: bool, evicted_from: str | None
) -> None:
    s = make({"c": 1}, max_len=sum(queued.values()))
    newest: dict[str, Entry] = {}
    for tenant, count in queued.items():
        for i in range(count):
            newest[tenant] = push(s, "c", tenant, label=f"{tenant}{i}")
    result = s.push(QueueEntry(arrival, "c", 100, "new"))
    assert result.accepted is accepted
    if evicted_from is None:
        assert result.evicted is None
    else:
        assert result.evicted is newest[evicted_from]
    assert len(s) == sum(queued.values())


def test_queue_length_is_per_class() -> None:
    s = FairScheduler(
        [ClassConfig("a", 1, max_queue_length=1), ClassConfig("b", 1, max_queue_length=2)]
    )
    assert s.push(QueueEntry("t", "a", 1, "a1")).accepted
    assert not s.push(QueueEntry("t", "a", 1, "a2")).accepted
    assert s.push(QueueEntry("t", "b", 1, "b1")).accepted
    assert s.push(QueueEntry("t", "b", 1, "b2")).accepted
    assert not s.push(QueueEntry("t", "b", 1, "b3")).accepted


def test_unknown_class_is_a_programming_error() -> None:
    s = make({"a": 1})
    with pytest.raises(KeyError):
        s.push(QueueEntry("t", "nope", 1, "x"))


# --- removal, depth, reconfiguration ---------------------------------------


def test_remove_takes_an_entry_out_at_once() -> None:
    s = make({"c": 1})
    a1 = push(s, "c", "A", label="a1")
    a2 = push(s, "c", "A", label="a2")
    b1 = push(s, "c", "B", label="b1")
    assert s.depth("c").num_queued == 3
    assert s.remove(a1)
    assert not s.remove(a1)
    assert s.depth("c").num_queued == 2 and s.depth("c").queued_tokens == 200
    assert s.remove(b1)
    assert s.depth("c").num_tenants == 1
    assert drain(s) == ["a2"]
    assert not s.remove(a2)


def test_removing_a_tenants_last_entry_drops_it_from_the_round() -> None:
    s = make({"c": 1})
    push(s, "c", "A", label="A")
    b = push(s, "c", "B", label="B")
    push(s, "c", "C", label="C")
    s.remove(b)
    assert drain(s) == ["A", "C"]
    assert s.depth("c").num_tenants == 0


def test_depths_and_tenant_depth() -> None:
    s = make({"a": 1, "b": 1})
    push(s, "a", "x", 10)
    push(s, "a", "y", 20)
    push(s, "a", "y", 30)
    depths = s.depths()
    assert depths["a"].num_queued == 3 and depths["a"].queued_tokens == 60
    assert depths["a"].num_tenants == 2
    assert depths["b"].num_queued == 0
    assert s.tenant_depth("a", "y") == 2 and s.tenant_depth("b", "y") == 0
    assert s.depth("unknown").num_queued == 0


def test_reconfigure_keeps_queued_entries_and_applies_new_weights() -> None:
    s = make({"hi": 1, "lo": 1})
    for _ in range(100):
        push(s, "hi", "t", label="hi")
        push(s, "lo", "t", label="lo")
    assert Counter(drain(s, 10)) == {"hi": 5, "lo": 5}
    s.configure([ClassConfig("hi", 4, priority=0), ClassConfig("lo", 1, priority=1)])
    assert len(s) == 190
    assert Counter(drain(s, 50)) == {"hi": 40, "lo": 10}


def test_a_class_dropped_from_the_config_still_drains() -> None:
    s = make({"old": 1})
    push(s, "old", "t", label="x")
    s.configure([ClassConfig("new", 1)])
    assert s.class_config("old") is not None
    assert drain(s) == ["x"]


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        FairScheduler([ClassConfig("a", 0)])
    with pytest.raises(ValueError):
        FairScheduler([ClassConfig("a", 1)], quantum=0)
