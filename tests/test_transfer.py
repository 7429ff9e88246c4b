"""`session-pipeline migrate --to URL`: an embedded DuckDB state moved into PostgreSQL, every
table, row for row, so that nothing is read again; refused in one line when it cannot be done,
and all or nothing when it fails halfway. Real DuckDB files, a real PostgreSQL server."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from processors import registry
from processors.base import Table
from state import store, transfer
from state.db import connect, transaction
from state.hostlock import HostLock
from state.migrations import LATEST, migrate
from tests.conftest import EXAMPLES, postgres_schema_url
from tests.conftest import cli_call as _call
from tests.conftest import one_line_error as _one_line_error


def _run_all(capsys: pytest.CaptureFixture[str], db: Any) -> list[dict[str, Any]]:
    code, out, err = _call(
        capsys, "run", "--all", "--data-dir", str(EXAMPLES), "--db", str(db), "--json"
    )
    assert code == 0, err
    return json.loads(out)


def _source_state(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    """usage and linecount over the bundled samples, and what users and the webhook add:
    trigger audit rows, a price override, a knowledge review, a table of a processor that
    is no longer installed."""
    figures = _run_all(capsys, db)
    assert {f["processor"]: f["processed"] for f in figures} == {"linecount": 7, "usage": 7}
    verification = next(e.processor for e in registry.entries() if e.name == "verification")
    assert verification is not None
    with connect(db) as con, transaction(con):
        store.ensure_outputs(con, verification)
        con.execute(
            "INSERT INTO trigger_audit VALUES "
            "('2026-11-02 10:00:00.123456+00', 'ops', 'run', 'usage', 'started', 202, 'fr-1', "
            """'{"reason": "tab\\there", "n": [1, 2.5]}', NULL), """
            "('2026-11-02 10:00:01+00', NULL, 'run', 'nope', 'refused', 404, NULL, NULL, "
            "'Unknown processor ''nope''')"
        )
        con.execute(
            "INSERT INTO usage_price_overrides (model, input_per_mtok, output_per_mtok, note) "
            "VALUES ('acme-large', 2.0, 8.1, 'gateway contract 2026')"
        )
        con.execute(
            "INSERT INTO knowledge_reviews VALUES "
            "('abc123', 'approved', 'dana', '2026-11-03 09:00:00+00', 'checked with finance')"
        )
        # A third-party processor's table whose package is gone: found in the catalog.
        con.execute(
            "CREATE TABLE acme_notes (session_file VARCHAR NOT NULL, username VARCHAR, "
            "note_no INTEGER, body VARCHAR, score DOUBLE, seen_at TIMESTAMPTZ, "
            "PRIMARY KEY (session_file, note_no))"
        )
        con.execute(
            "INSERT INTO acme_notes VALUES ('alice/a.jsonl', 'alice', 1, 'line one\nline two', "
            "0.1, '2026-11-01 10:00:00.000001+00'), ('bob/b.jsonl', 'bob', 2, NULL, NULL, NULL)"
        )
        con.execute(
            "INSERT INTO processor_tables (processor_name, table_name, ddl) "
            "VALUES ('acme', 'acme_notes', 'CREATE TABLE IF NOT EXISTS acme_notes (...)')"
        )


# --- comparing ---------------------------------------------------------------------------------


def _norm(value: Any) -> Any:
    """A value as both clients give it, made comparable (and sortable) exactly."""
    if value is None:
        return "<null>"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat() if value.tzinfo else value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "0x" + bytes(value).hex()
    if isinstance(value, Decimal):
        return repr(int(value)) if value == value.to_integral_value() else repr(float(value))
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return repr(value)


def _source_tables(db: Path) -> dict[str, list[str]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        found: dict[str, list[str]] = {}
        for table, column in con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE schema_name = 'main' "
            "AND table_name IN (SELECT table_name FROM duckdb_tables() WHERE NOT temporary) "
            "ORDER BY table_name, column_index"
        ).fetchall():
            found.setdefault(table, []).append(column)
        return found
    finally:
        con.close()


def _rows(con: Any, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    names = ", ".join(f'"{c}"' for c in columns)
    return sorted(
        tuple(_norm(v) for v in row)
        for row in con.execute(f'SELECT {names} FROM "{table}"').fetchall()
    )


def _assert_same_rows(db: Path, pg_db: Any) -> dict[str, int]:
    tables = _source_tables(db)
    counts = {}
    source = duckdb.connect(str(db), read_only=True)
    try:
        with pg_db.connect(read_only=True) as target:
            for table, columns in tables.items():
                expected = _rows(source, table, columns)
                assert _rows(target, table, columns) == expected, table
                counts[table] = len(expected)
    finally:
        source.close()
    return counts


def _target_tables(pg_db: Any) -> set[str]:
    with pg_db.connect(must_exist=False) as con:
        return {
            row[0]
            for row in con.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchall()
        }


# --- the move ------------------------------------------------------------------------------------


def test_every_table_moves_and_nothing_is_read_again(
    capsys: pytest.CaptureFixture[str], db: Path, pg_db: Any, test_plugins: Path
) -> None:
    _source_state(capsys, db)
    before = db.read_bytes()
    code, out, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
    assert code == 0, err
    assert err == ""  # no table here is big enough to announce
    assert db.read_bytes() == before  # the source is only read

    counts = _assert_same_rows(db, pg_db)
    for table in (
        "session_processor_state",
        "session_checkpoints",
        "processor_runs",
        "processor_tables",
        "schema_migrations",
        "trigger_audit",
        "usage_events",
        "usage_requests_raw",
        "usage_sessions_raw",
        "usage_request_copies",
        "usage_price_overrides",
        "usage_retention",
        "usage_rollup_archive",
        "knowledge_reviews",
        "linecount_lines",
        "acme_notes",
    ):
        assert table in counts, table
        # the printed table: name, both counts, ok
        line = next(row for row in out.splitlines() if row.split()[:1] == [table])
        assert line.split()[1:4] == [f"{counts[table]:,}", f"{counts[table]:,}", "ok"]
    assert counts["session_checkpoints"] > 0 and counts["usage_request_copies"] > 0
    assert counts["trigger_audit"] == 2 and counts["schema_migrations"] == LATEST
    assert f"copied {len(counts)} tables" in out

    # The state is the same: a run on PostgreSQL reads nothing, and the views answer alike.
    figures = _run_all(capsys, pg_db.url)
    assert {f["processor"]: (f["processed"], f["skipped"]) for f in figures} == {
        "linecount": (0, 7),
        "usage": (0, 7),
    }
    sql = (
        "SELECT username, count(*), sum(output_tokens), round(sum(cost_usd), 6) "
        "FROM usage_sessions GROUP BY 1 ORDER BY 1"
    )
    with connect(db, read_only=True) as con:
        expected = [tuple(_norm(v) for v in row) for row in con.execute(sql).fetchall()]
    with pg_db.connect(read_only=True) as con:
        got = [tuple(_norm(v) for v in row) for row in con.execute(sql).fetchall()]
        prices = con.execute(
            "SELECT source, output_per_mtok FROM usage_prices WHERE model = 'acme-large'"
        ).fetchall()
        items = con.execute("SELECT count(*) FROM knowledge_items").fetchall()
    assert got == expected and len(got) == 3
    assert prices == [("override", 8.1)]  # the override is read by the target's views
    assert items == [(0,)]  # verification's views were made too

    # once there, the state is not copied over again
    with pytest.raises(transfer.TransferError, match="already holds session-pipeline state"):
        transfer.migrate_state(db, pg_db)


def test_values_arrive_exactly(tmp_path: Path, pg_db: Any) -> None:
    """A table no processor declares, of every kind of value: made from the DuckDB catalog
    (types, NOT NULL, keys, simple defaults), its values unchanged (text escapes, NUL as
    U+FFFD as the backend stores it, doubles to the bit, microseconds, bytes, JSON text)."""
    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
        con.execute(
            """CREATE TABLE odd_values (
                id INTEGER PRIMARY KEY, txt VARCHAR DEFAULT 'x', "Mixed Case" VARCHAR NOT NULL,
                f FLOAT, d DOUBLE, h HUGEINT, u UBIGINT, ts TIMESTAMPTZ, t TIMESTAMP,
                b BLOB, dec DECIMAL(10,3), j JSON, tags VARCHAR[], s STRUCT(a INTEGER, b VARCHAR),
                iv INTERVAL, dt DATE, flag BOOLEAN, UNIQUE (txt, dt))"""
        )
        con.execute(
            "INSERT INTO odd_values VALUES (1, 'tab' || chr(9) || 'nl' || chr(10) || 'cr' || "
            "chr(13) || 'back\\slash \\N \\. é😀' || chr(0) || 'end', 'q', 1.5, 0.1, "
            "170141183460469231731687303715884105727, 18446744073709551615, "
            "'2026-01-02 03:04:05.123456+00', '2026-01-02 03:04:05.000001', "
            '\'\\x00\\xFF\\x5C\\x0A\'::BLOB, 12.345, \'{"k": [1, 2.5e300], "s": "a\\tb"}\', '
            "['a', 'b\"c'], {'a': 1, 'b': 'x'}, INTERVAL '1 day 2 hours 3.5 seconds', "
            "DATE '2020-02-29', true), "
            "(2, NULL, '', NULL, 'nan', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
            "NULL, NULL, NULL), "
            "(3, '', '\\.', 'inf', '-inf', -1, 0, 'infinity', '-infinity', ''::BLOB, -0.001, "
            "'null', [], NULL, INTERVAL '-3 days', NULL, false), "
            "(4, 'x', 'y', '-0.0', 5e-324, 0, 1, '1970-01-01 00:00:00+00', "
            "'1999-12-31 23:59:59.999999', '\\x5C\\x78'::BLOB, 0, '[]', NULL, NULL, NULL, NULL, "
            "NULL)"
        )
    copies = transfer.migrate_state(db, pg_db)
    assert {c.name: (c.source_rows, c.target_rows) for c in copies}["odd_values"] == (4, 4)
    assert {c.name: c.created for c in copies}["odd_values"] == "catalog"

    import psycopg

    with psycopg.connect(pg_db.url) as raw:
        raw.execute("SET TIME ZONE 'UTC'")
        rows = raw.execute(
            'SELECT id, txt, "Mixed Case", f, d, h, u, '
            "CASE WHEN isfinite(ts) THEN ts END, CASE WHEN isfinite(t) THEN t END, "
            "b, dec, j, tags, s, iv, dt, flag FROM odd_values ORDER BY id"
        ).fetchall()
        infinite = raw.execute("SELECT ts::TEXT, t::TEXT FROM odd_values WHERE id = 3").fetchone()
        types = dict(
            raw.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'odd_values'"
            ).fetchall()
        )
        keys = raw.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'odd_values'::regclass ORDER BY 1"
        ).fetchall()
        raw.execute("INSERT INTO odd_values (id, \"Mixed Case\") VALUES (5, 'z')")
        default = raw.execute("SELECT txt FROM odd_values WHERE id = 5").fetchone()
        raw.rollback()
    assert types["f"] == "real" and types["d"] == "double precision" and types["h"] == "numeric"
    assert types["ts"] == "timestamp with time zone" and types["b"] == "bytea"
    assert types["j"] == types["tags"] == types["s"] == "json"
    assert keys == [("PRIMARY KEY (id)",), ("UNIQUE (txt, dt)",)]
    assert default == ("x",)
    one, two, three, four = rows
    assert one[1] == "tab\tnl\ncr\rback\\slash \\N \\. é😀\ufffdend"
    assert one[2] == "q" and one[3] == 1.5 and one[4] == 0.1
    assert one[5] == 170141183460469231731687303715884105727 and one[6] == 2**64 - 1
    assert one[7] == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert one[8] == datetime(2026, 1, 2, 3, 4, 5, 1)
    assert one[9] == b"\x00\xff\\\n" and one[10] == Decimal("12.345")
    assert one[11] == {"k": [1, 2.5e300], "s": "a\tb"}  # psycopg parses JSON
    assert one[12] == ["a", 'b"c'] and one[13] == {"a": 1, "b": "x"}
    assert one[14] == timedelta(days=1, hours=2, seconds=3.5) and one[16] is True
    assert math.isnan(two[4]) and two[1] is None and two[2] == ""
    assert three[2] == "\\." and three[3] == math.inf and three[4] == -math.inf
    assert three[9] == b"" and three[11] is None and three[12] == []  # JSON null is None
    assert three[14] == timedelta(days=-3) and infinite == ("infinity", "-infinity")
    assert math.copysign(1, four[3]) == -1 and four[4] == 5e-324 and four[9] == b"\\x"
    assert four[7] == datetime(1970, 1, 1, tzinfo=UTC)
    assert four[8] == datetime(1999, 12, 31, 23, 59, 59, 999999)
    with psycopg.connect(pg_db.url) as raw:
        text = raw.execute("SELECT j::TEXT FROM odd_values WHERE id = 1").fetchone()
    assert text == ('{"k": [1, 2.5e300], "s": "a\\tb"}',)  # JSON text as it was, not re-encoded


def test_big_values_go_a_few_rows_at_a_time(
    tmp_path: Path, pg_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints of megabytes each: the pieces stay near BATCH_BYTES, whatever the rows."""
    monkeypatch.setattr(transfer, "BATCH_BYTES", 1 << 20)
    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
        con.execute(
            "INSERT INTO session_checkpoints SELECT 'usage', 'u/' || i || '.jsonl', "
            "CAST(repeat('\\xAB', 600000) AS BLOB) FROM range(12) t(i)"
        )
        con.execute(
            "INSERT INTO session_processor_state (processor_name, session_file, status) "
            "SELECT 'usage', 'u/' || i || '.jsonl', 'ok' FROM range(30000) t(i)"
        )
    pieces: dict[str, list[int]] = {}
    current: list[str] = []
    real = transfer._copy_rows

    def copy_rows(src: Any, tgt: Any, table: Any) -> int:
        current[:] = [table.name]
        return real(src, tgt, table)

    from psycopg import Copy

    original = Copy.write

    def write(self: Any, buffer: Any) -> None:
        pieces.setdefault(current[0], []).append(len(buffer))
        original(self, buffer)

    monkeypatch.setattr(transfer, "_copy_rows", copy_rows)
    monkeypatch.setattr(Copy, "write", write)
    copies = {c.name: c for c in transfer.migrate_state(db, pg_db)}
    assert copies["session_checkpoints"].target_rows == 12
    assert copies["session_processor_state"].target_rows == 30000
    # 1.2 MB of hex a row: one row a piece (never the whole table at once)
    assert len(pieces["session_checkpoints"]) == 12
    assert max(pieces["session_processor_state"]) < 2 << 20
    with pg_db.connect(read_only=True) as con:
        row = con.execute(
            "SELECT length(checkpoint), get_byte(checkpoint, 599999) FROM session_checkpoints "
            "LIMIT 1"
        ).fetchone()
    assert row == (600000, 0xAB)


