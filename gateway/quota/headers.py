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


def _tighter(figure: Figure, best: Figure | None) -> bool:
    # Least room left; on a tie, the one that takes longer to reset.
    if best is None:
        return True
    room, best_room = figure.remaining, best.remaining
    return room < best_room or (room == best_room and figure.reset_s > best.reset_s)


def rate_limit_headers(figures: Iterable[Figure]) -> dict[str, str]:
    """The `x-ratelimit-*` headers for these figures (empty when no limit applies)."""
    # One pass, no intermediate lists: this runs on every admitted request.
    requests: Figure | None = None
    tokens: Figure | None = None
    for figure in figures:
        kind = figure.kind
        if kind == "requests_per_minute":
            if _tighter(figure, requests):
                requests = figure
        elif kind in TOKEN_KINDS and _tighter(figure, tokens):
            tokens = figure
    headers: dict[str, str] = {}
    for what, chosen in (("requests", requests), ("tokens", tokens)):
        if chosen is not None:
            headers[f"x-ratelimit-limit-{what}"] = str(chosen.limit)
            headers[f"x-ratelimit-remaining-{what}"] = str(chosen.remaining)
            headers[f"x-ratelimit-reset-{what}"] = format_duration(chosen.reset_s)
    return headers
