"""The usage record: what one admitted request used, never what it said.

A request's record is drafted when it is admitted (`RecordDraft`), filled in
on the request path (replica, first token, reported usage, outcome), and
handed to the quota store as an encoded `UsageEntry` by the same call that
settles or releases the request's lease, so the store appends it in the same
atomic step (a Lua script with Redis; one synchronous call in memory).

At admission the store also keeps an *open* record: the draft as it stands,
with status `interrupted` and the tokens that policy charges when usage is
unknown. If the gateway dies and the lease expires, the code that reclaims
the lease closes that record (end time, latency) and appends it.

Keys: `request_id` is Tollgate's own id for one admitted request (the quota
lease id, a fresh UUID), unique even when a client repeats its
`x-request-id`, which is kept as `client_request_id`.

Records are JSON objects (fields absent when null, false or zero) so that the
Redis script can close an open record by appending two fields, and DuckDB
reads a batch of them as newline-delimited JSON into Parquet.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import msgspec

from gateway.errors import ClientClosedRequestError, GatewayError

Status = Literal["ok", "error", "cancelled", "interrupted"]
ChargeUnknown = Literal["reserved", "prompt", "none"]
"""What a record charges when the backend's usage never came back (client
gone mid-stream, backend broke, gateway died): the whole reservation (prompt
estimate + max_tokens, the default), the prompt estimate only, or nothing."""

STATUSES: tuple[Status, ...] = ("ok", "error", "cancelled", "interrupted")


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One encoded record, as a store appends it."""

    day: str
    """UTC day the request started (`YYYY-MM-DD`): its ledger partition."""
    data: bytes
    """The record as a JSON object."""
    started_ms: int = 0
    check: bool = False
    """Another record with the same request id may exist (a repeated
    settlement, a late one after the lease was reclaimed, an interrupted
    record): exports de-duplicate flagged ids."""
    only_if_known: bool = False
    """Append only when the store still knows the lease (a cleanup after an
    admit whose reply was lost must not invent a record)."""


class UsageRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The record's fields (docs/ledger.md has the Parquet schema)."""

    request_id: str
    started_ms: int
    tenant: str
    model_requested: str
    model: str
    status: str
    client_request_id: str | None = None
    app: str | None = None
    user: str | None = None
    model_version: str | None = None
    upstream_model: str | None = None
    replica: str | None = None
    route: str | None = None
    priority: str | None = None
    streamed: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reserved_tokens: int = 0
    usage_reported: bool = False
    http_status: int | None = None
    error_code: str | None = None
    ttft_ms: float | None = None
    ended_ms: int | None = None
    latency_ms: float | None = None


_encode = msgspec.json.Encoder().encode


