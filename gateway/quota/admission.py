"""Admission for one request: count, check per-request limits, reserve, and
hand back a `Grant` that is finished exactly once.

Order (each step may refuse the request):

1. prompt tokens: the model's tokenizer or the estimate (`gateway.quota.tokens`);
2. `max_prompt_tokens`: a longer prompt is a 400 `context_length_exceeded`;
3. `max_output_tokens`: a request without `max_tokens` (or
   `max_completion_tokens`) gets `max_tokens` set to it; one asking for more
   is a 400 `max_tokens_exceeded` naming the limit (never silently clamped:
   the caller would get a shorter answer than it asked for without knowing);
   without a limit or a client value, the rest of the model's context is
   reserved, since that is what the backend may generate;
4. reserve prompt + max_tokens in the store: a 429 (`rate_limit_exceeded`,
   or `insufficient_quota` for day and month budgets) with Retry-After when
   any limit has no room; when the store is unavailable, the tenant's
   `on_store_failure` decides: `fail_closed` is a 503 with Retry-After,
   `fail_open` admits without counting (logged as `quota_fail_open`).

Every refusal is reported to the `Quota.on_denial` hooks (metrics) with the
tenant and the limit that refused: one of `DENIAL_REASONS`.

With the usage ledger on (`Quota(ledger=True)`, as the gateway runs), every
admitted request gets a lease, tenants without counted limits included, so
that its open record lives in the store and a request whose gateway dies
still gets an `interrupted` record; the `Grant` carries the request's
`RecordDraft`, and finishing the grant hands the finished record to the
store with the settlement (`gateway.usage.record`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.errors import (
    BadRequestError,
    GatewayError,
    RateLimitError,
    ServiceUnavailableError,
)
from gateway.ids import new_id
from gateway.policy.compiled import ModelRoute, Policy, TenantPolicy
from gateway.quota.breaker import CircuitBreaker, GuardedStore
from gateway.quota.headers import format_duration, rate_limit_headers
from gateway.quota.keeper import LeaseKeeper
from gateway.quota.limits import request_limits, reservation_for
from gateway.quota.memory import MemoryQuotaStore
from gateway.quota.store import (
    Admission,
    Figure,
    Lease,
    QuotaStore,
    StoreUnavailableError,
)
from gateway.quota.tokens import PromptCounter
from gateway.settings import GatewaySettings
from gateway.usage.record import ChargeUnknown, RecordDraft, UsageEntry

log = structlog.get_logger("tollgate.quota")

DENIAL_REASONS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "max_prompt_tokens",
    "max_output_tokens",
    "store_unavailable",
)
"""What refuses a request: a counted limit (`gateway.quota.limits.COUNTED`),
a per-request ceiling, or the store when a `fail_closed` tenant meets it down."""

DenialHook = Callable[[str, str], None]
"""Called with (tenant id, reason) for every refused request."""

REQUEST_ID_HEADER = "x-tollgate-request-id"
"""Tollgate's own id of an admitted request: the key of its usage record."""

_WORDS = {
    "requests_per_minute": "requests per minute (RPM)",
    "tokens_per_minute": "tokens per minute (TPM)",
    "max_concurrent": "concurrent requests",
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
}


