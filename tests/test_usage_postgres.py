"""The `usage` processor on PostgreSQL gives what it gives on DuckDB: the bundled sample
sessions run into a DuckDB file and into a PostgreSQL schema, then every usage table and view,
every report, export and summary, a prune and an increment compared between the two (floats
to 12 significant digits: a sum of costs in another order differs in its last bits; times in
UTC)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.pipeline import run_direct
from flows.report import main
from flows.retention import prune
from flows.summary import usage_run_totals, usage_summary
from processors.usage import UsageProcessor
from state.db import connect, location, transaction
from tests.conftest import EXAMPLES, ROOT, postgres_schema_url

RELATIONS = (
    "usage_events",
    "usage_requests_raw",
    "usage_sessions_raw",
    "usage_requests",
    "usage_sessions",
    "usage_requests_unique",
    "usage_daily",
    "usage_monthly",
    "usage_blocks",
    "usage_tools",
    "usage_prices",
    "usage_request_copies",
    "usage_rollup_archive",
    "usage_retention",
)


def _schema(postgres_url: str) -> tuple[str, Any]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    return name, location(postgres_schema_url(postgres_url, name))


def _drop(postgres_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[list[Any]]:
    """The samples read by usage into a DuckDB file, then into a PostgreSQL schema."""
    root = tmp_path_factory.mktemp("both")
    data_dir = root / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    name, pg = _schema(postgres_url)
    dbs: list[Any] = [root / "state.duckdb", pg]
    try:
        for db in dbs:
            figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
            assert (figures.processed, figures.errors) == (7, 0)
        yield dbs
    finally:
        _drop(postgres_url, name)


def _value(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _value(v) for k, v in value.items()}
    return value


def relation(db: Any, name: str) -> tuple[list[str], list[Any]]:
    """A relation's column names and rows (normalised, in a stable order)."""
    with connect(db, read_only=True) as con:
        cursor = con.execute(f"SELECT * FROM {name}")
        columns = [d[0] for d in cursor.description]
        rows = [_value(list(row)) for row in cursor.fetchall()]
    return columns, sorted(rows, key=repr)


def _same_relations(dbs: list[Any]) -> None:
    for name in RELATIONS:
        duck, pg = (relation(db, name) for db in dbs)
        assert pg == duck, name


def test_every_usage_table_and_view_is_the_same(both: list[Any]) -> None:
    _same_relations(both)
    duck = relation(both[0], "usage_requests_unique")[1]
    assert len(duck) == 48 and len(relation(both[0], "usage_request_copies")[1]) == 8
    assert len(relation(both[0], "usage_blocks")[1]) == 6


def _report(db: Any, argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["report", *argv, "--db", str(db)]) == 0
    return capsys.readouterr().out


def _number(cell: str) -> Any:
    try:
        return float(f"{float(cell):.12g}") if "." in cell or "e" in cell else cell
    except ValueError:
        return cell


REPORTS = [
    (kind, *extra)
    for kind in ("daily", "monthly", "sessions", "blocks", "tools")
    for extra in ((), ("--json",), ("--csv",))
] + [
    ("daily", "--timezone", "Pacific/Honolulu", "--json"),
    ("monthly", "--timezone", "Asia/Kathmandu"),
    ("sessions", "--user", "bob", "--timezone", "Asia/Kolkata"),
    ("sessions", "--model", "OPUS", "--json"),
    ("daily", "--since", "2026-11-10", "--until", "2026-11-17", "--user", "bob", "--csv"),
    ("blocks", "--since", "2026-11-11", "--json"),
    ("blocks", "--user", "carol", "--timezone", "America/Los_Angeles"),
    ("tools", "--user", "alice", "--since", "2026-11-03", "--json"),
    ("tools", "--model", "haiku"),
    ("sessions", "--user", "nobody", "--json"),
    ("daily", "--user", "nobody"),
]


