"""`tollgate usage export` and `tollgate usage drain` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.usage.ledger import Ledger
from tests.support.processes import REPO
from tests.unit.gateway.usage.conftest import at_ms, entry, line


@pytest.fixture
def ledger_dir(tmp_path: Path) -> Path:
    ledger = Ledger(tmp_path / "ledger")
    started = at_ms(2025, 6, 1, 8)
    ledger.write(
        [
            line(
                entry(
                    "acme",
                    app="bot",
                    model="smollm2",
                    prompt=2000,
                    completion=500,
                    cached=1000,
                    started_ms=started,
                )
            ),
            line(entry("globex", model="smollm2-small", prompt=100, started_ms=started)),
        ]
    )
    return tmp_path / "ledger"


def run(ledger_dir: Path, *args: str) -> int:
    return main(
        [
            "usage",
            *args,
            "--ledger-dir",
            str(ledger_dir),
            "--policies-dir",
            str(REPO / "policies"),
            "--tenants-dir",
            str(REPO / "tenants"),
        ]
    )


def test_export_to_a_file_in_each_format(ledger_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "usage.csv"
    common = ("export", "--from", "2025-06-01", "--to", "2025-06-01", "--output")
    assert run(ledger_dir, *common, str(out), "--group-by", "tenant,app") == 0
    lines = out.read_text().splitlines()
    # smollm2: (1000 * 0.20 + 1000 * 0.05 + 500 * 0.60) / 1e6 = 0.00055
    assert lines[1].split(",")[:3] == ["acme", "bot", "1"]
    assert lines[1].split(",")[7] == "0.00055"
    # smollm2-small: 100 * 0.05 / 1e6 = 0.000005
    assert lines[-1].split(",")[:2] == ["total", ""] and lines[-1].split(",")[7] == "0.000555"
    report = tmp_path / "usage.json"
    assert run(ledger_dir, *common, str(report), "--format", "json", "--tenant", "globex") == 0
    body = json.loads(report.read_text())
    assert body["totals"]["requests"] == 1 and body["totals"]["cost"] == "0.000005"
    parquet = tmp_path / "usage.parquet"
    assert run(ledger_dir, *common, str(parquet), "--format", "parquet", "--dedup", "all") == 0
    assert parquet.read_bytes()[:4] == b"PAR1"


def test_bad_dates_and_the_memory_store(
    ledger_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(ledger_dir, "export", "--from", "2025-06-02", "--to", "2025-06-01") == 2
    assert "'to' is before 'from'" in capsys.readouterr().err
    monkeypatch.delenv("TOLLGATE_STORE", raising=False)
    assert run(ledger_dir, "drain", "--once") == 2
    assert "TOLLGATE_STORE=redis" in capsys.readouterr().err
