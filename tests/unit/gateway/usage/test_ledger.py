"""The Parquet ledger: durable day files, crash-safe merges, retention."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import duckdb

from gateway.usage.ledger import COMPACT_MIN_FILES, Ledger, Line
from tests.unit.gateway.usage.conftest import at_ms, entry, line


def rows(ledger: Ledger, start: dt.date, end: dt.date) -> list[tuple[str, str, bool]]:
    files = [str(f) for f in ledger.files(start, end)]
    if not files:
        return []
    return duckdb.sql(
        f"SELECT tenant, status, dedup_check FROM read_parquet({files}) ORDER BY tenant"
    ).fetchall()


def test_a_batch_is_written_one_durable_file_per_day(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    jan = entry("a", prompt=1, started_ms=at_ms(2025, 1, 31, 23, 59, 59))
    feb = entry("b", prompt=2, started_ms=at_ms(2025, 2, 1))
    files = ledger.write([line(jan), line(feb, check=True)])
    assert [f.parent.name for f in files] == ["day=2025-01-31", "day=2025-02-01"]
    assert all(f.name.startswith("part-") and f.suffix == ".parquet" for f in files)
    assert not list((tmp_path / ".staging").iterdir())  # nothing left half-written
    assert ledger.days() == [dt.date(2025, 1, 31), dt.date(2025, 2, 1)]
    assert rows(ledger, dt.date(2025, 1, 1), dt.date(2025, 12, 31)) == [
        ("a", "ok", False),
        ("b", "ok", True),
    ]
    schema = dict(
        duckdb.sql(f"DESCRIBE SELECT * FROM '{files[0]}'").fetchall()[i][:2] for i in range(26)
    )
    assert schema["request_id"] == "UUID" and schema["started_at"] == "TIMESTAMP"
    assert schema["prompt_tokens"] == "BIGINT" and "dedup_check" in schema


def test_a_line_that_is_not_a_record_is_quarantined_not_blocking(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    good = entry("a", prompt=1, started_ms=at_ms(2025, 1, 2))
    ledger.write([line(good), Line(good.day, b'{"request_id": "not-a-uuid", "x": 1}')])
    assert rows(ledger, dt.date(2025, 1, 2), dt.date(2025, 1, 2)) == [("a", "ok", False)]
    (quarantined,) = (tmp_path / "quarantine").iterdir()
    assert b"not-a-uuid" in quarantined.read_bytes()


def test_small_files_are_merged_and_a_crash_mid_merge_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    today = dt.date(2025, 3, 10)
    day = dt.date(2025, 3, 10)
    for i in range(COMPACT_MIN_FILES):
        ledger.write([line(entry(f"t{i}", prompt=1, started_ms=at_ms(2025, 3, 10, 1)))])
    assert len(ledger.day_files(day)) == COMPACT_MIN_FILES
    ledger.maintain(today)
    (merged,) = ledger.day_files(day)
    assert merged.name.startswith("compact-")
    assert len(rows(ledger, day, day)) == COMPACT_MIN_FILES

    # A crash after the merge's commit but before its sources were deleted:
    # readers skip the sources, and maintenance finishes the job.
    sources = [ledger.write([line(entry("x", prompt=1, started_ms=at_ms(2025, 3, 10, 2)))])[0]]
    sources += ledger.write([line(entry("y", prompt=1, started_ms=at_ms(2025, 3, 10, 3)))])
    copy = merged.parent / "compact-crashed.parquet"
    names = [str(s) for s in sources]
    duckdb.sql(f"COPY (SELECT * FROM read_parquet({names})) TO '{copy}' (FORMAT parquet)")
    (merged.parent / "compact-crashed.replaces").write_text(json.dumps([s.name for s in sources]))
    assert len(rows(ledger, day, day)) == COMPACT_MIN_FILES + 2
    # A manifest whose merged file never arrived (crash before the commit) is ignored.
    (merged.parent / "compact-never.replaces").write_text(json.dumps([merged.name]))
    assert len(rows(ledger, day, day)) == COMPACT_MIN_FILES + 2
    ledger.maintain(today)
    assert not any(s.exists() for s in sources)
    assert not list(merged.parent.glob("*.replaces"))
    assert len(rows(ledger, day, day)) == COMPACT_MIN_FILES + 2


def test_a_closed_day_is_merged_into_one_file(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    for hour in (1, 2, 3):
        ledger.write([line(entry("a", prompt=hour, started_ms=at_ms(2025, 3, 1, hour)))])
    ledger.maintain(dt.date(2025, 3, 2))  # yesterday is still open: late records come
    assert len(ledger.day_files(dt.date(2025, 3, 1))) == 3
    ledger.maintain(dt.date(2025, 3, 3))
    assert len(ledger.day_files(dt.date(2025, 3, 1))) == 1


def test_retention_deletes_old_days(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    for day in (1, 5, 10):
        ledger.write([line(entry("a", prompt=1, started_ms=at_ms(2025, 3, day)))])
    ledger.maintain(dt.date(2025, 3, 10), retention_days=5)
    assert ledger.days() == [dt.date(2025, 3, 5), dt.date(2025, 3, 10)]
    ledger.maintain(dt.date(2025, 3, 10), retention_days=0)  # 0 keeps everything
    assert len(ledger.days()) == 2
    assert os.listdir(tmp_path / "day=2025-03-05")
