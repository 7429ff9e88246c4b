"""The repository: everything the pipeline reads from and writes to the state database.

The one rule that makes retries, crashes and concurrent triggers safe: a batch's output rows
and its state rows are replaced together in one transaction. A crash leaves either the old rows
or the new rows of a session, never both and never neither.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from processors.base import Processor, Table
from state.db import Connection, backend, transaction
from state.duckdb_backend import json_rows
from state.errors import StateError
from state.plan import StoredState

Columns = dict[str, list[Any]]


@dataclass
class Outcome:
    """What reading one session produced; built in a worker, committed by the flow."""

    key: str
    status: Literal["processed", "unchanged", "failed"]
    read_at: datetime
    size: int | None = None
    mtime_ns: int | None = None
    file_hash: str | None = None
    columns: dict[str, Columns] = field(default_factory=dict)  # table -> column -> values
    increment: bool = False  # rows replace rows by table key, not the session's rows
    checkpoint: bytes | None = None  # append-safe processors: where to continue from
    complete_offset: int | None = None
    complete_hash: str | None = None
    items: int = 0
    malformed_lines: int = 0
    error: str | None = None
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # A segment of a big file, committed before the rest is read: its state row says how far
    # the read got (size = complete_offset), so a killed run continues from there.
    partial: bool = False
    # Rows a reader process has already serialized (`serialize_rows`): table -> (row count,
    # `json_rows` document). The committing process hands them to DuckDB as they are instead
    # of unpickling every value into a Python object first.
    documents: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def username(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def row_count(self) -> int:
        return sum(len(next(iter(cols.values()), ())) for cols in self.columns.values()) + sum(
            rows for rows, _ in self.documents.values()
        )


SessionsHook = Callable[[Connection, Sequence[str]], None]


def load_settled(
    con: Connection, processor_name: str, version: str
) -> tuple[set[tuple[str, int, int]], int]:
    """`(session_file, size, mtime_ns)` of every session last read well by this processor
    version, all a run needs to know of the sessions that did not change (nearly all of
    them), and how many sessions the state knows and has not seen go missing.

    One pass over the state answers both: a session not settled comes back with size -1,
    which no file has, so it is in the set yet never matches a file; the set is built from
    the fetched list at C speed. (Whole state rows for 100k sessions took ~1 s to fetch,
    mostly converting timestamps; a second query for the count cost PostgreSQL another
    60 ms of a 1.2 s no-change run.)"""
    rows = con.execute(
        "SELECT session_file, CASE WHEN status = 'ok' AND processor_version = ? "
        "AND size_bytes IS NOT NULL AND mtime_ns IS NOT NULL THEN size_bytes ELSE -1 END, "
        "coalesce(mtime_ns, -1) FROM session_processor_state "
        "WHERE processor_name = ? AND status <> 'missing'",
        [version, processor_name],
    ).fetchall()
    return set(rows), len(rows)


def mark_missing(
    con: Connection, processor_name: str, present: Iterable[str]
) -> list[str]:
    """Mark the state rows of sessions whose file is gone `missing` (their rows stay: the
    history outlives rotated transcripts); return their keys."""
    with transaction(con):
        rows = con.execute(
            "UPDATE session_processor_state SET status = 'missing' "
            "WHERE processor_name = $1 AND status <> 'missing' "
            "AND session_file NOT IN (SELECT UNNEST($2::VARCHAR[])) RETURNING session_file",
            [processor_name, list(present)],
        ).fetchall()
    return sorted(key for (key,) in rows)


def forget_missing(
    con: Connection,
    processor: Processor,
    keys: Sequence[str] | None = None,
    around: tuple[SessionsHook, SessionsHook] | None = None,
) -> list[str]:
    """Delete the output rows, checkpoints and state rows of this processor's missing
    sessions (all of them, or those of `keys`), on purpose; return their keys. `around`:
    called with the sessions before and after the rows go, in the same transaction."""
    with transaction(con):
        found = [
            key
            for (key,) in con.execute(
                "SELECT session_file FROM session_processor_state "
                "WHERE processor_name = ? AND status = 'missing' ORDER BY 1",
                [processor.name],
            ).fetchall()
            if keys is None or key in keys
        ]
        if found:
            existing = {
                name
                for (name,) in con.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_catalog = current_database() "
                    "AND table_schema = current_schema()"
                ).fetchall()
            }
            if around is not None:
                around[0](con, found)
            for table in processor.tables:
                if table.name not in existing:
                    continue
                con.execute(
                    f"DELETE FROM {table.name} "
                    "WHERE session_file IN (SELECT UNNEST($1::VARCHAR[]))",
                    [found],
                )
            if around is not None:
                around[1](con, found)
            for table in ("session_checkpoints", "session_processor_state"):
                con.execute(
                    f"DELETE FROM {table} WHERE processor_name = $1 "
                    "AND session_file IN (SELECT UNNEST($2::VARCHAR[]))",
                    [processor.name, found],
                )
    return found


def failing_sessions(con: Connection, processor_name: str) -> list[str]:
    """The sessions whose last read failed or that are quarantined."""
    rows = con.execute(
        "SELECT session_file FROM session_processor_state "
        "WHERE processor_name = ? AND status IN ('failed', 'quarantined') ORDER BY 1",
        [processor_name],
    ).fetchall()
    return [key for (key,) in rows]


def load_states(
    con: Connection, processor_name: str, keys: Sequence[str]
) -> dict[str, StoredState]:
    """Whole state rows of these sessions (those a run or a health check must look at)."""
    if not keys:
        return {}
    rows = con.execute(
        """
        SELECT session_file, size_bytes, mtime_ns, file_hash, processor_version, status,
               coalesce(attempts, 0), last_attempt_at, complete_offset, complete_hash
        FROM session_processor_state
        WHERE processor_name = $1 AND session_file IN (SELECT UNNEST($2::VARCHAR[]))
        """,
        [processor_name, list(keys)],
    ).fetchall()
    return {row[0]: StoredState(*row[1:]) for row in rows}


def load_checkpoints(
    con: Connection, processor_name: str, keys: Sequence[str]
) -> dict[str, bytes]:
    """The stored checkpoints of the sessions about to be continued, in one query."""
    if not keys:
        return {}
    rows = con.execute(
        "SELECT session_file, checkpoint FROM session_checkpoints "
        "WHERE processor_name = $1 AND session_file IN (SELECT UNNEST($2::VARCHAR[]))",
        [processor_name, list(keys)],
    ).fetchall()
    return {row[0]: bytes(row[1]) for row in rows}


def _added_columns(table: Table, old_ddl: str) -> list[tuple[str, str]]:
    """The columns `table` adds at the end of the table `old_ddl` created, or [] when the
    change is anything else."""
    for n in range(len(table.columns) - 1, 0, -1):
        if Table(table.name, table.columns[:n]).ddl == old_ddl:
            return list(table.columns[n:])
    return []


def ensure_outputs(con: Connection, processor: Processor) -> list[str]:
    """Create the processor's output tables and views, in the caller's transaction.

    A table whose DDL changed since it was created is dropped and recreated, and every state
    row of that processor is marked stale so the next run refills it: output rows always
    match the current schema and a clean processing of each session. A table the processor
    no longer declares is dropped too (its name may now be one of its views). Returns the
    rebuilt and dropped table names.
    """
    rows = backend(con)
    rebuilt: list[str] = []
    current = {table.name for table in processor.tables}
    for (name,) in con.execute(
        "SELECT table_name FROM processor_tables WHERE processor_name = ? ORDER BY 1",
        [processor.name],
    ).fetchall():
        if name not in current:
            con.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
            con.execute("DELETE FROM processor_tables WHERE table_name = ?", [name])
            rebuilt.append(name)
    for table in processor.tables:
        row = con.execute(
            "SELECT processor_name, ddl FROM processor_tables WHERE table_name = ?",
            [table.name],
        ).fetchone()
        if row is not None and row[0] != processor.name:
            raise StateError(
                f"table {table.name} belongs to processor {row[0]!r}, not {processor.name!r}"
            )
        if row is not None and row[1] == table.ddl:
            continue
        added = _added_columns(table, row[1]) if row is not None else None
        if added:
            # Columns added at the end: the rows already stored stay right (the new columns
            # are NULL until their session is read again), so nothing is reprocessed; for an
            # LLM processor that would mean paying for its whole history again.
            for name, sql_type in added:
                con.execute(
                    rows.dialect(
                        f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS {name} {sql_type}"
                    )
                )
        elif row is not None:
            con.execute(f"DROP TABLE IF EXISTS {table.name} CASCADE")
            rebuilt.append(table.name)
        con.execute(rows.dialect(table.ddl))
        rows.after_table(con, table)
        con.execute(
            "INSERT INTO processor_tables (processor_name, table_name, ddl) VALUES (?, ?, ?) "
            "ON CONFLICT (table_name) DO UPDATE SET "
            "processor_name = EXCLUDED.processor_name, ddl = EXCLUDED.ddl",
            [processor.name, table.name, table.ddl],
        )
    if rebuilt:
        con.execute(
            "UPDATE session_processor_state SET processor_version = '(schema changed)' "
            "WHERE processor_name = ?",
            [processor.name],
        )
    rows.prepare(con)
    for view in processor.views:
        rows.create_view(con, view)
    return rebuilt


def serialize_rows(tables: Sequence[Table], outcomes: list[Outcome]) -> list[Outcome]:
    """Turn the rows of whole reads into `json_rows` documents, one per outcome and table, in
    place (what a reader process does before sending its outcomes back: pickling a document
    is a copy of bytes, unpickling columns of values makes every value an object again in the
    committing process). Rows JSON cannot carry exactly, and increments (whose key columns
    the commit needs as values), keep their columns."""
    for outcome in outcomes:
        if outcome.status != "processed" or outcome.increment:
            continue
        for table in tables:
            columns = outcome.columns.get(table.name)
            if not columns or not columns.get(table.column_names[0]):
                continue
            piece = [
                columns.get(name) or [None] * len(columns[table.column_names[0]])
                for name in table.column_names
            ]
            document = json_rows(table, piece)
            if document is not None:
                outcome.documents[table.name] = (len(piece[0]), document)
                del outcome.columns[table.name]
    return outcomes


def _take(outcomes: Sequence[Outcome], table: Table) -> Columns:
    """The outcomes' rows for `table`, one column list each, taken out of the outcomes so that
    each table's values can be freed once inserted (a big session's rows are most of a
    commit's memory, and a Prefect future keeps its task's outcomes). One outcome's columns
    are used as they are, not copied."""
    found = [cols for o in outcomes if (cols := o.columns.pop(table.name, None))]
    if len(found) == 1:
        return found[0]
    merged: Columns = {name: [] for name in table.column_names}
    for cols in found:
        for name in table.column_names:
            merged[name].extend(cols[name])
    return merged


def apply_batch(
    con: Connection,
    processor: Processor,
    outcomes: Sequence[Outcome],
    max_attempts: int,
) -> list[str]:
    """Apply a batch of outcomes inside the caller's transaction (a session's rows and its
    state row must commit together; the run's end may join them); return the keys
    quarantined by it."""
    processed = [o for o in outcomes if o.status == "processed"]
    whole = [o for o in processed if not o.increment]
    increments = [o for o in processed if o.increment]
    unchanged = [o for o in outcomes if o.status == "unchanged"]
    failed = [o for o in outcomes if o.status == "failed"]
    quarantined: list[str] = []
    writer = backend(con)
    if whole:
        keys = [o.key for o in whole]
        for table in processor.tables:
            con.execute(
                f"DELETE FROM {table.name} WHERE session_file IN (SELECT UNNEST($1::VARCHAR[]))",
                [keys],
            )
            writer.insert_columns(con, table, _take(whole, table))
            documents = [d for o in whole if (d := o.documents.pop(table.name, None))]
            if documents:
                writer.insert_documents(con, table, documents)
    for table in processor.tables if increments else ():
        rows = _take(increments, table)
        writer.delete_by_key(con, table, rows)
        writer.insert_columns(con, table, rows)
    if whole:
        _upsert_read(con, processor, whole, "whole")
    if increments:
        _upsert_read(con, processor, increments, "increment")
    if unchanged:
        _upsert_read(con, processor, unchanged, "unchanged")
    if failed:
        quarantined = _record_failures(con, processor.name, failed, max_attempts)
    return quarantined


def _upsert_read(
    con: Connection,
    processor: Processor,
    outcomes: Sequence[Outcome],
    mode: Literal["whole", "increment", "unchanged"],
) -> None:
    """Record a successful read. For an unchanged (hash-equal) file only the stat moves on:
    items and processed_at still describe the processing that produced the stored rows."""
    malformed = (  # an increment read only the new lines: they add to the earlier ones
        "coalesce(session_processor_state.malformed_lines, 0) + EXCLUDED.malformed_lines"
        if mode == "increment"
        else "EXCLUDED.malformed_lines"
    )
    on_conflict_items = (
        "items_extracted = EXCLUDED.items_extracted, processed_at = EXCLUDED.processed_at, "
        "complete_offset = EXCLUDED.complete_offset, complete_hash = EXCLUDED.complete_hash, "
        f"malformed_lines = {malformed},"
        if mode != "unchanged"
        else ""
    )
    con.execute(
        f"""
        INSERT INTO session_processor_state (
            processor_name, session_file, username, processed_at, items_extracted, file_hash,
            processor_version, size_bytes, mtime_ns, read_at, malformed_lines, attempts,
            last_error, last_attempt_at, status, complete_offset, complete_hash)
        SELECT $1::VARCHAR, UNNEST($2::VARCHAR[]), UNNEST($3::VARCHAR[]),
               UNNEST($4::TIMESTAMPTZ[]), UNNEST($5::INTEGER[]), UNNEST($6::VARCHAR[]),
               $7::VARCHAR, UNNEST($8::BIGINT[]), UNNEST($9::BIGINT[]),
               UNNEST($10::TIMESTAMPTZ[]), UNNEST($11::INTEGER[]), 0, NULL,
               UNNEST($4::TIMESTAMPTZ[]), 'ok', UNNEST($12::BIGINT[]), UNNEST($13::VARCHAR[])
        ON CONFLICT (processor_name, session_file) DO UPDATE SET
            {on_conflict_items}
            file_hash = EXCLUDED.file_hash, processor_version = EXCLUDED.processor_version,
            size_bytes = EXCLUDED.size_bytes, mtime_ns = EXCLUDED.mtime_ns,
            read_at = EXCLUDED.read_at, attempts = 0, last_error = NULL,
            last_attempt_at = EXCLUDED.last_attempt_at, status = 'ok'
        """,
        [
            processor.name,
            [o.key for o in outcomes],
            [o.username for o in outcomes],
            [o.finished_at for o in outcomes],
            [o.items for o in outcomes],
            [o.file_hash for o in outcomes],
            str(processor.version),
            [o.size for o in outcomes],
            [o.mtime_ns for o in outcomes],
            [o.read_at for o in outcomes],
            [o.malformed_lines for o in outcomes],
            [o.complete_offset for o in outcomes],
            [o.complete_hash for o in outcomes],
        ],
    )
    if mode != "unchanged":
        _replace_checkpoints(con, processor.name, outcomes)


def _replace_checkpoints(
    con: Connection, processor_name: str, outcomes: Sequence[Outcome]
) -> None:
    """A read's checkpoint replaces the session's old one (or removes it, when it has none)."""
    con.execute(
        "DELETE FROM session_checkpoints WHERE processor_name = $1 "
        "AND session_file IN (SELECT UNNEST($2::VARCHAR[]))",
        [processor_name, [o.key for o in outcomes]],
    )
    kept = [o for o in outcomes if o.checkpoint is not None]
    small = [o for o in kept if len(o.checkpoint or b"") <= 64 << 10]
    if small:
        con.execute(
            "INSERT INTO session_checkpoints "
            "SELECT $1::VARCHAR, UNNEST($2::VARCHAR[]), UNNEST($3::BYTEA[])",
            [processor_name, [o.key for o in small], [o.checkpoint for o in small]],
        )
    for outcome in kept:  # big ones one statement each: a list parameter copies them twice more
        if len(outcome.checkpoint or b"") > 64 << 10:
            con.execute(
                "INSERT INTO session_checkpoints VALUES ($1, $2, $3)",
                [processor_name, outcome.key, outcome.checkpoint],
            )


def _record_failures(
    con: Connection,
    processor_name: str,
    failed: Sequence[Outcome],
    max_attempts: int,
) -> list[str]:
    """Count the attempt and keep the error; the stored hash and output rows stay those of
    the last good read, so a failure never loses what was extracted before."""
    con.execute(
        """
        INSERT INTO session_processor_state (
            processor_name, session_file, username, attempts, last_error, last_attempt_at, status)
        SELECT $1::VARCHAR, UNNEST($2::VARCHAR[]), UNNEST($3::VARCHAR[]), 1,
               UNNEST($4::VARCHAR[]), UNNEST($5::TIMESTAMPTZ[]),
               CASE WHEN $6::INTEGER <= 1 THEN 'quarantined' ELSE 'failed' END
        ON CONFLICT (processor_name, session_file) DO UPDATE SET
            attempts = coalesce(session_processor_state.attempts, 0) + 1,
            last_error = EXCLUDED.last_error,
            last_attempt_at = EXCLUDED.last_attempt_at,
            status = CASE WHEN coalesce(session_processor_state.attempts, 0) + 1 >= $6::INTEGER
                          THEN 'quarantined' ELSE 'failed' END
        """,
        [
            processor_name,
            [o.key for o in failed],
            [o.username for o in failed],
            [o.error for o in failed],
            [o.finished_at for o in failed],
            max_attempts,
        ],
    )
    rows = con.execute(
        "SELECT session_file FROM session_processor_state WHERE processor_name = $1 "
        "AND status = 'quarantined' AND session_file IN (SELECT UNNEST($2::VARCHAR[]))",
        [processor_name, [o.key for o in failed]],
    ).fetchall()
    return sorted(r[0] for r in rows)


@dataclass
class RunFigures:
    """The figures of one run: the old system's keys plus quarantined, deferred and timing.

    `quarantined` is what this run did (sessions it quarantined); `quarantined_held` how many
    sessions are in quarantine when it ends (not read until `reprocess` releases them)."""

    processor: str
    scanned: int = 0
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    quarantined: int = 0
    quarantined_held: int = 0
    deferred: int = 0
    items_extracted: int = 0
    errors_detail: list[dict[str, str]] = field(default_factory=list)
    duration_seconds: float = 0.0
    # What the sessions this run read add up to, for processors that say (usage: tokens, cost)
    totals: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "processor": self.processor,
            "scanned": self.scanned,
            "processed": self.processed,
            "skipped": self.skipped,
            "errors": self.errors,
            "quarantined": self.quarantined,
            "quarantined_held": self.quarantined_held,
            "deferred": self.deferred,
            "items_extracted": self.items_extracted,
            "errors_detail": self.errors_detail,
            "duration_seconds": round(self.duration_seconds, 3),
            "totals": self.totals,
        }


def start_run(
    con: Connection,
    run_id: str,
    processor: Processor,
    *,
    started_at: datetime,
    flow_run_id: str | None,
) -> None:
    """Enter a run in the ledger before any work, with the host and pid doing it."""
    con.execute(
        """
        INSERT INTO processor_runs (
            run_id, processor_name, processor_version, flow_run_id, started_at, status, host, pid)
        VALUES (?, ?, ?, ?, ?, 'running', ?, ?)
        ON CONFLICT (run_id) DO UPDATE SET
            processor_name = EXCLUDED.processor_name,
            processor_version = EXCLUDED.processor_version,
            flow_run_id = EXCLUDED.flow_run_id, started_at = EXCLUDED.started_at,
            status = 'running', host = EXCLUDED.host, pid = EXCLUDED.pid
        """,
        [
            run_id,
            processor.name,
            str(processor.version),
            flow_run_id,
            started_at,
            socket.gethostname(),
            os.getpid(),
        ],
    )


def finish_run(
    con: Connection,
    run_id: str,
    figures: RunFigures | None,
    *,
    finished_at: datetime,
    status: str = "completed",
) -> None:
    """Close a run's ledger row with its figures (none when the run failed as a whole)."""
    f = figures or RunFigures(processor="")
    con.execute(
        """
        UPDATE processor_runs SET
            finished_at = ?, status = ?,
            duration_seconds = extract(epoch FROM ?::TIMESTAMPTZ - started_at),
            scanned = ?, processed = ?, skipped = ?, errors = ?, quarantined = ?,
            quarantined_held = ?, deferred = ?, items_extracted = ?, errors_detail = ?::JSON,
            totals = ?::JSON
        WHERE run_id = ?
        """,
        [
            finished_at,
            status,
            finished_at,
            f.scanned,
            f.processed,
            f.skipped,
            f.errors,
            f.quarantined,
            f.quarantined_held,
            f.deferred,
            f.items_extracted,
            orjson.dumps(f.errors_detail).decode(),
            orjson.dumps(f.totals).decode() if f.totals else None,
            run_id,
        ],
    )