class Grant:
    """An admitted request's claim on the quota; finish it exactly once.

    `settle` when the backend was reached (with its reported tokens, or None
    when unknown: the reservation is charged), `release` when it never was.
    Later calls are no-ops, so every exit path of a request may call one.

    `record` is the request's usage record in the making: the request path
    notes the replica, the first token, the reported usage and how a stream
    ended on it; finishing the grant finishes the record too (when the
    ledger is on).
    """

    def __init__(
        self,
        lease: Lease | None,
        *,
        prompt_tokens: int,
        reserved_tokens: int,
        keeper: LeaseKeeper | None,
        figures: tuple[Figure, ...] = (),
        request_id: str | None = None,
        record: RecordDraft | None = None,
        charge_unknown: ChargeUnknown = "reserved",
        unleased: Lease | None = None,
    ) -> None:
        self.lease = lease
        self.prompt_tokens = prompt_tokens
        self.reserved_tokens = reserved_tokens
        """prompt + max_tokens: what the queue can order by, too."""
        self._figures = figures
        self._request_id = request_id
        self._headers: dict[str, str] | None = None
        self._keeper = keeper
        self._ledger = record is not None
        self.record = record if record is not None else RecordDraft("", "", "")
        self._charge_unknown = charge_unknown
        self._unleased = unleased
        """A request served without a lease (`fail_open`) under the ledger:
        its record is appended on its own, named by this."""
        self.finished = False
        self.sent = False
        """Set just before the request goes to a backend: from then on a
        failure may have consumed tokens."""

    @property
    def headers(self) -> dict[str, str]:
        """`x-ratelimit-*` (and `x-tollgate-request-id` with the ledger on)
        for the response (empty when nothing was counted)."""
        # Formatted on first use, which on the request path is while the
        # backend works: the client does not wait for it.
        headers = self._headers
        if headers is None:
            headers = self._headers = rate_limit_headers(self._figures)
            if self._request_id is not None:
                headers[REQUEST_ID_HEADER] = self._request_id
        return headers

    def _finish_soon(
        self, quota_tokens: int | None, *, reached: bool, reported: int | None = None
    ) -> asyncio.Task[None] | None:
        if self.finished:
            return None
        self.finished = True
        if self._keeper is None:
            return None
        entry: UsageEntry | None = None
        if self._ledger:
            entry = self.record.final_entry(
                self._charge_unknown,
                reached_backend=reached,
                actual_tokens=reported,
                check=self._unleased is not None,
            )
        if self.lease is None:
            if entry is not None and self._unleased is not None:
                return self._keeper.append(self._unleased, entry)
            return None
        return self._keeper.finish(self.lease, quota_tokens, entry)

    def settle_soon(self, actual_tokens: int | None) -> None:
        """Start settling without waiting (for `finally` blocks that may be
        running under cancellation, where an `await` would not return)."""
        quota_tokens = self.reserved_tokens if actual_tokens is None else actual_tokens
        self._finish_soon(quota_tokens, reached=True, reported=actual_tokens)

    async def settle(self, actual_tokens: int | None) -> None:
        """Settle with the backend's usage (None: charge the reservation)."""
        quota_tokens = self.reserved_tokens if actual_tokens is None else actual_tokens
        task = self._finish_soon(quota_tokens, reached=True, reported=actual_tokens)
        if task is not None:
            await asyncio.shield(task)

    def finish_after_error(self, exc: BaseException) -> None:
        """Finish after `exc` ended the request early, and put the rate-limit
        headers on the error response.

        A refusal (4xx) or an unreachable backend (503) consumed nothing:
        release. Any other failure after the request was sent (timeouts, 5xx,
        cancellation) may have: charge the reservation, as nothing better is
        known. Before sending, nothing was consumed: release.
        """
        self.record.failed(exc)
        if isinstance(exc, GatewayError):
            exc.headers = {**self.headers, **exc.headers}
            refused = exc.status_code < 500 or isinstance(exc, ServiceUnavailableError)
            if refused:
                self.release_soon()
                return
        if self.sent:
            self.settle_soon(None)
        else:
            self.release_soon()

    def release_soon(self) -> None:
        """Start refunding everything without waiting."""
        self._finish_soon(None, reached=False)

    async def release(self) -> None:
        """Refund everything (the request never reached a backend)."""
        task = self._finish_soon(None, reached=False)
        if task is not None:
            await asyncio.shield(task)