# --- refusals ------------------------------------------------------------------------------------


def test_a_target_that_holds_state_is_refused_and_left_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_db: Any
) -> None:
    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
    assert _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)[0] == 0
    with pg_db.connect() as con:
        con.execute(
            "INSERT INTO trigger_audit (requested_at, action, outcome, http_status) "
            "VALUES (now(), 'run', 'started', 202)"
        )
    code, out, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
    assert code == 1 and out == ""
    line = _one_line_error(err)
    assert "already holds session-pipeline state" in line and "schema_migrations" in line
    with pg_db.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM schema_migrations").fetchone() == (LATEST,)
        assert con.execute("SELECT count(*) FROM trigger_audit").fetchone() == (1,)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
    cases = [
        (("--db", str(tmp_path / "none.duckdb"), "--to", pg_db.url), "no state at"),
        (
            ("--db", str(db), "--to", f"postgresql://postgres@127.0.0.1:{_closed_port()}/x"),
            "cannot reach PostgreSQL at",
        ),
        (("--db", str(db), "--to", str(tmp_path / "other.duckdb")), "must be a postgresql://"),
        (("--db", pg_db.url, "--to", pg_db.url), "must be an embedded DuckDB state file"),
        (("--db", str(tmp_path), "--to", pg_db.url), "is a directory"),
    ]
    (tmp_path / "not-duckdb.duckdb").write_text("hello")
    cases.append((("--db", str(tmp_path / "not-duckdb.duckdb"), "--to", pg_db.url), "not a DuckDB"))
    for args, message in cases:
        code, _, err = _call(capsys, "migrate", *args)
        assert code == 1, (args, err)
        assert message in _one_line_error(err), (args, err)
    assert _target_tables(pg_db) == set()
    # SESSION_PIPELINE_DB names the source, as for every command
    monkeypatch.setenv("SESSION_PIPELINE_DB", str(db))
    assert _call(capsys, "migrate", "--to", pg_db.url)[0] == 0


