"""OpenAI's rate-limit response headers, from an admission's figures.

    x-ratelimit-limit-requests      x-ratelimit-limit-tokens
    x-ratelimit-remaining-requests  x-ratelimit-remaining-tokens
    x-ratelimit-reset-requests      x-ratelimit-reset-tokens

Requests report the requests_per_minute limit with the least room left
across the request's scopes (tenant, app, per-model); tokens report the token
limit with the least room left among tokens_per_minute, tokens_per_day and
tokens_per_month. Resets are durations in OpenAI's (Go's) format, `"17ms"`,
`"1s"`, `"8.64s"`, `"6m0s"`, `"1h0m0s"`: the time until that limit is back
to its full value (the sliding window empties, or the day or month ends).
A kind with no limit configured gets no headers.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.quota.store import Figure

TOKEN_KINDS = frozenset({"tokens_per_minute", "tokens_per_day", "tokens_per_month"})


def format_duration(seconds: float) -> str:
    """`seconds` as OpenAI writes resets: `17ms`, `1s`, `1.5s`, `6m0s`, `2h3m4s`."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _tightest(figures: Iterable[Figure]) -> Figure | None:
    # Least room left; on a tie, the one that takes longer to reset.
    return min(figures, key=lambda f: (f.remaining, -f.reset_s), default=None)


def rate_limit_headers(figures: Iterable[Figure]) -> dict[str, str]:
    """The `x-ratelimit-*` headers for these figures (empty when no limit applies)."""
    figures = list(figures)
    headers: dict[str, str] = {}
    chosen = {
        "requests": _tightest(f for f in figures if f.kind == "requests_per_minute"),
        "tokens": _tightest(f for f in figures if f.kind in TOKEN_KINDS),
    }
    for what, figure in chosen.items():
        if figure is not None:
            headers[f"x-ratelimit-limit-{what}"] = str(figure.limit)
            headers[f"x-ratelimit-remaining-{what}"] = str(figure.remaining)
            headers[f"x-ratelimit-reset-{what}"] = format_duration(figure.reset_s)
    return headers
