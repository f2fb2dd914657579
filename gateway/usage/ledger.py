"""The ledger on disk: append-only, day-partitioned Parquet files.

    <root>/day=YYYY-MM-DD/part-<uuid>.parquet      one drained batch of that day
    <root>/day=YYYY-MM-DD/compact-<uuid>.parquet   several files of that day, merged
    <root>/day=YYYY-MM-DD/compact-<uuid>.replaces  the files a merge replaces (transient)
    <root>/.staging/                               files being written (never read)
    <root>/quarantine/                             lines that were not valid records

A file appears in its day's folder only complete and durable: it is written
under `.staging/`, fsynced, renamed into place, and the folder is fsynced;
only then does the drainer acknowledge its records in the store. A crash
before the acknowledgement leaves the records in the store, so they are
written again (flagged `dedup_check`), and exports de-duplicate by request
id; a crash never loses a record.

Compaction keeps the number of files small: a day's small files are merged
into one once there are `COMPACT_MIN_FILES` of them, or two for a day that
is over. The merge is crash-safe: the list of files it replaces is made
durable first (`.replaces`), then the merged file is renamed into place (the
commit), then the replaced files are deleted. Readers skip files named by a
committed merge's list, so a crash at any point counts nothing twice.

Retention deletes whole day folders older than the configured number of days.

Records come in as JSON lines (`gateway.usage.record`); DuckDB reads them
with the fixed schema below and writes zstd-compressed Parquet.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import msgspec
import structlog

from gateway.usage.record import UsageRecord

log = structlog.get_logger("tollgate.usage")

COMPACT_MIN_FILES = 32
"""A day with this many files below `COMPACT_TARGET_BYTES` gets them merged."""
COMPACT_TARGET_BYTES = 128 * 2**20
"""Files at least this large are left alone by compaction."""

JSON_COLUMNS: dict[str, str] = {
    "request_id": "UUID",
    "client_request_id": "VARCHAR",
    "started_ms": "BIGINT",
    "ended_ms": "BIGINT",
    "tenant": "VARCHAR",
    "app": "VARCHAR",
    "user": "VARCHAR",
    "model_requested": "VARCHAR",
    "model": "VARCHAR",
    "model_version": "VARCHAR",
    "upstream_model": "VARCHAR",
    "replica": "VARCHAR",
    "route": "VARCHAR",
    "priority": "VARCHAR",
    "streamed": "BOOLEAN",
    "status": "VARCHAR",
    "http_status": "INTEGER",
    "error_code": "VARCHAR",
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "cached_tokens": "BIGINT",
    "reserved_tokens": "BIGINT",
    "usage_reported": "BOOLEAN",
    "ttft_ms": "DOUBLE",
    "latency_ms": "DOUBLE",
    "dedup_check": "BOOLEAN",
}
"""How DuckDB reads a record's JSON (absent keys are null)."""

_PARQUET_SELECT = """
    request_id, client_request_id,
    epoch_ms(started_ms) AS started_at, epoch_ms(ended_ms) AS ended_at,
    tenant, app, "user", model_requested, model, model_version, upstream_model,
    replica, route, priority, coalesce(streamed, false) AS streamed, status,
    http_status, error_code,
    coalesce(prompt_tokens, 0) AS prompt_tokens,
    coalesce(completion_tokens, 0) AS completion_tokens,
    coalesce(cached_tokens, 0) AS cached_tokens,
    coalesce(reserved_tokens, 0) AS reserved_tokens,
    coalesce(usage_reported, false) AS usage_reported,
    ttft_ms, latency_ms, coalesce(dedup_check, false) AS dedup_check
"""
"""The Parquet schema (docs/ledger.md): times as UTC timestamps."""

_FLAG = b',"dedup_check":true}'


@dataclass(frozen=True, slots=True)
class Line:
    """One record on its way into the ledger."""

    day: str
    data: bytes
    check: bool = False


