"""Priced usage exports: DuckDB over the Parquet ledger.

One export is a date range (UTC days, inclusive), an optional tenant and a
grouping (`tenant`, `app`, `model`, `day`, and also `user`, `status`,
`priority`). Each row has the request count, tokens by kind and the cost;
the totals follow the rows.

De-duplication by request id. A request has one record, but a crash between
writing a file and acknowledging its records, a retried settlement or a late
one after an `interrupted` record can leave two; every record that may have a
twin is written flagged (`dedup_check`). Ids with a flagged record are the
only ones that can repeat, so an export:

1. collects those ids (a scan of one boolean column);
2. sums every record (a plain aggregate, no join),
3. and corrects the sums: minus every copy of a flagged id, plus the one
   copy that counts (not `interrupted` when another exists, then the latest
   end).

Only the flagged ids and their copies pay for de-duplication, so an export
stays a single scan of the ledger however large it grows. `dedup="all"`
checks every id instead (an audit; a full hash of the ledger's ids).

DuckDB sums tokens per group and (model, day); pricing those sums, exactly,
in Python (`gateway.usage.pricing`) then gives the cost per row.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import duckdb
import msgspec

from gateway.policy.compiled import Pricing
from gateway.usage.ledger import Ledger
from gateway.usage.pricing import cost, format_money, price_on

GROUP_KEYS: tuple[str, ...] = ("tenant", "app", "model", "day", "user", "status", "priority")
DEFAULT_GROUP_BY: tuple[str, ...] = ("tenant", "model", "day")
METRICS: tuple[str, ...] = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "unpriced_requests",
)
Format = Literal["csv", "json", "parquet"]
Dedup = Literal["flagged", "all"]
MEDIA_TYPES: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "parquet": "application/vnd.apache.parquet",
}


class ExportError(ValueError):
    """The export's parameters are wrong; `param` names the culprit."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """What to export."""

    start: dt.date
    end: dt.date
    tenant: str | None = None
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    dedup: Dedup = "flagged"


@dataclass
class ExportResult:
    """Rows (sorted by their group values) and totals."""

    query: ExportQuery
    currency: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)


def parse_query(
    start: str | None,
    end: str | None,
    *,
    tenant: str | None = None,
    group_by: str | None = None,
) -> ExportQuery:
    """Validate the textual parameters (CLI flags, HTTP query) into a query."""
    first = _day(start, "from")
    last = _day(end, "to")
    if last < first:
        raise ExportError("'to' is before 'from'", "to")
    keys: tuple[str, ...] = DEFAULT_GROUP_BY
    if group_by is not None:
        keys = tuple(k.strip() for k in group_by.split(",") if k.strip())
        unknown = [k for k in keys if k not in GROUP_KEYS]
        if unknown:
            raise ExportError(
                f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUP_KEYS)}",
                "group_by",
            )
        if len(set(keys)) != len(keys):
            raise ExportError("a group_by key is repeated", "group_by")
    return ExportQuery(first, last, tenant or None, keys)


def _day(value: str | None, param: str) -> dt.date:
    if not value:
        raise ExportError(f"'{param}' is required (YYYY-MM-DD)", param)
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise ExportError(f"'{param}' must be a day, YYYY-MM-DD", param) from exc


def _files_sql(files: Sequence[Path]) -> str:
    quoted = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    return f"read_parquet([{quoted}], hive_partitioning = true, hive_types = {{'day': DATE}})"


def _sums(
    con: duckdb.DuckDBPyConnection, files: Sequence[Path], query: ExportQuery
) -> list[tuple[Any, ...]]:
    """(group values..., model, day, requests, prompt, cached, completion) rows."""
    source = _files_sql(files)
    where = "WHERE tenant = $tenant" if query.tenant else ""
    params: dict[str, object] = {"tenant": query.tenant} if query.tenant else {}
    keys = [k for k in query.group_by if k not in ("model", "day")] + ["model", "day"]
    key_sql = ", ".join(f'"{k}"' for k in keys)
    cols = f"request_id, ended_at, {key_sql}, prompt_tokens, cached_tokens, completion_tokens"
    if query.dedup == "all":
        suspects = (
            f"SELECT request_id FROM {source} {where} GROUP BY request_id HAVING count(*) > 1"
        )
    else:
        suspects = f"SELECT DISTINCT request_id FROM {source} {where} " + (
            "AND dedup_check" if where else "WHERE dedup_check"
        )
    con.execute(f"CREATE OR REPLACE TEMP TABLE suspects AS {suspects}", params)
    count = con.execute("SELECT count(*) FROM suspects").fetchone()
    if count is None or count[0] == 0:
        sql = (
            f"SELECT {key_sql}, count(*), sum(prompt_tokens), sum(cached_tokens), "
            f"sum(completion_tokens) FROM {source} {where} GROUP BY ALL"
        )
        return con.execute(sql, params).fetchall()
    # The ledger is read twice, never materialized: once whole, once probed
    # for the flagged ids (a tiny hash table).
    sql = f"""
        WITH copies AS (
            SELECT {cols}, status FROM (SELECT * FROM {source} {where})
            SEMI JOIN suspects USING (request_id)),
        best AS (
            SELECT * FROM copies QUALIFY row_number() OVER (
                PARTITION BY request_id
                ORDER BY (status = 'interrupted'), ended_at DESC NULLS LAST) = 1)
        SELECT {key_sql}, sum(n), sum(p), sum(k), sum(c) FROM (
            SELECT {key_sql}, 1 AS n, prompt_tokens AS p, cached_tokens AS k,
                   completion_tokens AS c FROM {source} {where}
            UNION ALL
            SELECT {key_sql}, -1, -prompt_tokens, -cached_tokens, -completion_tokens FROM copies
            UNION ALL
            SELECT {key_sql}, 1, prompt_tokens, cached_tokens, completion_tokens FROM best
        ) GROUP BY ALL HAVING sum(n) <> 0
    """
    return con.execute(sql, params).fetchall()


