"""Replica pickers as pure functions, table by table."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.policy.compiled import BalancerConfig, Replica
from gateway.routing.affinity import affinity_key, prompt_prefix, session_id_of
from gateway.routing.picker import (
    ReplicaView,
    least_load,
    pick,
    prefix_affinity,
    rendezvous_order,
    round_robin,
    within_bound,
)

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def view(url: str, load: float, *, weight: float = 1.0, in_flight: int = 0, cap: int = 32):
    return ReplicaView(Replica(url, weight, cap), load, in_flight)


def urls(replicas: list[Replica]) -> list[str]:
    return [r.url for r in replicas]


@pytest.mark.parametrize(
    ("turn", "expected"),
    [(0, [A, B, C]), (1, [B, C, A]), (2, [C, A, B]), (3, [A, B, C]), (7, [B, C, A])],
)
def test_round_robin_rotates(turn: int, expected: list[str]) -> None:
    assert round_robin([A, B, C], turn) == expected


def test_round_robin_of_nothing() -> None:
    assert round_robin([], 5) == []


@pytest.mark.parametrize(
    ("views", "turn", "expected"),
    [
        # fewest tokens first
        ([view(A, 900), view(B, 100), view(C, 500)], 0, [B, C, A]),
        # weighted: B has twice the capacity, so 300 tokens there is 150 per unit
        ([view(A, 200), view(B, 300, weight=2), view(C, 400)], 0, [B, A, C]),
        # a replica at its max_in_flight goes last whatever its load
        ([view(A, 0, in_flight=4, cap=4), view(B, 800), view(C, 900)], 0, [B, C, A]),
        # ties go in turn, so an idle pool still spreads
        ([view(A, 0), view(B, 0), view(C, 0)], 0, [A, B, C]),
        ([view(A, 0), view(B, 0), view(C, 0)], 1, [B, C, A]),
        ([view(A, 0), view(B, 0), view(C, 0)], 2, [C, A, B]),
        ([view(A, 10), view(B, 0), view(C, 0)], 1, [B, C, A]),
        ([view(A, 10), view(B, 0), view(C, 0)], 2, [C, B, A]),
    ],
)
def test_least_load(views: list[ReplicaView], turn: int, expected: list[str]) -> None:
    assert urls(least_load(views, turn)) == expected


def test_rendezvous_is_stable_and_moves_only_the_removed_replicas_keys() -> None:
    keys = [f"session-{i}" for i in range(600)]
    three = {k: [A, B, C][rendezvous_order(k, [A, B, C], [1, 1, 1])[0]] for k in keys}
    again = {k: [A, B, C][rendezvous_order(k, [A, B, C], [1, 1, 1])[0]] for k in keys}
    assert three == again
    shares = Counter(three.values())
    assert all(150 <= shares[u] <= 250 for u in (A, B, C)), shares
    # Drop C: only C's keys move; A's and B's stay where they were.
    two = {k: [A, B][rendezvous_order(k, [A, B], [1, 1])[0]] for k in keys}
    for key in keys:
        if three[key] != C:
            assert two[key] == three[key]


def test_rendezvous_honours_weights() -> None:
    keys = [f"k{i}" for i in range(1000)]
    firsts = Counter(rendezvous_order(k, [A, B], [1, 3])[0] for k in keys)
    assert 680 <= firsts[1] <= 820, firsts  # about three quarters


@pytest.mark.parametrize(
    ("loads", "index", "factor", "slack", "ok"),
    [
        ([0, 0, 0], 0, 1.5, 0, True),  # idle pool
        ([3000, 0, 0], 0, 1.5, 2048, False),  # 3x the average, 3000 above the least
        ([3000, 0, 0], 0, 1.5, 4096, True),  # ... but within the slack
        ([1200, 1000, 1000], 0, 1.5, 0, True),  # within the factor
        ([5000, 1000, 1000], 0, 1.5, 2048, False),
        ([5000, 1000, 1000], 0, 3.0, 2048, True),  # a looser factor
    ],
)
def test_load_bound(loads: list[int], index: int, factor: float, slack: int, ok: bool) -> None:
    views = [view(u, load) for u, load in zip([A, B, C], loads, strict=True)]
    assert within_bound(views, index, factor, slack) is ok


def test_a_full_preferred_replica_is_out_of_bound() -> None:
    views = [view(A, 0, in_flight=2, cap=2), view(B, 0), view(C, 0)]
    assert not within_bound(views, 0, 10.0, 10_000)


def _preferred(key: str) -> str:
    return [A, B, C][rendezvous_order(key, [A, B, C], [1, 1, 1])[0]]


@pytest.mark.parametrize(
    ("loads", "spills"),
    [
        ({A: 0, B: 0, C: 0}, False),
        ({A: 1000, B: 900, C: 1100}, False),
        ("preferred-hot", True),
    ],
)
def test_prefix_affinity_prefers_the_keys_replica_until_the_bound(
    loads: dict[str, int] | str, spills: bool
) -> None:
    key = "p:shared-system-prompt"
    preferred = _preferred(key)
    if loads == "preferred-hot":
        loads = {u: (9000 if u == preferred else 100) for u in (A, B, C)}
    assert isinstance(loads, dict)
    views = [view(u, loads[u]) for u in (A, B, C)]
    order = urls(prefix_affinity(views, key, load_factor=1.5, slack_tokens=2048))
    assert sorted(order) == [A, B, C]
    if spills:
        assert order[0] != preferred
        assert order[0] == min(loads, key=lambda u: loads[u])
    else:
        assert order[0] == preferred
        # the rest by least load
        rest = sorted((u for u in (A, B, C) if u != preferred), key=lambda u: loads[u])
        assert order[1:] == rest


@pytest.mark.parametrize(
    ("config", "key", "expected_first"),
    [
        (BalancerConfig(strategy="round_robin", affinity="none"), "p:x", B),  # turn 1
        (BalancerConfig(strategy="least_load", affinity="none"), "p:x", C),
        (BalancerConfig(strategy="least_load", affinity="prefix"), None, C),
    ],
)
def test_pick_dispatches_on_the_pools_config(
    config: BalancerConfig, key: str | None, expected_first: str
) -> None:
    views = [view(A, 500), view(B, 300), view(C, 100)]
    assert urls(pick(views, config, key, turn=1))[0] == expected_first


def test_pick_with_a_key_uses_affinity() -> None:
    views = [view(A, 0), view(B, 0), view(C, 0)]
    config = BalancerConfig(affinity="prefix")
    for i in range(20):
        key = f"s:{i}"
        assert urls(pick(views, config, key, turn=i))[0] == _preferred(key)


def _chat(system: str, user: str) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


@pytest.mark.parametrize(
    ("affinity", "session", "same_key_for_shared_prefix"),
    [
        ("prefix", None, True),
        ("prefix", "abc", True),
        ("session", None, None),
        ("none", "abc", None),
    ],
)
def test_affinity_keys(affinity: str, session: str | None, same_key_for_shared_prefix: bool | None):
    config = BalancerConfig(affinity=affinity, prefix_chars=64)  # type: ignore[arg-type]
    system = "You are a meticulous assistant for ACME's billing team. " * 3
    one = affinity_key(config, session, _chat(system, "first question"), "chat")
    two = affinity_key(config, session, _chat(system, "another question"), "chat")
    if same_key_for_shared_prefix is None:
        assert one is None and two is None
    else:
        assert one is not None and one == two
        if session is not None:
            assert one == "s:" + session


def test_short_prompts_get_different_prefix_keys() -> None:
    config = BalancerConfig(prefix_chars=1024)
    one = affinity_key(config, None, _chat("Be brief.", "What is 2+2?"), "chat")
    two = affinity_key(config, None, _chat("Be brief.", "Name a colour."), "chat")
    assert one != two


def test_prompt_prefix_of_text_and_chat() -> None:
    assert prompt_prefix({"prompt": "abcdef"}, "text", 3) == "abc"
    assert prompt_prefix({"prompt": ["abcdef"]}, "text", 4) == "abcd"
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert "hi" in prompt_prefix(chat, "chat", 100)


@pytest.mark.parametrize(
    ("header", "expected"), [(None, None), ("", None), ("  ", None), (" s1 ", "s1")]
)
def test_session_id_of(header: str | None, expected: str | None) -> None:
    assert session_id_of(header) == expected
