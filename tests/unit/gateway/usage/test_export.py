"""Exports: de-duplicated, grouped, priced with the price in force when each
request started; figures checked against a hand computation."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from decimal import Decimal
from pathlib import Path

import duckdb
import msgspec
import pytest

from gateway.usage.export import ExportError, ExportQuery, parse_query, render, run_export
from gateway.usage.ledger import Ledger, Line
from gateway.usage.record import close_open_record
from tests.unit.gateway.usage.conftest import PRICING, at_ms, draft, entry, line


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """A fixed fixture across the price change of 2025-02-01 (see PRICING)."""
    ledger = Ledger(tmp_path)
    r1 = entry(
        "a", app="x", prompt=1000, cached=200, completion=500, started_ms=at_ms(2025, 1, 31, 12)
    )
    r2 = entry("a", app="y", prompt=1000, completion=1000, started_ms=at_ms(2025, 2, 1))
    r3 = entry("b", prompt=10, started_ms=at_ms(2025, 1, 31, 23, 59, 59) + 999)
    # r5: its gateway was too slow, so its lease expired (interrupted), then
    # the late settlement arrived: the settled record counts.
    r5_id = uuid.uuid4().hex
    r5_start = at_ms(2025, 2, 1, 10)
    stale = draft("a", app="x", request_id=r5_id, started_ms=r5_start, reserved=150)
    stale.prompt_estimate = 50
    opened = stale.open_entry("reserved")
    interrupted = Line(
        opened.day, close_open_record(opened.data, r5_start + 60_000, r5_start), True
    )
    late = entry("a", app="x", prompt=40, completion=10, request_id=r5_id, started_ms=r5_start)
    r6 = entry("a", app="x", model="gone", prompt=5, completion=5, started_ms=at_ms(2025, 2, 1, 9))
    r7 = entry("c", prompt=99, started_ms=at_ms(2025, 2, 2))
    ledger.write([line(r1), line(r2), line(r3), interrupted, line(r6), line(r7)])
    # The drainer died after writing r1 and r2 and before acknowledging:
    # written again, flagged.
    ledger.write([line(r1, check=True), line(r2, check=True), line(late, check=True)])
    return ledger


def export(ledger: Ledger, group_by: str, **kwargs: object) -> tuple[list[dict], dict]:
    query = parse_query("2025-01-31", "2025-02-01", group_by=group_by, **kwargs)  # type: ignore[arg-type]
    result = run_export(ledger, PRICING, query)
    return result.rows, result.totals


def test_figures_equal_a_hand_computation_across_a_price_change(ledger: Ledger) -> None:
    rows, totals = export(ledger, "tenant")
    # a: r1 at January prices: (800 * 1.00 + 200 * 0.50 + 500 * 2.00) / 1e6 = 0.0019
    #    r2 at February prices: (1000 * 2.00 + 1000 * 4.00) / 1e6      = 0.006
    #    r5 (settled, not interrupted): (40 * 2.00 + 10 * 4.00) / 1e6  = 0.00012
    #    r6: model `gone` has no price: counted, unpriced
    # b: r3, the last millisecond of January: 10 * 1.00 / 1e6          = 0.00001
    assert rows == [
        {
            "tenant": "a",
            "requests": 4,
            "prompt_tokens": 2045,
            "cached_tokens": 200,
            "completion_tokens": 1515,
            "total_tokens": 3560,
            "cost": Decimal("0.00802"),
            "unpriced_requests": 1,
        },
        {
            "tenant": "b",
            "requests": 1,
            "prompt_tokens": 10,
            "cached_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 10,
            "cost": Decimal("0.00001"),
            "unpriced_requests": 0,
        },
    ]
    assert totals["requests"] == 5 and totals["cost"] == Decimal("0.00803")
    assert totals["total_tokens"] == 3570


def test_grouped_by_day_and_app(ledger: Ledger) -> None:
    rows, _ = export(ledger, "tenant,day,app")
    got = {(r["tenant"], r["day"], r["app"]): (r["requests"], r["cost"]) for r in rows}
    assert got == {
        ("a", "2025-01-31", "x"): (1, Decimal("0.0019")),
        ("a", "2025-02-01", "x"): (2, Decimal("0.00012")),
        ("a", "2025-02-01", "y"): (1, Decimal("0.006")),
        ("b", "2025-01-31", None): (1, Decimal("0.00001")),
    }


def test_checking_every_id_gives_the_same_figures(ledger: Ledger) -> None:
    flagged = run_export(ledger, PRICING, parse_query("2025-01-01", "2025-12-31"))
    audited = run_export(
        ledger, PRICING, ExportQuery(dt.date(2025, 1, 1), dt.date(2025, 12, 31), dedup="all")
    )
    assert flagged.rows == audited.rows
    assert flagged.totals["requests"] == 6  # r7 is in range now


def test_one_tenant(ledger: Ledger) -> None:
    rows, totals = export(ledger, "model", tenant="a")
    assert [(r["model"], r["requests"]) for r in rows] == [("gone", 1), ("m", 3)]
    assert totals["cost"] == Decimal("0.00802")


def test_formats_end_with_the_totals(ledger: Ledger, tmp_path: Path) -> None:
    result = run_export(ledger, PRICING, parse_query("2025-01-31", "2025-02-01", group_by="tenant"))
    table = list(csv.reader(io.StringIO(render(result, "csv").decode())))
    assert table[0] == [
        "tenant",
        "requests",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
        "unpriced_requests",
        "currency",
    ]
    assert table[1][:2] == ["a", "4"] and table[1][6] == "0.00802"
    assert table[-1] == ["total", "5", "2055", "200", "1515", "3570", "0.00803", "1", "USD"]
    body = msgspec.json.decode(render(result, "json"))
    assert body["totals"]["cost"] == "0.00803" and body["currency"] == "USD"
    assert [r["tenant"] for r in body["data"]] == ["a", "b"]
    path = tmp_path / "export.parquet"
    path.write_bytes(render(result, "parquet"))
    parquet = duckdb.sql(f"SELECT tenant, requests, cost FROM '{path}'").fetchall()
    assert parquet[-1] == ("total", 5, Decimal("0.008030000000"))


def test_an_empty_range_has_zero_totals(tmp_path: Path) -> None:
    result = run_export(Ledger(tmp_path), PRICING, parse_query("2024-01-01", "2024-01-02"))
    assert result.rows == [] and result.totals["requests"] == 0


@pytest.mark.parametrize(
    ("start", "end", "group_by", "param"),
    [
        (None, "2025-01-01", None, "from"),
        ("2025-01-02", "2025-01-01", None, "to"),
        ("2025-1-2", "2025-01-03", None, "from"),
        ("2025-01-01", "2025-01-02", "tenant,prompt", "group_by"),
    ],
)
def test_bad_parameters(start: str | None, end: str, group_by: str | None, param: str) -> None:
    with pytest.raises(ExportError) as info:
        parse_query(start, end, group_by=group_by)
    assert info.value.param == param