class Quota:
    """Admission control of one gateway process over one `QuotaStore`."""

    def __init__(
        self,
        store: QuotaStore,
        *,
        lease_ttl_s: float,
        counter: PromptCounter | None = None,
        keeper: LeaseKeeper | None = None,
        ledger: bool = False,
        charge_unknown: ChargeUnknown = "reserved",
    ) -> None:
        self.store = store
        self.lease_ttl_s = lease_ttl_s
        self.counter = counter or PromptCounter()
        self.keeper = keeper or LeaseKeeper(store, lease_ttl_s=lease_ttl_s)
        self.ledger = ledger
        """Whether admitted requests get usage records (the gateway: always)."""
        self.charge_unknown: ChargeUnknown = charge_unknown
        self.fail_open_admits = 0
        """Requests admitted uncounted because the store was unavailable."""
        self.on_denial: list[DenialHook] = []
        """Called (on the event loop) with each refusal's tenant and reason."""

    def _denied(self, tenant: TenantPolicy, reason: str) -> None:
        for hook in self.on_denial:
            hook(tenant.tenant_id, reason)

    async def admit(
        self,
        policy: Policy,
        tenant: TenantPolicy,
        app_id: str | None,
        route: ModelRoute,
        body: dict[str, Any],
        kind: str,
        record: RecordDraft | None = None,
    ) -> Grant:
        """Admit one request or raise the error that refuses it; may set
        `max_tokens` in `body` (see the module docstring). `record` is the
        request's usage record so far (a minimal one when None)."""
        limits = request_limits(tenant, app_id, route.name)
        prompt = self.counter.count(route, body, kind)
        if limits.max_prompt_tokens is not None and prompt > limits.max_prompt_tokens:
            self._denied(tenant, "max_prompt_tokens")
            raise BadRequestError(
                f"The prompt is about {prompt} tokens, over this tenant's limit of "
                f"{limits.max_prompt_tokens} prompt tokens (max_prompt_tokens) for "
                f"'{route.name}'. Shorten the prompt.",
                code="context_length_exceeded",
                param="messages" if kind == "chat" else "prompt",
            )
        try:
            output = _output_tokens(body, limits.max_output_tokens, route, prompt)
        except BadRequestError:
            self._denied(tenant, "max_output_tokens")
            raise
        reserved = prompt + output
        draft = record or RecordDraft(
            tenant.tenant_id, route.name, route.name, bool(body.get("stream")), app=app_id
        )
        draft.request_id = new_id()
        draft.prompt_estimate, draft.reserved_tokens = prompt, reserved
        reservation = reservation_for(
            tenant,
            app_id,
            route.name,
            reserved,
            lease_id=draft.request_id,
            usage=draft.open_entry(self.charge_unknown) if self.ledger else None,
        )
        lease_name = Lease(tenant.tenant_id, reservation.lease_id, reserved)
        if not reservation.scopes and not self.ledger:
            return Grant(None, prompt_tokens=prompt, reserved_tokens=reserved, keeper=None)
        try:
            admission = await self.store.admit(reservation)
        except StoreUnavailableError as exc:
            if exc.attempted:
                # The script may have run before the reply was lost: refund
                # the lease if it exists (a no-op otherwise), retried until
                # its TTL; a refused request's record says so, if it exists.
                void = None
                if self.ledger and tenant.on_store_failure == "fail_closed":
                    draft.status, draft.http_status = "error", 503
                    draft.error_code = "quota_unavailable"
                    void = draft.final_entry(
                        self.charge_unknown, reached_backend=False, only_if_known=True
                    )
                self.keeper.finish(lease_name, None, void)
            return self._store_failed(tenant, exc, prompt, reserved, draft, lease_name)
        if admission.lease is None:
            refusal = _refusal(admission, reservation.tokens, rate_limit_headers(admission.figures))
            self._denied(tenant, refusal.limit)
            raise refusal.error
        self.keeper.track(admission.lease, _horizon_s(policy, route, self.lease_ttl_s))
        return Grant(
            admission.lease,
            prompt_tokens=prompt,
            reserved_tokens=reservation.tokens,
            keeper=self.keeper,
            figures=admission.figures,
            request_id=draft.request_id if self.ledger else None,
            record=draft if self.ledger else None,
            charge_unknown=self.charge_unknown,
        )

    def _store_failed(
        self,
        tenant: TenantPolicy,
        exc: StoreUnavailableError,
        prompt: int,
        reserved: int,
        draft: RecordDraft,
        lease_name: Lease,
    ) -> Grant:
        if tenant.on_store_failure == "fail_open":
            self.fail_open_admits += 1
            log.warning("quota_fail_open", tenant=tenant.tenant_id, error=str(exc))
            if not self.ledger:
                return Grant(None, prompt_tokens=prompt, reserved_tokens=reserved, keeper=None)
            # Served uncounted, but billed: its record is appended on its own.
            return Grant(
                None,
                prompt_tokens=prompt,
                reserved_tokens=reserved,
                keeper=self.keeper,
                request_id=draft.request_id,
                record=draft,
                charge_unknown=self.charge_unknown,
                unleased=lease_name,
            )
        log.warning("quota_fail_closed", tenant=tenant.tenant_id, error=str(exc))
        self._denied(tenant, "store_unavailable")
        raise ServiceUnavailableError(
            "The quota service is temporarily unavailable; retry shortly.",
            retry_after_s=exc.retry_after_s,
            code="quota_unavailable",
        ) from exc

    def start(self) -> None:
        """Start the lease keeper (in the app's lifespan)."""
        self.keeper.start()

    async def stop(self) -> None:
        """Finish pending settlements, then close the store."""
        await self.keeper.stop()
        await self.store.close()


