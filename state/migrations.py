"""Versioned, idempotent schema migrations for the pipeline's own tables.

Each migration runs once, inside the transaction that records it in `schema_migrations`, and
is written so that running it against a database the old system left behind (which may already
hold `session_processor_state` with the old columns, or `session_extraction_state`) does the
right thing.
"""

from __future__ import annotations

from collections.abc import Callable

from state.db import Connection, backend, transaction
from state.errors import StateError

Migration = Callable[[Connection], None]


def _ddl(con: Connection, sql: str) -> None:
    """A statement that names types, in the connection's own SQL."""
    con.execute(backend(con).dialect(sql))


def _state_table(con: Connection) -> None:
    # The old system's columns first, unchanged, so its existing table is adopted as is.
    _ddl(
        con,
        """
        CREATE TABLE IF NOT EXISTS session_processor_state (
            processor_name VARCHAR NOT NULL,
            session_file VARCHAR NOT NULL,
            username VARCHAR,
            processed_at TIMESTAMPTZ,
            items_extracted INTEGER,
            file_hash VARCHAR,
            PRIMARY KEY (processor_name, session_file)
        )
        """,
    )
    for column, sql_type in (
        ("processor_version", "VARCHAR"),
        ("size_bytes", "BIGINT"),
        ("mtime_ns", "BIGINT"),
        ("read_at", "TIMESTAMPTZ"),
        ("malformed_lines", "INTEGER"),
        ("attempts", "INTEGER DEFAULT 0"),
        ("last_error", "VARCHAR"),
        ("last_attempt_at", "TIMESTAMPTZ"),
        ("status", "VARCHAR DEFAULT 'ok'"),
    ):
        _ddl(
            con, f"ALTER TABLE session_processor_state ADD COLUMN IF NOT EXISTS {column} {sql_type}"
        )


def _import_extraction_state(con: Connection) -> None:
    """The older `session_extraction_state` (verification only) becomes `verification` rows.

    Rows already present for `verification` win; the old table is dropped afterwards, so a
    second run finds nothing to import.
    """
    found = con.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_catalog = current_database() AND table_schema = current_schema() "
        "AND table_name = 'session_extraction_state'"
    ).fetchone()
    if not found or not found[0]:
        return
    old_columns = {
        row[0]
        for row in con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_schema = current_schema() "
            "AND table_name = 'session_extraction_state'"
        ).fetchall()
    }
    if "session_file" not in old_columns:
        raise StateError("session_extraction_state has no session_file column; cannot import")
    wanted = ["username", "processed_at", "items_extracted", "file_hash"]
    present = [c for c in wanted if c in old_columns]
    username = "username" if "username" in old_columns else "split_part(session_file, '/', 1)"
    select = ", ".join(
        ["'verification'", "session_file", username] + [c for c in present if c != "username"]
    )
    target = ", ".join(
        ["processor_name", "session_file", "username"] + [c for c in present if c != "username"]
    )
    con.execute(
        f"""
        INSERT INTO session_processor_state ({target}, status, attempts)
        SELECT {select}, 'ok', 0 FROM session_extraction_state
        WHERE session_file NOT IN (
            SELECT session_file FROM session_processor_state
            WHERE processor_name = 'verification'
        )
        """
    )
    con.execute("DROP TABLE session_extraction_state")


def _runs_table(con: Connection) -> None:
    _ddl(
        con,
        """
        CREATE TABLE IF NOT EXISTS processor_runs (
            run_id VARCHAR PRIMARY KEY,
            processor_name VARCHAR NOT NULL,
            processor_version VARCHAR,
            flow_run_id VARCHAR,
            started_at TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ,
            duration_seconds DOUBLE,
            scanned INTEGER,
            processed INTEGER,
            skipped INTEGER,
            errors INTEGER,
            quarantined INTEGER,
            deferred INTEGER,
            items_extracted BIGINT,
            errors_detail JSON
        )
        """,
    )


def _output_schemas_table(con: Connection) -> None:
    # The DDL each processor's output tables were created with: a changed DDL rebuilds the
    # table and reprocesses that processor's sessions (see state.store.ensure_outputs).
    _ddl(
        con,
        """
        CREATE TABLE IF NOT EXISTS processor_tables (
            processor_name VARCHAR NOT NULL,
            table_name VARCHAR NOT NULL,
            ddl VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (table_name)
        )
        """,
    )


