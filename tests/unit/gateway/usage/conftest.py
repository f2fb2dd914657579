"""Helpers for the usage ledger's unit tests: records with chosen fields."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from types import MappingProxyType

from gateway.policy.compiled import Price, Pricing
from gateway.usage.ledger import Line
from gateway.usage.record import RecordDraft, Status, UsageEntry


def at_ms(*args: int) -> int:
    """Unix ms of a UTC wall-clock time: at_ms(2025, 1, 31, 23, 59)."""
    return round(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)  # type: ignore[misc]


def draft(
    tenant: str = "acme",
    *,
    model: str = "m",
    app: str | None = None,
    started_ms: int | None = None,
    request_id: str | None = None,
    reserved: int = 100,
    prompt_estimate: int = 10,
) -> RecordDraft:
    d = RecordDraft(tenant, model, model, app=app, user="sub-1", priority="standard")
    if started_ms is not None:
        d.started_ms = started_ms
    d.request_id = request_id or uuid.uuid4().hex
    d.reserved_tokens, d.prompt_estimate = reserved, prompt_estimate
    return d


class Usage:
    def __init__(self, prompt: int, completion: int, cached: int = 0) -> None:
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = prompt, completion, cached
        self.seen = True


def entry(
    tenant: str = "acme",
    *,
    prompt: int = 0,
    completion: int = 0,
    cached: int = 0,
    status: Status = "ok",
    check: bool = False,
    **kwargs: object,
) -> UsageEntry:
    """A finished record (usage reported) as a store would append it."""
    d = draft(tenant, **kwargs)  # type: ignore[arg-type]
    d.observe(Usage(prompt, completion, cached))
    d.status = status
    return d.final_entry("reserved", reached_backend=True, check=check)


def line(e: UsageEntry, check: bool | None = None) -> Line:
    return Line(e.day, e.data, e.check if check is None else check)


PRICING = Pricing(
    "USD",
    MappingProxyType(
        {
            "m": (
                Price(dt.date(2025, 1, 1), Decimal("1.00"), Decimal("2.00"), Decimal("0.50")),
                Price(dt.date(2025, 2, 1), Decimal("2.00"), Decimal("4.00"), Decimal("1.00")),
            )
        }
    ),
)
"""Model `m` doubles its prices on 2025-02-01 (per million tokens)."""
