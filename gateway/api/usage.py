"""Usage for finance and tenant admins: `GET /v1/usage`; and the usage
record's draft for a request on the OpenAI surface.

`GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&tenant=T][&group_by=tenant,app,model,day]
[&format=json|csv|parquet]`: the priced export of `tollgate usage export`
(`gateway.usage.export`). Role `finance` sees every tenant (or the one it
names); a tenant's `admin` sees its own tenant only (naming another is a
403); `user` gets a 403. The DuckDB query runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from litestar import Request, Response, get

from gateway.api.context import CallContext, request_id_for
from gateway.auth.principal import Principal, Role
from gateway.errors import BadRequestError, PermissionDeniedError
from gateway.policy.compiled import PriorityClass
from gateway.services import services_of
from gateway.usage.export import MEDIA_TYPES, ExportError, parse_query, render, run_export
from gateway.usage.ledger import Ledger
from gateway.usage.record import RecordDraft


def draft_for(ctx: CallContext, priority: PriorityClass, stream: bool) -> RecordDraft:
    """A routed request's usage record as far as admission knows it."""
    decision = ctx.route
    assert decision is not None, "draft_for needs a routed context"
    now_ms = time.time_ns() // 1_000_000
    elapsed_ms = round((time.perf_counter() - ctx.started) * 1000)
    return RecordDraft(
        tenant=ctx.tenant.tenant_id,
        model_requested=decision.requested,
        model=decision.route.name,
        streamed=stream,
        started_ms=now_ms - elapsed_ms,
        started_perf=ctx.started,
        client_request_id=ctx.request_id,
        app=ctx.principal.app_id,
        user=ctx.principal.subject,
        model_version=decision.version.name,
        upstream_model=decision.version.upstream_model,
        route=decision.header(),
        priority=priority.name,
    )


def _tenant_scope(principal: Principal, asked: str | None) -> str | None:
    """The tenant this caller may export (None: all)."""
    if principal.has_role(Role.FINANCE):
        return asked
    if principal.has_role(Role.ADMIN):
        if asked is not None and asked != principal.tenant_id:
            raise PermissionDeniedError("a tenant admin may only export its own tenant's usage")
        return principal.tenant_id
    raise PermissionDeniedError("this endpoint requires the finance or admin role")


@get("/v1/usage")
async def usage_export(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Priced usage grouped by tenant, app, model and day (docs/ledger.md)."""
    services = services_of(request)
    request_id = request_id_for(request)
    request.state.request_id = request_id
    principal = await services.authenticator.authenticate(request.headers.get("authorization"))
    params = request.query_params
    tenant = _tenant_scope(principal, params.get("tenant") or None)
    fmt = params.get("format") or "json"
    if fmt not in MEDIA_TYPES:
        raise BadRequestError("'format' must be json, csv or parquet", param="format")
    try:
        query = parse_query(
            params.get("from"), params.get("to"), tenant=tenant, group_by=params.get("group_by")
        )
    except ExportError as exc:
        raise BadRequestError(str(exc), param=exc.param) from exc
    pricing = services.policies.current.pricing
    ledger = Ledger(services.settings.ledger_dir)
    # Half the cores at most: the gateway keeps serving while finance exports.
    threads = max(1, (os.cpu_count() or 2) // 2)
    result = await asyncio.to_thread(run_export, ledger, pricing, query, threads=threads)
    body = await asyncio.to_thread(render, result, fmt)  # type: ignore[arg-type]
    headers = {"x-request-id": request_id}
    if fmt != "json":
        name = f"usage-{query.start.isoformat()}-{query.end.isoformat()}.{fmt}"
        headers["content-disposition"] = f'attachment; filename="{name}"'
    return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)
