"""Per-request context: who is calling, under which policy, and the body.

Every OpenAI endpoint starts here: authenticate, resolve the tenant against
the policy snapshot in force (kept for the whole request, so a reload never
changes a request half-way), then read and parse the body within its size
limit.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import InternalServerException

from gateway.auth.principal import Principal
from gateway.errors import BadRequestError, PayloadTooLargeError
from gateway.ids import new_id
from gateway.policy.access import resolve_tenant
from gateway.policy.compiled import Policy, TenantPolicy
from gateway.routing.resolve import RouteDecision
from gateway.services import Services

_decode = msgspec.json.Decoder().decode
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class CallContext:
    """An authenticated caller and the policy snapshot its request runs under."""

    request_id: str
    started: float
    principal: Principal
    tenant: TenantPolicy
    policy: Policy
    route: RouteDecision | None = None
    """The model, version and reasons chosen for the request, once routed."""

    def routed(self, decision: RouteDecision) -> CallContext:
        """This context with its routing decision."""
        # Spelled out: `dataclasses.replace` costs several times as much, on
        # every request.
        return CallContext(
            self.request_id, self.started, self.principal, self.tenant, self.policy, decision
        )


def request_id_for(request: Request[Any, Any, Any]) -> str:
    """The client's `x-request-id` when well-formed, else a fresh one."""
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    return new_id()


async def authorize(
    request: Request[Any, Any, Any], services: Services, request_id: str | None = None
) -> CallContext:
    """Authenticate the caller and bind the request to the current policy;
    ``request_id`` is the one the caller already chose (``request_id_for``)."""
    started = time.perf_counter()
    if request_id is None:
        request_id = request_id_for(request)
    request.state.request_id = request_id
    principal = await services.authenticator.authenticate(request.headers.get("authorization"))
    policy = services.policies.current
    tenant = resolve_tenant(policy, principal)
    return CallContext(request_id, started, principal, tenant, policy)


async def read_json_object(request: Request[Any, Any, Any], max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object; 413 over `max_bytes`, 400 otherwise bad."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"the request body is over {max_bytes} bytes")
    # Straight from ASGI `receive` rather than `request.stream()`: the fast
    # path (`gateway.app.GatewayApp`) has no Litestar route handler to ask
    # for the size limit, and this function enforces it anyway.
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # As Litestar's request.stream() reports it.
            raise InternalServerException("client disconnected prematurely")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
        if chunk:
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLargeError(f"the request body is over {max_bytes} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        data = _decode(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequestError("the request body must be a JSON object")
    return data
