"""Pricing usage (pure): the price in force when a request started, per model.

Prices are per million tokens (`policies/pricing.yaml`), by model, each with
an `effective_from` UTC day; a record is priced with the entry in force on
the UTC day its request started. OpenAI's `prompt_tokens` include the cached
ones, so the input cost is

    (prompt - cached) * input_per_million + cached * cached_input_per_million

plus `completion * output_per_million`, all over one million, in exact
decimals. Prices apply linearly, so summing tokens per (model, day) first and
pricing the sums gives the same figure as pricing every record.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from gateway.policy.compiled import Price, Pricing

MILLION = Decimal(1_000_000)


def cost(price: Price, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Decimal:
    """What these tokens cost at `price` (exact)."""
    cached = min(cached_tokens, prompt_tokens)
    total = (
        (prompt_tokens - cached) * price.input_per_million
        + cached * price.cached_input_per_million
        + completion_tokens * price.output_per_million
    )
    return total / MILLION


def price_on(pricing: Pricing, model: str, day: dt.date) -> Price | None:
    """The price of `model` in force on `day`, or None (no price yet or any more)."""
    return pricing.price_for(model, day)


def format_money(amount: Decimal) -> str:
    """A decimal as plain digits, without exponent or trailing zeros (`0.000132`)."""
    text = format(amount.normalize(), "f")
    return text if text not in ("-0", "") else "0"