def _run_ledger_and_audit(con: Connection) -> None:
    # A run's row is written when it starts (status 'running', with the host and pid of the
    # process doing the work) and completed at its end: `doctor` finds runs whose process is
    # gone, which Prefect OSS leaves Running forever.
    for column, sql_type in (("status", "VARCHAR"), ("host", "VARCHAR"), ("pid", "INTEGER")):
        _ddl(con, f"ALTER TABLE processor_runs ADD COLUMN IF NOT EXISTS {column} {sql_type}")
    con.execute("UPDATE processor_runs SET status = 'completed' WHERE status IS NULL")
    _ddl(
        con,
        """
        CREATE TABLE IF NOT EXISTS trigger_audit (
            requested_at TIMESTAMPTZ NOT NULL,
            caller VARCHAR,
            action VARCHAR NOT NULL,
            processor_name VARCHAR,
            outcome VARCHAR NOT NULL,
            http_status INTEGER NOT NULL,
            flow_run_id VARCHAR,
            details JSON,
            error VARCHAR
        )
        """,
    )


def _append_checkpoints(con: Connection) -> None:
    # For append-safe processors: where the last read's complete lines end, the hash of the
    # bytes before that point, and the processor's checkpoint to continue from.
    for column, sql_type in (
        ("complete_offset", "BIGINT"),
        ("complete_hash", "VARCHAR"),
        ("checkpoint", "BLOB"),
    ):
        _ddl(
            con, f"ALTER TABLE session_processor_state ADD COLUMN IF NOT EXISTS {column} {sql_type}"
        )


def _checkpoints_table(con: Connection) -> None:
    """Checkpoints move to a table of their own, replaced by DELETE + INSERT. Updating a big
    BLOB in place (an upsert of the state row) made DuckDB hold ~15 times its size in memory
    and took ~10 times as long as deleting the old row and inserting a new one."""
    _ddl(
        con,
        """
        CREATE TABLE IF NOT EXISTS session_checkpoints (
            processor_name VARCHAR NOT NULL,
            session_file VARCHAR NOT NULL,
            checkpoint BLOB NOT NULL
        )
        """,
    )
    con.execute(
        "INSERT INTO session_checkpoints "
        "SELECT processor_name, session_file, checkpoint FROM session_processor_state "
        "WHERE checkpoint IS NOT NULL"
    )
    con.execute("ALTER TABLE session_processor_state DROP COLUMN checkpoint")


def _quarantined_held(con: Connection) -> None:
    # `quarantined` becomes what a run did; what it found held is a column of its own.
    con.execute("ALTER TABLE processor_runs ADD COLUMN IF NOT EXISTS quarantined_held INTEGER")


def _run_totals(con: Connection) -> None:
    # What the sessions a run read add up to (usage: tokens and cost), as JSON.
    _ddl(con, "ALTER TABLE processor_runs ADD COLUMN IF NOT EXISTS totals JSON")


MIGRATIONS: tuple[tuple[int, str, Migration], ...] = (
    (1, "session_processor_state with versions, stat and attempts", _state_table),
    (2, "import session_extraction_state as verification rows", _import_extraction_state),
    (3, "processor_runs", _runs_table),
    (4, "processor_tables", _output_schemas_table),
    (5, "run ledger (status, host, pid) and trigger_audit", _run_ledger_and_audit),
    (6, "append checkpoints on session_processor_state", _append_checkpoints),
    (7, "session_checkpoints table", _checkpoints_table),
    (8, "processor_runs.quarantined_held", _quarantined_held),
    (9, "processor_runs.totals", _run_totals),
)

LATEST = MIGRATIONS[-1][0]


def applied(con: Connection) -> int:
    _ddl(
        con,
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            name VARCHAR NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
        )
        """,
    )
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def migrate(con: Connection) -> list[str]:
    """Apply every pending migration, each in its own transaction; return their names. One
    process at a time (the backend's `migration_lock`)."""
    with backend(con).migration_lock(con):
        return _migrate(con)


def _migrate(con: Connection) -> list[str]:
    done = applied(con)
    ran: list[str] = []
    for version, name, step in MIGRATIONS:
        if version <= done:
            continue
        with transaction(con):
            step(con)
            con.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name]
            )
        ran.append(name)
    return ran