def test_an_older_source_is_upgraded_by_the_plain_migrate_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_db: Any
) -> None:
    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
        con.execute("DELETE FROM schema_migrations WHERE version = ?", [LATEST])
    before = db.read_bytes()
    code, _, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
    assert code == 1
    line = _one_line_error(err)
    assert f"older version (migration {LATEST - 1} of {LATEST})" in line
    assert f"session-pipeline migrate --db {db}" in line
    assert db.read_bytes() == before  # never written
    code, out, _ = _call(capsys, "migrate", "--db", str(db))  # the plain command, as before
    assert code == 0 and "applied" in out
    assert _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)[0] == 0


def test_a_busy_source_or_a_running_processor_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
    # a registered processor, and one that only left its lock file here
    for name in ("usage", "retired"):
        with HostLock(db, name):
            code, _, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
        assert code == 1
        assert f"Processor '{name}' is already running" in _one_line_error(err)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', "
            "flush=True); time.sleep(60)",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SESSION_PIPELINE_DB_LOCK_TIMEOUT", "1")
        code, _, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1
    assert "stayed locked by another process for 1s" in _one_line_error(err)
    assert _target_tables(pg_db) == set()


def test_a_count_that_differs_rolls_everything_back(
    capsys: pytest.CaptureFixture[str],
    db: Path,
    pg_db: Any,
    test_plugins: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _run_all(capsys, db)
    real = transfer._copy_rows

    def one_too_many(src: Any, tgt: Any, table: Any) -> int:
        written = real(src, tgt, table)
        if table.name == "usage_events":
            tgt.execute("INSERT INTO usage_events SELECT * FROM usage_events LIMIT 1")
        return written

    monkeypatch.setattr(transfer, "_copy_rows", one_too_many)
    code, out, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
    assert code == 1
    assert "row counts differ (usage_events 50 -> 51)" in _one_line_error(err)
    assert any(line.split()[3:4] == ["MISMATCH"] for line in out.splitlines())
    # migrate's own steps were savepoints of the one transaction: nothing is left
    assert _target_tables(pg_db) == set()


def test_tables_of_another_processor_version_are_copied_as_they_are(
    capsys: pytest.CaptureFixture[str], db: Path, pg_db: Any, test_plugins: Path
) -> None:
    """The source's linecount table is an older version's (one column fewer): it moves as it
    is, and the next run on PostgreSQL adds the column as it would have on the file, reading
    nothing again."""
    _run_all(capsys, db)
    linecount = registry.get("linecount")
    (lines,) = linecount.tables
    older = Table(lines.name, lines.columns[:-1])
    with connect(db) as con:
        con.execute(f"ALTER TABLE {lines.name} DROP COLUMN {lines.columns[-1][0]}")
        con.execute(
            "UPDATE processor_tables SET ddl = ? WHERE table_name = ?", [older.ddl, older.name]
        )
    code, _, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
    assert code == 0, err
    assert "linecount: its tables are from another version of it" in err
    _assert_same_rows(db, pg_db)
    figures = _run_all(capsys, pg_db.url)
    assert {f["processor"]: f["processed"] for f in figures} == {"linecount": 0, "usage": 0}
    with pg_db.connect(read_only=True) as con:
        ddl = con.execute(
            "SELECT ddl FROM processor_tables WHERE table_name = ?", [lines.name]
        ).fetchone()
    assert ddl == (lines.ddl,)


def test_a_schema_named_in_the_url_is_made(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, postgres_url: str
) -> None:
    """The target schema need not exist: it is made, as for any write."""
    import psycopg

    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    try:
        url = postgres_schema_url(postgres_url, schema)
        assert _call(capsys, "migrate", "--db", str(db), "--to", url)[0] == 0
        with psycopg.connect(url) as raw:
            found = raw.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s", [schema]
            ).fetchone()
        assert found is not None and found[0] >= 6
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as raw:
            raw.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class _DuckDBOnly:
    """A third-party processor whose view only DuckDB understands."""

    name = "duckonly"
    version = "1"
    cadence_seconds = 300
    tables = (Table("duckonly_rows", (("session_file", "VARCHAR NOT NULL"), ("n", "INTEGER"))),)
    views = (
        "CREATE OR REPLACE VIEW duckonly_lists AS SELECT list_value(n, n) AS l FROM duckonly_rows",
    )

    def process(self, session: Any) -> Any:  # pragma: no cover (never run here)
        raise NotImplementedError


def test_a_processor_that_cannot_live_in_postgresql_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, pg_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "state.duckdb"
    with connect(db) as con:
        migrate(con)
    loaded = transfer._loaded_processors()
    monkeypatch.setattr(transfer, "_loaded_processors", lambda: [*loaded, _DuckDBOnly()])
    code, out, err = _call(capsys, "migrate", "--db", str(db), "--to", pg_db.url)
    assert code == 1 and out == ""
    line = _one_line_error(err)
    assert "processor duckonly: its tables or views cannot be made in PostgreSQL" in line
    assert "list_value" in line and "nothing was written" in line
    assert _target_tables(pg_db) == set()
