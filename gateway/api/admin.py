"""Admin endpoints: the policy in force and the last reload error; backend replicas."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from litestar import Request, Response, get

from gateway.api.context import request_id_for
from gateway.auth.guards import require_role
from gateway.auth.principal import Role
from gateway.observe.readiness import check_policy, check_pools, check_store
from gateway.services import services_of

_encode = msgspec.json.Encoder().encode


@get("/admin/policies")
async def admin_policies(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The policy version in force, its tenants and models, and the last reload error."""
    services = services_of(request)
    request.state.request_id = request_id_for(request)
    principal = await services.authenticator.authenticate(request.headers.get("authorization"))
    require_role(principal, Role.ADMIN)
    watcher = services.policies
    policy = watcher.current
    error = watcher.last_error
    body = {
        "version": policy.version,
        "loaded_at": policy.loaded_at.isoformat(),
        "tenants": sorted(policy.tenants),
        "models": sorted(policy.models),
        "reloads_ok": watcher.reloads_ok,
        "reloads_failed": watcher.reloads_failed,
        "last_error": None
        if error is None
        else {
            "at": error.at.isoformat(),
            "issues": [
                {"file": i.file, "key_path": i.key_path, "message": i.message} for i in error.issues
            ],
        },
    }
    return Response(_encode(body), media_type="application/json")


@get("/admin/backends")
async def admin_backends(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every pool's replicas: health, load, in-flight requests, probe results,
    counters; and the pool's queue (docs/routing.md)."""
    services = services_of(request)
    request.state.request_id = request_id_for(request)
    principal = await services.authenticator.authenticate(request.headers.get("authorization"))
    require_role(principal, Role.ADMIN)
    policy = services.policies.current
    statuses = services.replicas.status()
    pools = []
    for name in sorted(policy.pools):
        pool = policy.pools[name]
        urls = {r.url: r for r in pool.replicas}
        replicas = []
        for status in statuses:
            if status.url not in urls:
                continue
            entry = dataclasses.asdict(status)
            entry["weight"] = urls[status.url].weight
            entry["max_in_flight"] = urls[status.url].max_in_flight
            entry["routable"] = status.ejected_for_s == 0.0 and status.status == "healthy"
            replicas.append(entry)
        queue = services.queues.for_pool(pool).stats()
        pools.append(
            {
                "pool": name,
                "kind": pool.kind,
                "strategy": pool.balancer.strategy,
                "affinity": pool.balancer.affinity,
                "num_replicas": len(replicas),
                "num_healthy": sum(1 for r in replicas if r["status"] == "healthy"),
                "queue": {"capacity": queue.capacity, "in_flight": queue.in_flight},
                "replicas": replicas,
            }
        )
    return Response(_encode({"pools": pools}), media_type="application/json")


@get("/healthz")
async def healthz() -> Response[bytes]:
    """Liveness: the process serves HTTP (nothing else is checked, so a
    backend or Redis outage never gets the gateway restarted)."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Readiness: a policy is loaded, the quota store answers, and every
    pool marked ``required`` has a healthy replica (``gateway.observe.readiness``).
    503 names each failed check."""
    services = services_of(request)
    policy_check, policy = check_policy(services.policies)
    checks = [policy_check, await check_store(services.quota.store)]
    if policy is not None:
        checks += check_pools(services.replicas, policy.pools.values())
    failed = [c.name for c in checks if not c.ok]
    body = {
        "ready": not failed,
        "policy_version": policy.version if policy is not None else None,
        "failed": failed,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
    }
    return Response(
        _encode(body),
        status_code=503 if failed else 200,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )
