"""Retention (flows/retention.py) on the bundled sample sessions: pruning keeps every day and
month figure (the views and `report daily|monthly`, in any time zone) and the session
summaries, and rows read again later are neither counted twice nor archived twice."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.pipeline import run_direct
from flows.report import main as report_main
from flows.retention import ENV, apply_retention, main, prune, retention_days
from processors.usage import USAGE_SESSIONS, UsageProcessor
from state.config import ConfigError
from state.db import connect, transaction
from tests.conftest import EXAMPLES

# Splits bob's 2026-11-12 session (10:05 to 10:07) and its 15-minute bucket.
CUTOFF = datetime(2026, 11, 12, 10, 6, 30, tzinfo=UTC)
OVERRIDE = (
    "INSERT INTO usage_price_overrides (model, input_per_mtok, output_per_mtok, note) "
    "VALUES ('claude-opus-4-5', 7.0, 31.0, 'test') ON CONFLICT (model) DO UPDATE SET "
    "input_per_mtok = EXCLUDED.input_per_mtok, output_per_mtok = EXCLUDED.output_per_mtok"
)
# (The SQL here runs on DuckDB and PostgreSQL: every test with `sample` runs on both.)
DAILY = "SELECT * FROM usage_daily ORDER BY 1, 2, 3"
MONTHLY = "SELECT * FROM usage_monthly ORDER BY 1, 2, 3"
SESSIONS = f"SELECT {', '.join(USAGE_SESSIONS.column_names)} FROM usage_sessions ORDER BY 1"


class BumpedUsage(UsageProcessor):
    version = "retention-test"  # every session is read again, old rows included


@pytest.fixture
def sample(tmp_path: Path, state_db: Any) -> tuple[Path, Any]:
    data_dir, db = tmp_path / "sessions", state_db
    shutil.copytree(EXAMPLES, data_dir)
    assert run_direct(UsageProcessor(), data_dir, db, max_attempts=3).errors == 0
    return data_dir, db


def _rows(db: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with connect(db, read_only=True) as con:
        return con.execute(query, list(params)).fetchall()


def _report(db: Any, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert report_main(["report", *argv, "--db", str(db)]) == 0
    return capsys.readouterr().out


def _rounded(value: Any) -> Any:
    """Costs summed in another order differ in their last bits: compared to 1e-9 dollars."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def figures(db: Any, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Every day and month figure, as views and as reports."""
    got: dict[str, Any] = {
        "daily": _rounded(_rows(db, DAILY)),
        "monthly": _rounded(_rows(db, MONTHLY)),
        "sessions": _rows(db, SESSIONS),
        "report daily json": _rounded(
            json.loads(_report(db, capsys, "daily", "--timezone", "UTC", "--json"))
        ),
    }
    for zone in ("UTC", "Asia/Kolkata", "Asia/Kathmandu", "America/Los_Angeles"):
        got[f"report daily {zone}"] = _report(db, capsys, "daily", "--timezone", zone)
    got["report monthly"] = _report(db, capsys, "monthly", "--timezone", "UTC")
    got["report daily filtered"] = _report(
        db, capsys, "daily", "--timezone", "UTC", "--since", "2026-11-12", "--user", "bob",
        "--model", "opus",
    )  # fmt: skip
    return got