def _output_tokens(body: dict[str, Any], limit: int | None, route: ModelRoute, prompt: int) -> int:
    """The output tokens to reserve; applies the tenant's `max_output_tokens`."""
    field = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    asked = body.get(field)
    if asked is None:
        if limit is None:
            return max(1, route.context_length - prompt)
        body["max_tokens"] = limit
        return limit
    if limit is not None and asked > limit:
        raise BadRequestError(
            f"'{field}' is {asked}, over this tenant's limit of {limit} output tokens "
            f"(max_output_tokens) for '{route.name}'.",
            code="max_tokens_exceeded",
            param=field,
        )
    return int(asked)


def _horizon_s(policy: Policy, route: ModelRoute, ttl_s: float) -> float:
    """How long a request may legitimately hold its lease: the longest queue
    wait plus the upstream deadline (renewal stops after that)."""
    return policy.longest_queue_wait_s + route.pool.timeouts.total_s + ttl_s


@dataclass(frozen=True, slots=True)
class _Refusal:
    error: RateLimitError
    limit: str
    """The kind of the limit reported (one of `COUNTED`)."""


def _refusal(admission: Admission, requested: int, headers: dict[str, str]) -> _Refusal:
    figure = admission.decisive
    assert figure is not None  # a refused admission has a refusing limit
    error = RateLimitError(
        _message(figure, requested),
        retry_after_s=admission.retry_after_s,
        code=figure.code,
        error_type=_error_type(figure),
        headers=headers,
    )
    return _Refusal(error, figure.kind)


def _error_type(figure: Figure) -> str:
    # OpenAI's `type` for 429s: what ran out.
    if figure.code == "insufficient_quota":
        return "insufficient_quota"
    return "tokens" if figure.kind == "tokens_per_minute" else "requests"


def _message(figure: Figure, requested: int) -> str:
    words = _WORDS[figure.kind]
    asked = 1 if figure.kind in ("requests_per_minute", "max_concurrent") else requested
    if figure.never_fits:
        return (
            f"Request too large for {figure.scope} on {words}: Limit {figure.limit}, "
            f"Requested {asked}. Reduce the prompt or max_tokens."
        )
    wait = format_duration(figure.retry_after_s or 0.0)
    if figure.code == "insufficient_quota":
        return (
            f"{figure.scope} has exhausted its {words} budget: Limit {figure.limit}, "
            f"Used {figure.used}, Requested {asked}. It resets in {wait}."
        )
    return (
        f"Rate limit reached for {figure.scope} on {words}: Limit {figure.limit}, "
        f"Used {figure.used}, Requested {asked}. Please try again in {wait}."
    )


def build_quota(settings: GatewaySettings, *, clock: Callable[[], float] | None = None) -> Quota:
    """The store named by `TOLLGATE_STORE`, guarded when remote, and its keeper."""
    ttl = settings.quota_lease_ttl_s
    store: QuotaStore
    if settings.store == "redis":
        from gateway.quota.redis_store import RedisQuotaStore, connect

        client = connect(settings.redis_url, timeout_s=settings.redis_timeout_s)
        breaker = CircuitBreaker(
            failure_threshold=settings.quota_breaker_failures,
            reset_after_s=settings.quota_breaker_reset_s,
        )
        store = GuardedStore(
            RedisQuotaStore(client, lease_ttl_s=ttl, clock=clock),
            breaker,
            # A hard bound above the socket timeouts: connect + one round trip.
            timeout_s=settings.redis_timeout_s * 2,
        )
    else:
        store = MemoryQuotaStore(lease_ttl_s=ttl, clock=clock or time.time)
    return Quota(store, lease_ttl_s=ttl, ledger=True, charge_unknown=settings.ledger_charge_unknown)
