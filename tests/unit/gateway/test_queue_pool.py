"""One pool's queue on a real event loop: slots, waiting, deadlines,
disconnects and cancellation, reconfiguration; plus the registry and the
priority class of a request."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import (
    BadRequestError,
    ClientClosedRequestError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from gateway.policy.compiled import Policy, PriorityClass
from gateway.policy.loader import load_policy
from gateway.queueing.classes import resolve_priority
from gateway.queueing.pool import PoolQueue, Slot
from gateway.queueing.registry import PoolQueues

REPO = Path(__file__).resolve().parents[3]

INTERACTIVE = PriorityClass("interactive", 0, 5.0, weight=16, max_queue_length=100)
BATCH = PriorityClass("batch", 20, 60.0, weight=1, max_queue_length=100)


def pool(capacity: int = 1, *classes: PriorityClass) -> PoolQueue:
    return PoolQueue("p", capacity, classes or (INTERACTIVE, BATCH))


async def settle() -> None:
    """Let every ready callback and task step run."""
    for _ in range(5):
        await asyncio.sleep(0)


def waiter(
    q: PoolQueue, cls: PriorityClass, tenant: str = "t", cost: int = 100
) -> asyncio.Task[Slot]:
    return asyncio.create_task(q.acquire(cls, tenant, cost))


async def test_fast_path_takes_a_free_slot_without_waiting() -> None:
    q = pool(2)
    a = await q.acquire(BATCH, "t", 10)
    b = await q.acquire(INTERACTIVE, "t", 10)
    assert (a.wait_s, b.wait_s) == (0.0, 0.0)
    assert (a.priority, b.priority) == ("batch", "interactive")
    assert q.in_flight == 2
    a.release()
    a.release()  # idempotent
    assert q.in_flight == 1 and a.released


async def test_a_full_pool_makes_requests_wait_and_hands_freed_slots_over() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    task = waiter(q, BATCH)
    await settle()
    assert not task.done() and q.depth("batch") == 1
    await asyncio.sleep(0.02)
    held.release()
    slot = await task
    assert slot.wait_s >= 0.015
    assert q.in_flight == 1 and q.depth("batch") == 0
    slot.release()
    assert q.in_flight == 0


async def test_a_newcomer_cannot_take_a_slot_someone_waits_for() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    first = waiter(q, BATCH)
    await settle()
    held.release()  # granted to `first`, whose task has not run yet
    late = waiter(q, INTERACTIVE)
    await settle()
    assert first.done() and not late.done()
    (await first).release()
    (await late).release()


async def test_interactive_waiters_go_before_batch_waiters() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    order: list[str] = []

    async def run(cls: PriorityClass, label: str) -> None:
        slot = await q.acquire(cls, "t", 100)
        order.append(label)
        slot.release()

    tasks = [asyncio.create_task(run(BATCH, "b")) for _ in range(3)]
    await settle()
    tasks += [asyncio.create_task(run(INTERACTIVE, "i")) for _ in range(3)]
    await settle()
    held.release()
    await asyncio.gather(*tasks)
    # Both classes start level, so batch gets its first turn after one
    # interactive request; from then on weight 16:1 puts interactive first.
    assert order == ["i", "b", "i", "i", "b", "b"]


async def test_max_wait_gives_503_queue_timeout_with_retry_after() -> None:
    short = PriorityClass("short", 0, 0.05, weight=1)
    q = pool(1, short)
    held = await q.acquire(short, "t", 10)
    with pytest.raises(ServiceUnavailableError) as info:
        await q.acquire(short, "t", 10)
    assert info.value.code == "queue_timeout"
    assert int(info.value.headers["retry-after"]) >= 1
    assert q.depth("short") == 0
    assert q.stats().classes["short"].num_timed_out == 1
    held.release()
    assert q.in_flight == 0


async def test_a_full_queue_refuses_at_once_with_503_queue_full() -> None:
    tiny = PriorityClass("tiny", 0, 60.0, weight=1, max_queue_length=1)
    q = pool(1, tiny)
    held = await q.acquire(tiny, "t", 10)
    queued = waiter(q, tiny)
    await settle()
    with pytest.raises(ServiceUnavailableError) as info:
        await q.acquire(tiny, "t", 10)
    assert info.value.code == "queue_full"
    assert info.value.status_code == 503 and "retry-after" in info.value.headers
    assert q.stats().classes["tiny"].num_rejected_full == 1
    held.release()
    (await queued).release()


async def test_a_flooding_tenant_is_pushed_out_of_a_full_queue() -> None:
    small = PriorityClass("small", 0, 60.0, weight=1, max_queue_length=3)
    q = pool(1, small)
    held = await q.acquire(small, "flood", 10)
    flood = [waiter(q, small, "flood") for _ in range(3)]
    await settle()
    other = waiter(q, small, "other")
    await settle()
    # The flood's newest request made room for the other tenant's.
    with pytest.raises(ServiceUnavailableError) as info:
        await flood[2]
    assert info.value.code == "queue_full"
    assert q.depth("small") == 3
    held.release()
    # Round robin: the other tenant goes before the flood's remaining request.
    (await flood[0]).release()
    (await other).release()
    (await flood[1]).release()
    assert q.in_flight == 0


async def test_a_cancelled_waiter_leaves_the_queue_at_once() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    gone = waiter(q, BATCH)
    stays = waiter(q, BATCH)
    await settle()
    assert q.depth("batch") == 2
    gone.cancel()
    await settle()
    assert gone.cancelled()
    assert q.depth("batch") == 1
    assert q.stats().classes["batch"].num_abandoned == 1
    held.release()
    (await stays).release()
    assert q.in_flight == 0


async def test_a_slot_granted_as_the_waiter_is_cancelled_passes_on() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    first = waiter(q, BATCH)
    second = waiter(q, BATCH)
    await settle()
    held.release()  # grants `first`...
    first.cancel()  # ...which is cancelled before it runs again
    await settle()
    assert first.cancelled()
    slot = await second
    assert q.in_flight == 1 and q.depth("batch") == 0
    slot.release()
    assert q.in_flight == 0


class FakeReceive:
    """An ASGI receive that answers http.disconnect once `disconnect()` is called."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.calls = 0

    def disconnect(self) -> None:
        self.gone.set()

    async def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_a_client_that_disconnects_while_queued_leaves_at_once() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    receive = FakeReceive()
    task = asyncio.create_task(q.acquire(BATCH, "t", 10, receive))
    await settle()
    assert q.depth("batch") == 1 and receive.calls == 1
    receive.disconnect()
    with pytest.raises(ClientClosedRequestError) as info:
        await task
    assert info.value.status_code == 499
    assert q.depth("batch") == 0
    held.release()
    assert q.in_flight == 0