@pytest.mark.parametrize("argv", REPORTS, ids=" ".join)
def test_reports_are_the_same(
    both: list[Any], capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    """Tables are the same text; JSON and CSV the same values (costs summed in another order
    may differ in their last bits, the rest is the same text)."""
    if "--timezone" not in argv:
        argv = (*argv, "--timezone", "UTC")
    duck, pg = (_report(db, argv, capsys) for db in both)
    if "--json" in argv:
        assert _value(json.loads(pg)) == _value(json.loads(duck))
    elif "--csv" in argv:
        parsed = [
            [[_number(cell) for cell in row] for row in csv.reader(io.StringIO(out))]
            for out in (duck, pg)
        ]
        assert parsed[1] == parsed[0]
    else:
        assert pg == duck
    assert pg.strip()


def test_report_times_come_in_this_machines_zone_on_both(both: list[Any]) -> None:
    """Times a report prints as they come from the database (the blocks' CSV, the tools'
    JSON) are in the zone DuckDB's client uses, this machine's: PostgreSQL's too."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "TZ": "America/Los_Angeles",
    }
    outs = {}
    for kind in ("blocks --csv", "tools --json"):
        for db in both:
            done = subprocess.run(
                [sys.executable, "-m", "flows.report", "report", *kind.split(), "--db", str(db)],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            outs[kind, str(db)] = done.stdout
    duck, pg = (outs["blocks --csv", str(db)] for db in both)
    assert "2026-11-03T01:00:00-08:00" in duck
    assert [row[:5] for row in csv.reader(io.StringIO(pg))] == [
        row[:5] for row in csv.reader(io.StringIO(duck))
    ]
    duck, pg = (outs["tools --json", str(db)] for db in both)
    assert "-08:00" in duck and pg == duck


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
@pytest.mark.parametrize(
    "args",
    [
        ("usage_events",),
        ("usage_requests",),
        ("usage_sessions",),
        ("usage_daily", "--since", "2026-11-10", "--until", "2026-11-12"),
        ("usage_monthly", "--since", "2026-11-15"),
        ("usage_blocks",),
        ("usage_tools",),
        ("usage_prices",),
        ("usage_events", "--since", "2026-11-24", "--timezone", "Europe/Paris"),
    ],
    ids=" ".join,
)
def test_exports_are_the_same(
    both: list[Any], capfd: pytest.CaptureFixture[str], fmt: str, args: tuple[str, ...]
) -> None:
    outs = []
    for db in both:
        assert main(["export", *args, "--format", fmt, "--db", str(db)]) == 0
        outs.append(capfd.readouterr().out)
    if fmt == "csv":
        duck, pg = (
            sorted(([_number(c) for c in row] for row in csv.reader(io.StringIO(o))), key=repr)
            for o in outs
        )
    else:
        duck, pg = (
            sorted((_value(json.loads(line)) for line in o.splitlines()), key=repr) for o in outs
        )
    assert pg == duck and len(duck) > 1


def test_export_to_a_parquet_file(both: list[Any], tmp_path: Path) -> None:
    import duckdb

    counts = []
    for n, db in enumerate(both):
        target = tmp_path / f"events{n}.parquet"
        assert main(["export", "usage_requests", "--format", "parquet", "-o", str(target),
                     "--db", str(db)]) == 0  # fmt: skip
        counts.append(duckdb.sql(f"SELECT count(*), sum(output_tokens) FROM '{target}'").fetchall())
    assert counts[0] == counts[1] == [(56, 6473)]


def test_summary_and_run_totals_are_the_same(both: list[Any]) -> None:
    got = []
    for db in both:
        with connect(db, read_only=True) as con:
            found = con.execute("SELECT session_file FROM usage_sessions_raw").fetchall()
            sessions = [r[0] for r in found]
            got.append((usage_summary(con), _value(usage_run_totals(con, sessions))))
    assert got[1] == got[0]
    assert "| carol | 15 | 231,601 | 1,664 | $0.13 |" in got[0][0]


def test_a_prune_and_an_increment_leave_the_same(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pruning archives the same rollups and deletes the same rows; a session grown later is
    read as an increment (its request copies listed again in the commit) alike."""
    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    name, pg = _schema(postgres_url)
    dbs: list[Any] = [tmp_path / "state.duckdb", pg]
    cutoff = datetime(2026, 11, 12, 10, 6, 30, tzinfo=UTC)
    try:
        results = []
        for db in dbs:
            assert run_direct(UsageProcessor(), data_dir, db, max_attempts=3).errors == 0
            with connect(db) as con, transaction(con):
                results.append(prune(con, 10, now=cutoff + timedelta(days=10)))
        assert results[1] == results[0]
        assert results[0].requests_archived > 0 and results[0].events_deleted > 0
        _same_relations(dbs)
        daily = [_report(db, ("daily", "--timezone", "UTC"), capsys) for db in dbs]
        assert daily[1] == daily[0]

        # alice resumes her second session once more: the copied requests and two new ones
        resumed = data_dir / "alice" / "b8e41d07-2c5f-4a9e-8f13-6a7d2e0c4b95.jsonl"
        source = (data_dir / "alice" / "3f6c2a1e-8b4d-4c71-9e2a-5d0b7f1c9a43.jsonl").read_text()
        copied = [line for line in source.splitlines() if '"type":"assistant"' in line][:3]
        with resumed.open("a") as out:
            out.write("\n".join(copied) + "\n")
        for db in dbs:
            figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
            assert (figures.processed, figures.errors) == (1, 0)
        _same_relations(dbs)
    finally:
        _drop(postgres_url, name)


def test_the_functions_defined_on_postgresql_give_duckdbs_results(pg_db: Any) -> None:
    """epoch_us, make_timestamptz, strftime and round as DuckDB has them."""
    import duckdb

    from state import postgres_backend

    instants = [
        datetime(2026, 11, 3, 9, 14, 16, 475123, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC),
    ]
    queries = (
        [("SELECT epoch_us(CAST(? AS TIMESTAMPTZ))", [t]) for t in instants]
        + [
            ("SELECT make_timestamptz(CAST(? AS BIGINT))", [us])
            for us in (0, 1, -1, 1_793_700_000_123_456, -86_400_000_001, 9_007_199_254_740_993)
        ]
        + [
            ("SELECT strftime(timezone('UTC', CAST(? AS TIMESTAMPTZ)), ?)", [t, f])
            for t in instants
            for f in ("%Y-%m-%dT%H:%M:%S.%gZ", "%Y-%m-%d %H:%M", "%f %% %Y\"'\\ T Z")
        ]
        + [
            ("SELECT round(CAST(? AS DOUBLE PRECISION), ?)", [x, n])
            for x in (0.03125, 0.5, 2.5, -2.5, 1 / 3, 0.00005, 0.123456789, 1e300, -0.0)
            for n in (0, 1, 4, -1)
        ]
    )
    with connect(pg_db) as con:
        with transaction(con):
            postgres_backend.prepare(con)
        for sql, params in queries:
            duck = duckdb.execute(sql, params).fetchall()
            pg = con.execute(sql, params).fetchall()
            assert _value(pg) == _value(duck), (sql, params)
        # made once: a second run start changes nothing
        assert postgres_backend._missing_functions(con) == []


def test_report_on_postgresql_before_usage_ran_says_so(
    pg_db: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from state.migrations import migrate

    assert main(["report", "daily", "--db", str(pg_db)]) == 1
    assert "no state yet" in capsys.readouterr().err
    with connect(pg_db) as con:
        migrate(con)
    assert main(["report", "daily", "--db", str(pg_db)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no usage data" in line
    assert main(["export", "usage_daily", "--db", str(pg_db)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no table or view usage_daily" in line


def test_dates_in_the_exported_filter_are_literals() -> None:
    from flows.report import _literal

    assert _literal(date(2026, 11, 3)) == "CAST('2026-11-03' AS DATE)"
    at = datetime(2026, 11, 3, tzinfo=UTC)
    assert _literal(at) == "CAST('2026-11-03T00:00:00+00:00' AS TIMESTAMPTZ)"
    with pytest.raises(TypeError):
        _literal("2026-11-03'; DROP TABLE x; --")
