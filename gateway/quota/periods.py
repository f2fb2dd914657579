"""Calendar periods for daily and monthly budgets, in a tenant's time zone.

A day runs from local midnight to the next local midnight (23 or 25 hours
on a daylight-saving change), a month from the 1st at local midnight. A
period is named by its local date (`2025-03-09`, `2025-03`), which is also
the suffix of its counter's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Unit = Literal["day", "month"]


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar day or month: `[start_s, end_s)` in Unix seconds."""

    label: str
    start_s: float
    end_s: float


def _midnight(day: date, zone: ZoneInfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def period_at(unit: Unit, now_s: float, zone: str) -> Period:
    """The day or month of `zone` that contains the instant `now_s`."""
    tz = ZoneInfo(zone)
    local = datetime.fromtimestamp(now_s, tz).date()
    if unit == "day":
        return Period(
            local.isoformat(), _midnight(local, tz), _midnight(local + timedelta(days=1), tz)
        )
    first = local.replace(day=1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return Period(
        f"{first.year:04d}-{first.month:02d}", _midnight(first, tz), _midnight(following, tz)
    )


def periods_around(unit: Unit, now_s: float, zone: str) -> tuple[Period, Period, Period]:
    """The period containing `now_s` with the one before and the one after.

    The Redis store sends all three and lets the script pick by the Redis
    server's clock, so replicas whose clocks disagree near midnight still
    charge the same day.
    """
    current = period_at(unit, now_s, zone)
    before = period_at(unit, current.start_s - 1, zone)
    after = period_at(unit, current.end_s + 1, zone)
    return before, current, after


class PeriodCache:
    """`periods_around` computed once per period per zone: admission asks on
    every request, and the answer changes only at midnight."""

    def __init__(self) -> None:
        self._around: dict[tuple[Unit, str], tuple[Period, Period, Period]] = {}

    def around(self, unit: Unit, now_s: float, zone: str) -> tuple[Period, Period, Period]:
        """Same as `periods_around`."""
        found = self._around.get((unit, zone))
        if found is not None and found[1].start_s <= now_s < found[1].end_s:
            return found
        found = periods_around(unit, now_s, zone)
        self._around[(unit, zone)] = found
        return found

    def at(self, unit: Unit, now_s: float, zone: str) -> Period:
        """Same as `period_at`."""
        return self.around(unit, now_s, zone)[1]