async def test_the_disconnect_watch_ends_when_the_slot_is_granted() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    receive = FakeReceive()
    task = asyncio.create_task(q.acquire(BATCH, "t", 10, receive))
    await settle()
    held.release()
    slot = await task
    await settle()
    receive.disconnect()  # after the grant: not the queue's business any more
    await settle()
    assert not slot.released and q.in_flight == 1
    slot.release()


async def test_the_fast_path_never_calls_receive() -> None:
    q = pool(1)
    receive = FakeReceive()
    slot = await q.acquire(BATCH, "t", 10, receive)
    assert receive.calls == 0
    slot.release()


async def test_a_larger_capacity_on_reload_grants_waiters_at_once() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    tasks = [waiter(q, BATCH) for _ in range(3)]
    await settle()
    q.configure(3, [INTERACTIVE, BATCH])
    await settle()
    assert [t.done() for t in tasks] == [True, True, False]
    q.configure(1, [INTERACTIVE, BATCH])
    for t in tasks[:2]:
        (await t).release()
    held.release()
    # Back under the smaller capacity: the third one gets the single slot.
    (await tasks[2]).release()
    assert q.in_flight == 0


async def test_admit_releases_at_the_end_of_the_block_unless_kept() -> None:
    q = pool(1)
    async with q.admit(BATCH, "t", 10) as slot:
        assert q.in_flight == 1
    assert slot.released and q.in_flight == 0
    async with q.admit(BATCH, "t", 10) as kept:
        kept.keep()
    assert not kept.released and q.in_flight == 1
    kept.release()
    with pytest.raises(RuntimeError):
        async with q.admit(BATCH, "t", 10) as failed:
            failed.keep()
            raise RuntimeError("upstream failed")
    assert failed.released and q.in_flight == 0


async def test_a_slot_dropped_without_release_comes_back() -> None:
    q = pool(1)
    slot = await q.acquire(BATCH, "t", 10)
    assert q.in_flight == 1
    del slot
    gc.collect()
    assert q.in_flight == 0


async def test_stats_snapshot() -> None:
    q = pool(1)
    held = await q.acquire(BATCH, "t", 10)
    tasks = [waiter(q, BATCH, "a", 100), waiter(q, BATCH, "b", 50), waiter(q, INTERACTIVE)]
    await settle()
    stats = q.stats()
    assert (stats.pool, stats.capacity, stats.in_flight) == ("p", 1, 1)
    assert stats.classes["batch"].num_queued == 2
    assert stats.classes["batch"].queued_tokens == 150
    assert stats.classes["batch"].num_tenants == 2
    assert stats.classes["interactive"].num_queued == 1
    for task in tasks:
        task.cancel()
    await settle()
    held.release()
    assert q.stats().classes["batch"].num_abandoned == 2


async def test_a_class_the_pool_has_not_heard_of_is_queued_anyway() -> None:
    q = pool(1, BATCH)
    held = await q.acquire(BATCH, "t", 10)
    task = waiter(q, INTERACTIVE)
    await settle()
    assert q.depth("interactive") == 1
    held.release()
    (await task).release()


# --- the registry --------------------------------------------------------------


def shipped_policy() -> Policy:
    return load_policy(REPO / "tenants", REPO / "policies", environ={})


async def test_registry_reconfigures_the_same_queue_on_reload() -> None:
    policy = shipped_policy()
    queues = PoolQueues(policy)
    local = policy.pools["local"]
    queue = queues.for_pool(local)
    assert queue.capacity == local.capacity == 32
    replica = dataclasses.replace(local.replicas[0], max_in_flight=4)
    smaller = dataclasses.replace(local, replicas=(replica, replica))
    reloaded = dataclasses.replace(policy, pools={"local": smaller})
    queues.configure(reloaded)
    assert queues.for_pool(smaller) is queue
    assert queue.capacity == 8
    other = dataclasses.replace(local, name="elsewhere")
    assert queues.for_pool(other).capacity == 32
    assert [s.pool for s in queues.stats()] == ["elsewhere", "local"]


def test_pool_capacity_counts_only_replicas_in_service() -> None:
    local = shipped_policy().pools["local"]
    on = dataclasses.replace(local.replicas[0], max_in_flight=5)
    drained = dataclasses.replace(on, weight=0.0)
    assert dataclasses.replace(local, replicas=(on, on, drained)).capacity == 10
    assert dataclasses.replace(local, replicas=(drained,)).capacity == 1


# --- a request's class -------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "header", "expected"),
    [
        ("acme", None, "standard"),
        ("acme", "", "standard"),
        ("acme", "interactive", "interactive"),
        ("acme", " batch ", "batch"),
        ("globex", None, "standard"),
        ("globex", "batch", "batch"),
    ],
)
def test_priority_from_header_or_tenant_default(
    tenant: str, header: str | None, expected: str
) -> None:
    policy = shipped_policy()
    found = policy.tenant(tenant)
    assert found is not None
    assert resolve_priority(policy, found, header).name == expected


def test_a_class_the_tenant_may_not_use_is_403() -> None:
    policy = shipped_policy()
    globex = policy.tenant("globex")
    assert globex is not None
    with pytest.raises(PermissionDeniedError) as info:
        resolve_priority(policy, globex, "interactive")
    assert info.value.code == "priority_not_allowed"
    assert "interactive" in info.value.message


def test_an_unknown_class_is_400() -> None:
    policy = shipped_policy()
    acme = policy.tenant("acme")
    assert acme is not None
    with pytest.raises(BadRequestError) as info:
        resolve_priority(policy, acme, "urgent")
    assert info.value.code == "unknown_priority"


def test_shipped_classes_have_weights() -> None:
    classes = shipped_policy().priority_classes
    assert classes["interactive"].weight > classes["standard"].weight > classes["batch"].weight
    assert all(c.max_queue_length >= 1 for c in classes.values())
