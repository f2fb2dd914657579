"""Three real backend processes (the bundled model on CPU) behind one gateway:

- prefix affinity: requests sharing a long system prompt land on one replica,
  and its prefix cache serves their shared tokens;
- a replica killed under load: every non-streaming request still succeeds
  (retried on another replica), nothing is sent to it once ejected, it
  returns after a restart, and streams running on it end with a clean error
  event instead of hanging.

The backends are shared by the module's tests (one thread each, a small KV
cache) and every generation is a few tokens long, except the streams that
must still be running when their replica dies.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import yaml

from gateway.routing.picker import rendezvous_order
from gateway.settings import GatewaySettings
from tests.conftest import gateway_env
from tests.support.processes import BackendProcess, InProcessGateway

pytestmark = pytest.mark.slow

BACKEND_ARGS = (
    "--max-model-len",
    "1024",
    "--threads",
    "1",
    "--kv-cache-bytes",
    str(64 * 2**20),
    "--max-num-seqs",
    "8",
)
SYSTEM_PROMPT = (
    "You are the support assistant of Northwind Outfitters, a shop for hiking and camping gear. "
    "Answer politely and briefly. Our return policy: unused items may be returned within 60 days "
    "with a receipt; worn footwear only within 14 days; sale items are final. Shipping is free "
    "above 50 euros, otherwise 4.90 euros within the EU. Orders placed before 2 pm ship the same "
    "day. We repair tents, backpacks and sleeping bags in our workshop in Graz; repairs take two "
    "to three weeks. Loyalty members collect one point per euro and get a 10 euro voucher per "
    "200 points. Never promise delivery dates for items that are out of stock. If a customer "
    "is angry, apologise once, then focus on a concrete next step. "
) * 2


@pytest.fixture(scope="module")
def backends() -> Iterator[list[BackendProcess]]:
    procs = [BackendProcess(*BACKEND_ARGS) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: p.start(timeout_s=600), procs))
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def gateway(
    backends: list[BackendProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessGateway]:
    import shutil

    from tests.support.processes import REPO

    root = tmp_path_factory.mktemp("failover")
    tenants, policies = root / "tenants", root / "policies"
    shutil.copytree(REPO / "tenants", tenants)
    shutil.copytree(REPO / "policies", policies)
    models = yaml.safe_load((policies / "models.yaml").read_text())
    models["pools"]["local"] = {
        "kind": "tollgate",
        "replicas": [{"url": b.url, "weight": 1, "max_in_flight": 8} for b in backends],
        "timeouts": {"connect_s": 1, "first_byte_s": 60, "between_chunks_s": 20, "total_s": 300},
        "balancer": {"strategy": "least_load", "affinity": "prefix", "load_factor": 1.5},
        "health": {
            "probe_interval_s": 0.25,
            "probe_timeout_s": 2,
            "load_interval_s": 0.25,
            "failures_to_eject": 2,
            "successes_to_restore": 2,
            "ejection_base_s": 1,
            "ejection_max_s": 4,
        },
    }
    (policies / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    tenant = {
        "id": "rt",
        "display_name": "Failover tests",
        "tier": "standard",
        "allowed_models": ["*"],
        "default_priority": "standard",
        "allowed_priorities": ["standard"],
    }
    (tenants / "rt.yaml").write_text(yaml.safe_dump(tenant, sort_keys=False))
    settings = GatewaySettings.from_env(gateway_env(backends[0].url, tenants, policies))
    for attempt in range(3):
        # Its port is picked before it binds: on a busy machine another
        # socket may take it first.
        gw = InProcessGateway(settings)
        try:
            gw.start()
            break
        except TimeoutError:
            gw.stop()
            if attempt == 2:
                raise
    try:
        yield gw
    finally:
        gw.stop()


def replica_state(gw: InProcessGateway, admin: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(
        f"{gw.url}/admin/backends", headers={"authorization": f"Bearer {admin}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return {r["url"]: r for pool in response.json()["pools"] for r in pool["replicas"]}


def requests_per_replica(gw: InProcessGateway, admin: str) -> Counter[str]:
    return Counter({url: r["num_requests"] for url, r in replica_state(gw, admin).items()})


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)


def test_shared_system_prompts_stick_to_one_replica_and_hit_its_cache(
    gateway: InProcessGateway, mint: Callable[..., str]
) -> None:
    token, admin = mint("rt"), mint("rt", roles=["admin"])
    before = requests_per_replica(gateway, admin)
    cached: list[tuple[int, int]] = []
    with httpx.Client(timeout=120) as client:
        for i in range(20):
            response = client.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"authorization": f"Bearer {token}"},
                json={
                    "model": "smollm2",
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": f"Question {i}: can I return my boots?"},
                    ],
                    "max_tokens": 2,
                    "temperature": 0,
                },
            )
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            cached.append((usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
    served = requests_per_replica(gateway, admin) - before
    assert sum(served.values()) == 20
    assert served.most_common(1)[0][1] >= 18, served  # at least 90% on one replica
    # After the first, the shared system prompt comes from the prefix cache.
    reused = [c for p, c in cached[1:] if c >= p * 0.6]
    assert len(reused) >= 17, cached
    assert cached[0][1] < cached[0][0] * 0.6


def _stream(
    gw: InProcessGateway, token: str, session: str, started: threading.Event, result: dict[str, Any]
) -> None:
    """A long streamed completion; records its data events and how it ended."""
    events: list[str] = []
    try:
        with httpx.stream(
            "POST",
            f"{gw.url}/v1/completions",
            headers={"authorization": f"Bearer {token}", "x-session-id": session},
            json={
                "model": "smollm2",
                "prompt": "Write a long story about a lighthouse keeper.",
                "max_tokens": 600,
                "ignore_eos": True,
                "stream": True,
            },
            timeout=httpx.Timeout(60, read=30),
        ) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        result["events"] = events
        started.set()


def test_a_replica_killed_under_load_costs_nothing(
    gateway: InProcessGateway, backends: list[BackendProcess], mint: Callable[..., str]
) -> None:
    token, admin = mint("rt"), mint("rt", roles=["admin"])
    victim = backends[1]
    urls = [b.url for b in backends]
    # Sessions whose preferred replica (rendezvous hashing) is the victim.
    sessions = [
        s
        for s in (f"story-{i}" for i in range(200))
        if urls[rendezvous_order("s:" + s, urls, [1, 1, 1])[0]] == victim.url
    ][:2]
    streams: list[dict[str, Any]] = [{} for _ in sessions]
    started = [threading.Event() for _ in sessions]
    stream_threads = [
        threading.Thread(target=_stream, args=(gateway, token, s, e, r))
        for s, e, r in zip(sessions, started, streams, strict=True)
    ]
    for thread in stream_threads:
        thread.start()
    for event in started:
        assert event.wait(120)
    assert replica_state(gateway, admin)[victim.url]["in_flight"] == len(sessions)

    statuses: list[tuple[float, int]] = []
    """(when the request was sent, its status), as each finishes"""
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not stop.is_set():
                n += 1
                sent = time.monotonic()
                response = client.post(
                    f"{gateway.url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {token}"},
                    json={
                        "model": "smollm2",
                        "messages": [{"role": "user", "content": f"Say hi ({worker}-{n})."}],
                        "max_tokens": 3,
                    },
                )
                statuses.append((sent, response.status_code))

    workers = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: len(statuses) >= 1, 60, "load")
        assert victim.proc is not None
        victim.proc.kill()  # SIGKILL: no goodbye
        killed_at = time.monotonic()
        victim.proc.wait()
        victim.proc = None
        # Streams on the victim end, with an error event, within seconds.
        for thread in stream_threads:
            thread.join(20)
            assert not thread.is_alive(), "a stream on the killed replica hung"
        wait_for(
            lambda: replica_state(gateway, admin)[victim.url]["status"] == "ejected",
            10,
            "ejection",
        )
        ejected_at = time.monotonic()
        sent_to_victim = replica_state(gateway, admin)[victim.url]["num_requests"]
        # Keep the load on until a few requests sent after the ejection are
        # done (this machine may be slow): none of them went to the victim.
        wait_for(
            lambda: sum(1 for sent, _ in list(statuses) if sent > ejected_at) >= 4,
            120,
            "requests after the ejection",
        )
        assert replica_state(gateway, admin)[victim.url]["num_requests"] == sent_to_victim
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)
    # Every request succeeded: those sent before, around and after the kill.
    assert Counter(status for _, status in statuses) == Counter({200: len(statuses)})
    assert sum(1 for sent, _ in statuses if sent > killed_at) >= 4, statuses
    for result in streams:
        assert result.get("status") == 200, result
        last = json.loads(result["events"][-1])
        assert last["error"]["code"] == "upstream_error", result["events"][-3:]
        assert "[DONE]" not in result["events"]

    # Back from the dead: restarted on the same port, probed back in, used again.
    victim.start(timeout_s=600)
    wait_for(
        lambda: replica_state(gateway, admin)[victim.url]["status"] == "healthy",
        30,
        "restoration",
    )
    before = replica_state(gateway, admin)[victim.url]["num_requests"]
    with httpx.Client(timeout=120) as client:
        for session in sessions:
            response = client.post(
                f"{gateway.url}/v1/completions",
                headers={"authorization": f"Bearer {token}", "x-session-id": session},
                json={"model": "smollm2", "prompt": "Hello", "max_tokens": 2},
            )
            assert response.status_code == 200, response.text
    assert replica_state(gateway, admin)[victim.url]["num_requests"] >= before + len(sessions)
