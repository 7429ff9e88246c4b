"""The usage summary published to the Prefect UI after each usage run (markdown)."""

from __future__ import annotations

import shutil
from pathlib import Path

from flows.pipeline import run_direct
from flows.summary import usage_summary
from processors.usage import UsageProcessor
from state.db import connect
from tests.conftest import EXAMPLES


def test_the_latest_week_per_user_and_the_top_tools(tmp_path: Path, db: Path) -> None:
    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    with connect(db, read_only=True) as con:
        markdown = usage_summary(con)
        # by hand: carol's requests in the 7 days before the newest request of the samples
        ((requests, output),) = con.execute(
            "SELECT count(*), sum(output_tokens) FROM usage_requests_unique WHERE username = 'carol'"
            " AND occurred_at > (SELECT max(occurred_at) FROM usage_requests_unique) - INTERVAL 7 DAY"
        ).fetchall()
    lines = markdown.splitlines()
    assert lines[0] == "# Usage, the 7 days to 2026-11-24 08:54 UTC"
    with connect(db, read_only=True) as con:  # times given in another zone: the title in UTC
        (zone,) = con.execute("SELECT current_setting('TimeZone')").fetchone()
        try:
            con.execute("SET TimeZone = 'America/Los_Angeles'")
            assert usage_summary(con).splitlines()[0] == lines[0]
        finally:
            con.execute(f"SET TimeZone = '{zone}'")
    assert f"| carol | {requests} | 231,601 | {output:,} | $0.13 |" in lines
    assert "| Bash | tool | 2 | 0 | 0.0% |" in lines
    assert "| linear/list_issues | mcp | 1 | 0 | 0.0% |" in lines
    with connect(tmp_path / "empty.duckdb") as con:
        for table in UsageProcessor().tables:
            con.execute(table.ddl)
        for view in UsageProcessor().views:
            con.execute(view)
        assert usage_summary(con).endswith("No requests yet.\n")


def test_a_usage_run_reports_what_the_sessions_it_read_add_up_to(tmp_path: Path, db: Path) -> None:
    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    with connect(db, read_only=True) as con:
        ((requests, output, cost),) = con.execute(
            "SELECT count(*), sum(output_tokens), sum(cost_usd) FROM usage_requests"
        ).fetchall()
        (stored,) = con.execute("SELECT totals FROM processor_runs").fetchone() or (None,)
    assert (figures.totals["requests"], figures.totals["output_tokens"]) == (requests, output)
    assert figures.totals["cost_usd"] == round(cost, 6) and figures.totals["unpriced_requests"] == 0
    assert stored is not None and '"requests":56' in stored
    assert run_direct(UsageProcessor(), data_dir, db, max_attempts=3).totals == {}  # read nothing
