"""Admin endpoints: the policy in force and the last reload error."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get

from gateway.api.context import request_id_for
from gateway.auth.guards import require_role
from gateway.auth.principal import Role
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


@get("/healthz")
async def healthz() -> Response[bytes]:
    """Liveness: the process serves HTTP."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Readiness: a policy is loaded."""
    policy = services_of(request).policies.current
    return Response(
        _encode({"ready": True, "policy_version": policy.version}), media_type="application/json"
    )