def test_pruning_keeps_daily_and_monthly_figures_and_reread_rows_count_once(
    sample: tuple[Path, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data_dir, db = sample
    before = figures(db, capsys)
    assert "2026-11-03" in before["report daily UTC"]
    with connect(db) as con:
        con.execute(OVERRIDE)
    repriced = figures(db, capsys)
    assert repriced["daily"] != before["daily"]
    with connect(db) as con:
        con.execute("DELETE FROM usage_price_overrides")
        old_requests = con.execute(
            "SELECT count(*) FROM usage_requests_raw WHERE occurred_at < ?", [CUTOFF]
        ).fetchone()
        with transaction(con):
            result = prune(con, 10, now=CUTOFF + timedelta(days=10))
    assert old_requests is not None and old_requests[0] > 0
    assert result.cutoff == CUTOFF and result.previous_cutoff is None
    assert result.request_rows_deleted == old_requests[0]
    assert 0 < result.requests_archived < result.request_rows_deleted  # copies counted once
    assert result.events_deleted > 0
    assert _rows(db, "SELECT count(*) FROM usage_requests_raw WHERE occurred_at < "
                     "(SELECT cutoff FROM usage_retention)") == [(0,)]  # fmt: skip
    assert _rows(db, "SELECT count(*) FROM usage_events WHERE occurred_at < "
                     "(SELECT cutoff FROM usage_retention)") == [(0,)]  # fmt: skip
    # bob's session on 2026-11-12 is half pruned, half live
    assert _rows(db, "SELECT count(*) FROM usage_requests_raw WHERE username = 'bob' "
                     "AND occurred_at::DATE = '2026-11-12'") != [(0,)]  # fmt: skip
    assert figures(db, capsys) == before

    # archived requests are priced at query time, like live ones
    with connect(db) as con:
        con.execute(OVERRIDE)
    assert figures(db, capsys) == repriced
    with connect(db) as con:
        con.execute("DELETE FROM usage_price_overrides")

    # the same prune again: nothing more to archive or delete
    with connect(db) as con, transaction(con):
        again = prune(con, 10, now=CUTOFF + timedelta(days=10))
    assert (again.requests_archived, again.request_rows_deleted, again.events_deleted) == (0, 0, 0)
    assert again.previous_cutoff == CUTOFF
    assert figures(db, capsys) == before

    # a version bump reads every file again: the old rows are back in the tables, but left out
    # of the figures (not counted twice) until the run's end deletes them again
    assert run_direct(BumpedUsage(), data_dir, db, max_attempts=3).errors == 0
    old = "SELECT count(*) FROM usage_requests_raw WHERE occurred_at < ?"
    assert _rows(db, old, CUTOFF) == [old_requests]
    assert figures(db, capsys) == before
    archive = _rows(db, "SELECT count(*), sum(requests) FROM usage_rollup_archive")

    # the run's end: a longer retention does not move the cutoff back; the rows read again
    # are deleted, not archived a second time
    monkeypatch.setenv(ENV, "3650")
    with connect(db) as con, transaction(con):
        ended = apply_retention(con)
    assert ended is not None
    assert ended.cutoff == CUTOFF and ended.days == 3650
    assert ended.requests_archived == 0
    assert ended.request_rows_deleted == old_requests[0]
    assert _rows(db, "SELECT count(*), sum(requests) FROM usage_rollup_archive") == archive
    assert figures(db, capsys) == before


def test_retention_days_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert retention_days() is None
    for value, expected in (("0", None), (" 30 ", 30), ("1", 1)):
        monkeypatch.setenv(ENV, value)
        assert retention_days() == expected
    for value in ("", "-1", "thirty", "1.5"):
        monkeypatch.setenv(ENV, value)
        with pytest.raises(ConfigError, match=ENV):
            retention_days()


def test_apply_retention_unset_or_zero_touches_nothing(
    sample: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, db = sample
    count = "SELECT count(*) FROM usage_requests_raw"
    kept = _rows(db, count)
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, value)
        with connect(db) as con, transaction(con):
            assert apply_retention(con) is None
    assert _rows(db, count) == kept
    assert _rows(db, "SELECT count(*) FROM usage_retention") == [(0,)]


def test_prune_command(
    sample: tuple[Path, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _, db = sample
    monkeypatch.delenv(ENV, raising=False)
    assert main(["prune", "--db", str(db)]) == 1
    assert capsys.readouterr().err.strip().endswith(f"nothing to prune: pass --days N or set {ENV}")
    monkeypatch.setenv(ENV, "x")
    assert main(["prune", "--db", str(db)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["prune", "--days", "1", "--db", str(tmp_path / "none.duckdb")]) == 1
    assert "nothing to prune" in capsys.readouterr().err
    # every sample request is older than a day (they are from November 2026 or before today)
    now = datetime.now(UTC)
    newest = _rows(db, "SELECT max(occurred_at) FROM usage_requests_raw")[0][0]
    if newest >= now - timedelta(days=1):
        pytest.skip("the sample sessions are less than a day old on this clock")
    daily = _rows(db, DAILY)
    sessions = _rows(db, "SELECT count(*) FROM usage_sessions")
    assert main(["prune", "--days", "1", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pruned usage before ") and "request(s) archived" in out
    assert _rows(db, "SELECT count(*) FROM usage_requests_raw") == [(0,)]
    assert _rows(db, "SELECT count(*) FROM usage_events") == [(0,)]
    assert _rounded(_rows(db, DAILY)) == _rounded(daily)
    assert _rows(db, "SELECT count(*) FROM usage_sessions") == sessions


def test_a_usage_run_prunes_at_its_end_and_a_bad_setting_stops_it_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, state_db: Any
) -> None:
    data_dir, db = tmp_path / "sessions", state_db
    shutil.copytree(EXAMPLES, data_dir)
    monkeypatch.setenv(ENV, "soon")
    with pytest.raises(ConfigError):
        run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    assert not db.exists()  # found before any work
    # the samples are from November 2026: a retention of 1 day prunes every request now
    monkeypatch.setenv(ENV, "1")
    assert run_direct(UsageProcessor(), data_dir, db, max_attempts=3).processed == 7
    assert _rows(db, "SELECT count(*) FROM usage_requests_raw") == [(0,)]
    assert _rows(db, "SELECT count(*) FROM usage_events") == [(0,)]
    assert _rows(db, "SELECT sum(requests) FROM usage_daily")[0][0] > 0  # the rollups stay