class ReportedUsage(Protocol):
    """Token counts read from a backend response (`gateway.api.sse.StreamUsage`)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    seen: bool


def utc_day(epoch_ms: int) -> str:
    """`YYYY-MM-DD` of a Unix time in milliseconds, in UTC."""
    # Unix days are exactly 86,400 s: the day number names the date.
    return _day_name(epoch_ms // _MS_PER_DAY)


_MS_PER_DAY = 86_400_000


@functools.lru_cache(maxsize=4)
def _day_name(day_number: int) -> str:
    # Every record asks (twice); formatting the date each time cost about 1%
    # of the gateway's CPU per request.
    return time.strftime("%Y-%m-%d", time.gmtime(day_number * 86_400))


def unknown_tokens(charge: ChargeUnknown, prompt_estimate: int, reserved: int) -> tuple[int, int]:
    """(prompt, completion) tokens charged when usage is unknown."""
    if charge == "reserved":
        return prompt_estimate, max(0, reserved - prompt_estimate)
    if charge == "prompt":
        return prompt_estimate, 0
    return 0, 0


def close_open_record(data: bytes, ended_ms: int, started_ms: int) -> bytes:
    """An open record with its end time and latency (what the Redis script
    does in Lua when it reclaims an expired lease)."""
    return data[:-1] + b',"ended_ms":%d,"latency_ms":%d}' % (ended_ms, ended_ms - started_ms)


@dataclass(slots=True)
class RecordDraft:
    """A request's record in the making; the request path fills it in."""

    tenant: str
    model_requested: str
    model: str
    streamed: bool = False
    started_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    started_perf: float = field(default_factory=time.perf_counter)
    """`time.perf_counter()` at the same instant as `started_ms`."""
    client_request_id: str | None = None
    app: str | None = None
    user: str | None = None
    model_version: str | None = None
    upstream_model: str | None = None
    route: str | None = None
    priority: str | None = None
    request_id: str = ""
    """Set at admission: the quota lease id."""
    prompt_estimate: int = 0
    reserved_tokens: int = 0
    replica: str | None = None
    ttft_ms: float | None = None
    status: Status | None = None
    http_status: int | None = None
    error_code: str | None = None
    reported: tuple[int, int, int] | None = None
    """(prompt, completion, cached) as the backend reported them."""

    @property
    def day(self) -> str:
        """The ledger partition of this request."""
        return utc_day(self.started_ms)

    def first_token(self) -> None:
        """The first bytes of the answer arrived (call on every chunk: cheap)."""
        if self.ttft_ms is None:
            self.ttft_ms = round((time.perf_counter() - self.started_perf) * 1000, 3)

    def observe(self, usage: ReportedUsage) -> None:
        """Keep the backend's reported usage, when it reported any."""
        if usage.seen:
            self.reported = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)

    def stream_ended(self, outcome: str) -> None:
        """A stream ended after its headers went out (HTTP status 200):
        `ok`, `cancelled` (the client left) or an error code."""
        self.http_status = 200
        if outcome == "ok":
            self.status = "ok"
        elif outcome == "cancelled":
            self.status = "cancelled"
        else:
            self.status = "error"
            self.error_code = outcome

    def failed(self, exc: BaseException) -> None:
        """The request ended with `exc` before a response was complete."""
        if self.status is not None:
            return
        if isinstance(exc, ClientClosedRequestError) or not isinstance(exc, Exception):
            # A disconnect while queued, or cancellation (the client left).
            self.status, self.http_status = "cancelled", 499
            self.error_code = "client_closed_request"
        elif isinstance(exc, GatewayError):
            self.status, self.http_status, self.error_code = "error", exc.status_code, exc.code
        else:
            self.status, self.http_status, self.error_code = "error", 500, "internal_error"

    def _record(self, status: Status, tokens: tuple[int, int, int], reported: bool) -> UsageRecord:
        return UsageRecord(
            request_id=self.request_id,
            started_ms=self.started_ms,
            tenant=self.tenant,
            model_requested=self.model_requested,
            model=self.model,
            status=status,
            client_request_id=self.client_request_id,
            app=self.app,
            user=self.user,
            model_version=self.model_version,
            upstream_model=self.upstream_model,
            replica=self.replica,
            route=self.route,
            priority=self.priority,
            streamed=self.streamed,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            cached_tokens=tokens[2],
            reserved_tokens=self.reserved_tokens,
            usage_reported=reported,
            http_status=self.http_status,
            error_code=self.error_code,
            ttft_ms=self.ttft_ms,
        )

    def open_entry(self, charge: ChargeUnknown) -> UsageEntry:
        """The record to append if the lease expires with nobody to settle it."""
        prompt, completion = unknown_tokens(charge, self.prompt_estimate, self.reserved_tokens)
        record = self._record("interrupted", (prompt, completion, 0), False)
        return UsageEntry(self.day, _encode(record), self.started_ms, check=True)

    def final_entry(
        self,
        charge: ChargeUnknown,
        *,
        reached_backend: bool,
        actual_tokens: int | None = None,
        check: bool = False,
        only_if_known: bool = False,
    ) -> UsageEntry:
        """The finished record. `reached_backend` False: nothing was consumed
        (zero tokens); else the reported usage, or `actual_tokens` split with
        the prompt estimate, or what `charge` says for unknown usage."""
        reported = False
        if not reached_backend:
            tokens = (0, 0, 0)
        elif self.reported is not None:
            tokens, reported = self.reported, True
        elif actual_tokens is not None:
            prompt = min(self.prompt_estimate, actual_tokens)
            tokens, reported = (prompt, actual_tokens - prompt, 0), True
        else:
            prompt, completion = unknown_tokens(charge, self.prompt_estimate, self.reserved_tokens)
            tokens = (prompt, completion, 0)
        status: Status = self.status or ("ok" if reached_backend else "error")
        if self.http_status is None:
            self.http_status = 200 if status == "ok" else None
        record = self._record(status, tokens, reported)
        latency_ms = round((time.perf_counter() - self.started_perf) * 1000, 3)
        record.ended_ms = self.started_ms + round(latency_ms)
        record.latency_ms = latency_ms
        return UsageEntry(
            self.day, _encode(record), self.started_ms, check=check, only_if_known=only_if_known
        )
