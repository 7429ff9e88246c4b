"""`session-pipeline export`: usage tables and views out through DuckDB's COPY."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import duckdb
import pytest

from flows.pipeline import run_direct
from flows.report import main
from processors.usage import UsageProcessor
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(EXAMPLES, root / "sessions")
    assert run_direct(UsageProcessor(), root / "sessions", root / "s.duckdb", max_attempts=3)
    return root / "s.duckdb"


def export(db: Path, *argv: str) -> int:
    return main(["export", *argv, "--db", str(db)])


def test_csv_to_stdout(sample_db: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert export(sample_db, "usage_daily") == 0
    table = list(csv.DictReader(io.StringIO(capfd.readouterr().out)))
    assert len(table) == 7 and sum(int(r["requests"]) for r in table) == 48
    assert table[0].keys() >= {"day", "username", "model", "cost_usd", "unpriced_requests"}


def test_since_until_filter_the_time_column(
    sample_db: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # usage_events: occurred_at, days in the given zone (bob's 2026-11-10 and 11-12 sessions)
    argv = ["--since", "2026-11-10", "--until", "2026-11-12", "--timezone", "UTC"]
    assert export(sample_db, "usage_events", "--format", "ndjson", *argv) == 0
    events = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert events and {e["username"] for e in events} == {"bob"}
    # usage_daily: the `day` column, compared as dates
    assert export(sample_db, "usage_daily", "--since", "2026-11-17") == 0
    days = {r["day"] for r in csv.DictReader(io.StringIO(capfd.readouterr().out))}
    assert days == {"2026-11-17", "2026-11-24"}
    # usage_monthly: a month is kept when --since falls inside it
    assert export(sample_db, "usage_monthly", "--since", "2026-11-20") == 0
    assert len(capfd.readouterr().out.splitlines()) == 1 + 5


def test_parquet_and_ndjson_to_files(sample_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "blocks.parquet"
    assert export(sample_db, "usage_blocks", "--format", "parquet", "-o", str(out)) == 0
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*), sum(requests) FROM '{out}'").fetchone() == (6, 48)
    out = tmp_path / "tools.ndjson"
    assert export(sample_db, "usage_tools", "--format", "ndjson", "-o", str(out)) == 0
    tools = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(t["calls"] for t in tools) == 43


def test_refusals_are_one_line(
    sample_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, said in [
        (["session_processor_state"], "cannot export 'session_processor_state'"),
        (["usage_daily; DROP TABLE x"], "cannot export"),
        (["knowledge_items"], "no table or view knowledge_items"),  # verification never ran
        (["usage_prices", "--since", "2026-11-01"], "usage_prices has no time column"),
        (["usage_daily", "--format", "parquet"], "needs -o FILE"),
        (["usage_daily", "-o", str(tmp_path / "no" / "such" / "dir.csv")], "export to"),
    ]:
        assert export(sample_db, *argv) == 1, argv
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert main(["export", "usage_daily", "--db", str(tmp_path / "none.duckdb")]) == 1
    assert "no state yet at" in capsys.readouterr().err
