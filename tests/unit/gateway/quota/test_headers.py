"""OpenAI's x-ratelimit-* headers from admission figures."""

from __future__ import annotations

import pytest

from gateway.quota.headers import format_duration, rate_limit_headers
from gateway.quota.store import Figure


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.017, "17ms"),
        (0.9994, "999ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (90.5, "1m30.5s"),
        (3600, "1h0m0s"),
        (23 * 3600 - 1, "22h59m59s"),
        (-3, "0s"),
    ],
)
def test_durations_in_openai_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_tightest_limit_of_each_kind_is_reported() -> None:
    figures = [
        Figure("requests_per_minute", "tenant", 600, 10, 60.0),
        Figure("requests_per_minute", "app", 20, 10, 60.0),
        Figure("tokens_per_minute", "tenant", 1000, 900, 60.0),
        Figure("tokens_per_day", "tenant", 100_000, 50_000, 3600.0),
        Figure("max_concurrent", "tenant", 2, 2, 0.0),
    ]
    assert rate_limit_headers(figures) == {
        "x-ratelimit-limit-requests": "20",
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "1m0s",
    }


def test_a_budget_near_its_end_is_the_token_figure() -> None:
    figures = [
        Figure("tokens_per_minute", "tenant", 1000, 0, 0.0),
        Figure("tokens_per_day", "tenant", 100_000, 99_990, 7200.0),
    ]
    headers = rate_limit_headers(figures)
    assert headers["x-ratelimit-remaining-tokens"] == "10"
    assert headers["x-ratelimit-reset-tokens"] == "2h0m0s"
    assert "x-ratelimit-limit-requests" not in headers


def test_no_limits_no_headers() -> None:
    assert rate_limit_headers([Figure("max_concurrent", "t", 1, 0, 0.0)]) == {}