@dataclass(frozen=True)
class ProcessorStatus:
    processor: str
    known: int
    processed: int
    failed: int
    quarantined: int
    missing: int  # files gone from the data dir; their rows are kept
    last_run_at: datetime | None
    last_run_errors: int | None
    last_run_status: str | None  # completed, failed, cancelled, crashed, running


def status(con: Connection, processor_names: Iterable[str]) -> list[ProcessorStatus]:
    counts = {
        row[0]: row[1:]
        for row in con.execute(
            """
            SELECT processor_name, count(*),
                   count(*) FILTER (WHERE status = 'ok' AND file_hash IS NOT NULL),
                   count(*) FILTER (WHERE status = 'failed'),
                   count(*) FILTER (WHERE status = 'quarantined'),
                   count(*) FILTER (WHERE status = 'missing')
            FROM session_processor_state GROUP BY processor_name
            """
        ).fetchall()
    }
    # The latest run whatever its end: a failed last run must not read as "never".
    runs = {
        row[0]: row[1:]
        for row in con.execute(
            """
            SELECT DISTINCT ON (processor_name) processor_name,
                   coalesce(finished_at, started_at), errors, status
            FROM processor_runs ORDER BY processor_name, started_at DESC
            """
        ).fetchall()
    }
    names = list(dict.fromkeys([*processor_names, *counts]))
    result = []
    for name in names:
        known, processed, failed, quarantined, missing = counts.get(name, (0, 0, 0, 0, 0))
        last_run_at, last_errors, last_status = runs.get(name, (None, None, None))
        result.append(
            ProcessorStatus(
                name,
                known,
                processed,
                failed,
                quarantined,
                missing,
                last_run_at,
                last_errors,
                last_status,
            )
        )
    return result


def release(
    con: Connection,
    processor_name: str,
    *,
    user: str | None = None,
    session: str | None = None,
    quarantined_only: bool = False,
) -> int:
    """Mark sessions for reprocessing on the next run; return how many.

    Their output rows stay until the reprocessing replaces them, so nothing is lost if it
    fails. Attempts restart from zero, which also releases quarantined sessions.
    """
    where = ["processor_name = ?"]
    params: list[Any] = [processor_name]
    if user is not None:
        where.append("username = ?")
        params.append(user)
    if session is not None:
        where.append("session_file = ?")
        params.append(session)
    if quarantined_only:
        where.append("status = 'quarantined'")
    with transaction(con):
        row = con.execute(
            f"""
            UPDATE session_processor_state
            SET processor_version = '(reprocess)', attempts = 0, status = 'ok', last_error = NULL
            WHERE {" AND ".join(where)}
            RETURNING 1
            """,
            params,
        ).fetchall()
    return len(row)