def run_export(
    ledger: Ledger, pricing: Pricing, query: ExportQuery, *, threads: int | None = None
) -> ExportResult:
    """Run `query` over `ledger` (blocking: call it in a worker thread)."""
    config: dict[str, Any] = {} if threads is None else {"threads": threads}
    for attempt in range(3):
        files = ledger.files(query.start, query.end)
        if not files:
            return _priced(query, pricing, [])
        con = duckdb.connect(config=config)
        try:
            return _priced(query, pricing, _sums(con, files, query))
        except duckdb.IOException:
            # A merge replaced a file between listing and reading: list again.
            if attempt == 2:
                raise
        finally:
            con.close()
    raise AssertionError("unreachable")


def _priced(query: ExportQuery, pricing: Pricing, sums: list[tuple[Any, ...]]) -> ExportResult:
    keys = [k for k in query.group_by if k not in ("model", "day")] + ["model", "day"]
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    result = ExportResult(query, pricing.currency)
    for raw in sums:
        values = dict(zip(keys, raw[: len(keys)], strict=True))
        requests, prompt, cached, completion = (int(v or 0) for v in raw[len(keys) :])
        day: dt.date = values["day"]
        values["day"] = day.isoformat()
        price = price_on(pricing, values["model"], day)
        group = tuple(values[k] for k in query.group_by)
        row = groups.get(group)
        if row is None:
            row = groups[group] = dict(zip(query.group_by, group, strict=True))
            row.update(
                requests=0,
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                total_tokens=0,
                cost=Decimal(0),
                unpriced_requests=0,
            )
        row["requests"] += requests
        row["prompt_tokens"] += prompt
        row["cached_tokens"] += cached
        row["completion_tokens"] += completion
        row["total_tokens"] += prompt + completion
        if price is None:
            row["unpriced_requests"] += requests
        else:
            row["cost"] += cost(price, prompt, cached, completion)
    result.rows = [groups[g] for g in sorted(groups, key=_sort_key)]
    totals: dict[str, Any] = {m: 0 for m in METRICS}
    totals["cost"] = Decimal(0)
    for row in result.rows:
        for metric in METRICS:
            totals[metric] += row[metric]
    result.totals = totals
    return result


def _sort_key(group: tuple[Any, ...]) -> tuple[tuple[bool, str], ...]:
    return tuple((v is None, "" if v is None else str(v)) for v in group)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["cost"] = format_money(row["cost"])
    return out


def render(result: ExportResult, fmt: Format) -> bytes:
    """The export as CSV (totals as the last row, first column `total`),
    JSON (`data` and `totals`) or Parquet (like CSV)."""
    if fmt == "json":
        body = {
            "object": "usage.export",
            "from": result.query.start.isoformat(),
            "to": result.query.end.isoformat(),
            "tenant": result.query.tenant,
            "group_by": list(result.query.group_by),
            "currency": result.currency,
            "data": [_jsonable(r) for r in result.rows],
            "totals": _jsonable(result.totals),
        }
        return msgspec.json.encode(body)
    columns = [*result.query.group_by, *METRICS, "currency"]
    table = [_table_row(result, row) for row in result.rows]
    table.append(_table_row(result, result.totals, total=True))
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for values in table:
            writer.writerow("" if v is None else v for v in values)
        return out.getvalue().encode()
    return _parquet(result, columns, table)


def _table_row(result: ExportResult, row: dict[str, Any], *, total: bool = False) -> list[Any]:
    keys = result.query.group_by
    if total:
        group: list[Any] = ["total", *([None] * (len(keys) - 1))] if keys else []
    else:
        group = [row[k] for k in keys]
    metrics = [format_money(row[m]) if m == "cost" else row[m] for m in METRICS]
    return [*group, *metrics, result.currency]


def _parquet(result: ExportResult, columns: list[str], table: list[list[Any]]) -> bytes:
    types = {k: "VARCHAR" for k in result.query.group_by}
    types.update({m: "BIGINT" for m in METRICS})
    types["cost"] = "DECIMAL(38, 12)"
    types["currency"] = "VARCHAR"
    spec = "{" + ", ".join(f"'{c}': '{types[c]}'" for c in columns) + "}"
    encode = msgspec.json.Encoder().encode
    with tempfile.TemporaryDirectory(prefix="tollgate-export-") as tmp:
        source, target = Path(tmp) / "rows.ndjson", Path(tmp) / "export.parquet"
        source.write_bytes(
            b"".join(encode(dict(zip(columns, r, strict=True))) + b"\n" for r in table)
        )
        con = duckdb.connect(config={"threads": 1})
        try:
            select = ", ".join(f'"{c}"' for c in columns)
            con.execute(
                f"COPY (SELECT {select} FROM read_json('{source}', "
                f"format='newline_delimited', columns={spec})) "
                f"TO '{target}' (FORMAT parquet, COMPRESSION zstd)"
            )
        finally:
            con.close()
        return target.read_bytes()
