"""Migrations are versioned and idempotent, and adopt what the old system left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from state.db import connect
from state.migrations import LATEST, migrate


@pytest.fixture
def db(state_db: Any) -> Any:
    """Every migration runs on the embedded DuckDB file and on PostgreSQL."""
    return state_db


def test_fresh_install_then_noop(db: Path) -> None:
    with connect(db) as con:
        assert len(migrate(con)) == LATEST
        assert migrate(con) == []
        tables = {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            ).fetchall()
        }
    assert {"session_processor_state", "processor_runs", "schema_migrations"} <= tables
    assert "session_extraction_state" not in tables


def test_old_tables_are_adopted_and_imported_once(db: Path) -> None:
    with connect(db) as con:  # the old system's tables, as it left them
        con.execute(
            """CREATE TABLE session_processor_state (processor_name VARCHAR, session_file VARCHAR,
           username VARCHAR, processed_at TIMESTAMP, items_extracted INTEGER, file_hash VARCHAR,
           PRIMARY KEY (processor_name, session_file))"""
        )
        con.execute(
            "INSERT INTO session_processor_state VALUES ('usage', 'alice/a.jsonl', 'alice', now(), 4, 'h1')"
        )
        con.execute(
            """CREATE TABLE session_extraction_state (session_file VARCHAR, username VARCHAR,
               processed_at TIMESTAMP, items_extracted INTEGER, file_hash VARCHAR)"""
        )
        con.execute(
            "INSERT INTO session_extraction_state VALUES "
            "('alice/a.jsonl', 'alice', now(), 2, 'h2'), ('bob/b.jsonl', 'bob', now(), 0, 'h3')"
        )
    with connect(db) as con:
        migrate(con)
        assert migrate(con) == []
        rows = con.execute(
            "SELECT processor_name, session_file, items_extracted, file_hash, status, attempts "
            "FROM session_processor_state ORDER BY 1, 2"
        ).fetchall()
    assert rows == [
        ("usage", "alice/a.jsonl", 4, "h1", "ok", 0),
        ("verification", "alice/a.jsonl", 2, "h2", "ok", 0),
        ("verification", "bob/b.jsonl", 0, "h3", "ok", 0),
    ]


def test_another_state_file_open_in_the_same_process_is_not_imported(tmp_path: Path) -> None:
    """State files of one process share a DuckDB instance: the old table of one must not be
    seen while migrating the other."""
    old, fresh = tmp_path / "old.duckdb", tmp_path / "fresh.duckdb"
    with connect(old) as con:
        con.execute("CREATE TABLE session_extraction_state (session_file VARCHAR)")
        con.execute("INSERT INTO session_extraction_state VALUES ('alice/a.jsonl')")
        with connect(fresh) as other:
            migrate(other)
            assert other.execute("SELECT count(*) FROM session_processor_state").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM session_extraction_state").fetchone() == (1,)


def test_import_does_not_overwrite_existing_verification_rows(db: Path) -> None:
    with connect(db) as con:
        migrate(con)
        con.execute(
            "INSERT INTO session_processor_state (processor_name, session_file, items_extracted) "
            "VALUES ('verification', 'alice/a.jsonl', 9)"
        )
        con.execute(
            "CREATE TABLE session_extraction_state (session_file VARCHAR, items_extracted INTEGER)"
        )
        con.execute("INSERT INTO session_extraction_state VALUES ('alice/a.jsonl', 1)")
        from state.migrations import _import_extraction_state

        _import_extraction_state(con)
        assert con.execute(
            "SELECT items_extracted, username FROM session_processor_state"
        ).fetchall() == [(9, None)]


def test_checkpoints_move_to_their_own_table(db: Path) -> None:
    """A database at migration 6 kept checkpoints on the state rows; 7 moves them out."""
    from state.migrations import MIGRATIONS, applied

    with connect(db) as con:
        applied(con)  # creates schema_migrations
        for version, name, step in MIGRATIONS[:6]:
            step(con)
            con.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name]
            )
        con.execute(
            "INSERT INTO session_processor_state (processor_name, session_file, checkpoint) "
            "VALUES ('usage', 'a/1.jsonl', '{\"lines\":3}'::BYTEA), ('usage', 'a/2.jsonl', NULL)"
        )
        assert migrate(con) == [name for _, name, _ in MIGRATIONS[6:]]
        moved = con.execute("SELECT * FROM session_checkpoints").fetchall()
        columns = {
            r[0]
            for r in con.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'session_processor_state' "
                "AND table_schema = current_schema()"
            ).fetchall()
        }
    assert moved == [("usage", "a/1.jsonl", b'{"lines":3}')]
    assert "checkpoint" not in columns