def _sql_str(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def day_dir_name(day: str) -> str:
    """`day=YYYY-MM-DD`."""
    return f"day={day}"


def _parse_day(name: str) -> dt.date | None:
    if not name.startswith("day="):
        return None
    try:
        return dt.date.fromisoformat(name[4:])
    except ValueError:
        return None


class Ledger:
    """Writes, merges, expires and lists the ledger's files (blocking calls:
    run them in a worker thread; one writer at a time per folder)."""

    def __init__(self, root: Path, *, threads: int = 1) -> None:
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self._threads = threads
        self._con: duckdb.DuckDBPyConnection | None = None

    def _db(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = duckdb.connect(config={"threads": self._threads})
        return self._con

    def close(self) -> None:
        """Close the DuckDB connection (the next write opens a new one)."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def _prepare(self) -> None:
        if not self.staging.is_dir():
            self.staging.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root)

    # --- writing ---------------------------------------------------------

    def write(self, lines: Sequence[Line]) -> list[Path]:
        """Write `lines` durably, one new file per day; returns the files.

        When this returns, every line is on disk (fsynced file and folder).
        """
        if not lines:
            return []
        self._prepare()
        by_day: dict[str, list[bytes]] = {}
        for line in lines:
            data = line.data[:-1] + _FLAG if line.check else line.data
            by_day.setdefault(line.day, []).append(data)
        written = []
        for day, chunk in sorted(by_day.items()):
            written.append(self._write_day(day, chunk))
        return written

    def _write_day(self, day: str, chunk: list[bytes]) -> Path:
        name = f"part-{uuid.uuid4().hex}.parquet"
        staged = self.staging / name
        source = self.staging / (name + ".ndjson")
        source.write_bytes(b"\n".join(chunk) + b"\n")
        try:
            try:
                self._copy_json(source, staged)
            except duckdb.Error:
                # A line that is not a record must not block the ledger:
                # keep it aside, write the rest.
                good = self._quarantine(chunk)
                source.write_bytes(b"\n".join(good) + b"\n")
                self._copy_json(source, staged)
            return self._commit(staged, day)
        finally:
            source.unlink(missing_ok=True)

    def _copy_json(self, source: Path, target: Path) -> None:
        columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in JSON_COLUMNS.items()) + "}"
        self._db().execute(
            f"COPY (SELECT {_PARQUET_SELECT} FROM read_json({_sql_str(source)}, "
            f"format='newline_delimited', columns={columns})) "
            f"TO {_sql_str(target)} (FORMAT parquet, COMPRESSION zstd)"
        )

    def _quarantine(self, chunk: list[bytes]) -> list[bytes]:
        good, bad = [], []
        decode = msgspec.json.Decoder(UsageRecord).decode
        for data in chunk:
            try:
                record = decode(data.replace(_FLAG, b"}"))
                uuid.UUID(record.request_id)
                dt.date.fromisoformat(time_day(record.started_ms))
                good.append(data)
            except (msgspec.DecodeError, ValueError):
                bad.append(data)
        if bad:
            folder = self.root / "quarantine"
            folder.mkdir(exist_ok=True)
            path = folder / f"{uuid.uuid4().hex}.ndjson"
            path.write_bytes(b"\n".join(bad) + b"\n")
            _fsync_file(path)
            log.error("usage_records_quarantined", count=len(bad), path=str(path))
        return good

    def _commit(self, staged: Path, day: str) -> Path:
        """fsync `staged`, rename it into its day folder, fsync the folder."""
        _fsync_file(staged)
        folder = self.root / day_dir_name(day)
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        target = folder / staged.name
        os.rename(staged, target)
        _fsync_dir(folder)
        return target

    # --- reading ---------------------------------------------------------

    def days(self) -> list[dt.date]:
        """Every day with a folder, oldest first."""
        if not self.root.is_dir():
            return []
        found = (_parse_day(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(d for d in found if d is not None)

    def files(self, start: dt.date, end: dt.date) -> list[Path]:
        """The live files of the days from `start` to `end` (inclusive)."""
        out: list[Path] = []
        for day in self.days():
            if start <= day <= end:
                out.extend(self.day_files(day))
        return out

    def day_files(self, day: dt.date) -> list[Path]:
        """One day's live files (without those a committed merge replaced)."""
        folder = self.root / day_dir_name(day.isoformat())
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        replaced: set[str] = set()
        for name in names:
            if name.endswith(".replaces") and name[: -len(".replaces")] + ".parquet" in names:
                replaced.update(_read_list(folder / name))
        return sorted(folder / n for n in names if n.endswith(".parquet") and n not in replaced)

    # --- maintenance -----------------------------------------------------

    def maintain(self, today: dt.date, retention_days: int = 0) -> None:
        """Finish interrupted merges, merge small files, apply retention."""
        for day in self.days():
            if retention_days and day < today - dt.timedelta(days=retention_days):
                self._expire(day)
                continue
            self._finish_merges(day)
            self._compact(day, closed=day < today - dt.timedelta(days=1))
        if self.staging.is_dir():
            for leftover in self.staging.iterdir():
                leftover.unlink(missing_ok=True)

    def _expire(self, day: dt.date) -> None:
        folder = self.root / day_dir_name(day.isoformat())
        shutil.rmtree(folder, ignore_errors=True)
        _fsync_dir(self.root)
        log.info("usage_ledger_day_expired", day=day.isoformat())

    def _finish_merges(self, day: dt.date) -> None:
        folder = self.root / day_dir_name(day.isoformat())
        for manifest in folder.glob("*.replaces"):
            merged = manifest.with_suffix(".parquet")
            if merged.exists():
                for name in _read_list(manifest):
                    (folder / name).unlink(missing_ok=True)
                _fsync_dir(folder)
            manifest.unlink(missing_ok=True)
            _fsync_dir(folder)

    def _compact(self, day: dt.date, *, closed: bool) -> None:
        files = self.day_files(day)
        small = [f for f in files if f.stat().st_size < COMPACT_TARGET_BYTES]
        if len(small) < (2 if closed else COMPACT_MIN_FILES):
            return
        self._prepare()
        folder = small[0].parent
        name = f"compact-{uuid.uuid4().hex}"
        staged = self.staging / (name + ".parquet")
        sources = "[" + ", ".join(_sql_str(f) for f in small) + "]"
        self._db().execute(
            f"COPY (SELECT * FROM read_parquet({sources})) "
            f"TO {_sql_str(staged)} (FORMAT parquet, COMPRESSION zstd)"
        )
        _fsync_file(staged)
        manifest = folder / (name + ".replaces")
        pending = self.staging / (name + ".replaces")
        pending.write_text(json.dumps([f.name for f in small]))
        _fsync_file(pending)
        os.rename(pending, manifest)
        _fsync_dir(folder)
        os.rename(staged, folder / (name + ".parquet"))  # the commit
        _fsync_dir(folder)
        self._finish_merges(day)
        log.info("usage_ledger_compacted", day=day.isoformat(), files=len(small))


def _read_list(path: Path) -> Iterable[str]:
    with contextlib.suppress(OSError, ValueError):
        names = json.loads(path.read_text())
        if isinstance(names, list):
            return [str(n) for n in names]
    return []


def time_day(epoch_ms: int) -> str:
    """UTC day of a Unix time in ms (validation of quarantined lines)."""
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).date().isoformat()
