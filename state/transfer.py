"""Move an embedded DuckDB state into PostgreSQL (`session-pipeline migrate --to URL`).

Every base table of the DuckDB file is copied, the pipeline's own and every processor's
(third-party ones too, found in the file's catalog), so that a run against PostgreSQL
afterwards reads only what a run against the file would have read: the state rows, stats and
checkpoints come along unchanged.

The source is only read: it is opened read-only (a busy file gives the usual lock-timeout
error) and must already be at this version's latest migration; an older file is upgraded by
`session-pipeline migrate --db FILE` first. Upgrading a temporary copy instead would double
the disk and time a multi-gigabyte state costs and still leave the file itself behind.
While the copy runs, each processor's run lock on this host is held, so no run starts (or is
halfway) meanwhile.

The target is written in one transaction: its tables are made the way a run makes them
(`migrate`, then `ensure_outputs` for every registered processor, so its views exist), the
source's other tables from their DuckDB columns, and the rows go in with COPY, formatted by
DuckDB as COPY text and streamed in pieces, never a whole table in memory. Row counts are
compared per table; any difference rolls everything back. A target schema that already holds
rows in any of these tables is refused before anything is written.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import duckdb

from processors import registry
from processors.base import Processor
from state import duckdb_backend, postgres_backend, store
from state.db import describe, location
from state.errors import PostgresError, StateError
from state.migrations import LATEST, migrate
from state.postgres_backend import PostgresConnection, PostgresDatabase

# The pipeline's own tables (state/migrations.py).
PIPELINE_TABLES = (
    "schema_migrations",
    "session_processor_state",
    "session_checkpoints",
    "processor_runs",
    "processor_tables",
    "trigger_audit",
)

# Source rows per piece written to COPY, at most, and the text a piece aims at: a table of big
# values (checkpoints) goes a few rows at a time, the usage tables 10k rows (~2 MB).
BATCH_ROWS = 10_000
BATCH_BYTES = 8 << 20
# Tables this big are announced as their copy starts (the rest take a moment each).
PROGRESS_ROWS = 100_000


class TransferError(StateError):
    """The state cannot be moved; one line for the user, and nothing was written."""


@dataclass(frozen=True)
class TableCopy:
    """One table's rows in the source and, after the copy, in the target."""

    name: str
    source_rows: int
    target_rows: int
    seconds: float
    created: str  # how the target table was made: "migrate", "processor <name>", "catalog"

    @property
    def ok(self) -> bool:
        return self.source_rows == self.target_rows


class CountMismatchError(TransferError):
    """Rows went missing or appeared on the way; the target transaction was rolled back."""

    def __init__(self, message: str, copies: list[TableCopy]) -> None:
        super().__init__(message)
        self.copies = copies


@dataclass
class _Column:
    name: str
    duck_type: str
    nullable: bool
    default: str | None


@dataclass
class _SourceTable:
    name: str
    columns: list[_Column]
    rows: int
    unique: list[tuple[str, list[str]]] = field(default_factory=list)  # (PRIMARY KEY|UNIQUE, …)


Progress = Callable[[str], None]


def migrate_state(
    source: Path | str,
    target: PostgresDatabase | str,
    *,
    progress: Progress | None = None,
    lock_timeout: float | None = None,
) -> list[TableCopy]:
    """Copy every table of the DuckDB state at `source` into the empty PostgreSQL schema
    `target`, in one transaction; the tables with their row counts on both sides."""
    say = progress or (lambda _line: None)
    source_db, target_db = _check_locations(source, target)
    if not source_db.exists():
        raise TransferError(f"no state at {source_db}: nothing to migrate (pass --db FILE)")
    if source_db.is_dir():
        raise TransferError(f"{source_db} is a directory, not a DuckDB state file")
    processors = _loaded_processors()
    with ExitStack() as stack:
        _hold_run_locks(stack, source_db, _processor_names(source_db, processors))
        try:
            src = stack.enter_context(
                duckdb_backend.connect(source_db, read_only=True, lock_timeout=lock_timeout)
            )
            tables = _source_tables(src)
            _check_source_version(src, source_db, tables)
            tgt = stack.enter_context(target_db.connect())
            return _copy_all(src, tgt, source_db, target_db, tables, processors, say)
        except PostgresError as error:
            raise TransferError(
                f"PostgreSQL refused the copy ({error}); nothing was written to "
                f"{describe(target_db)}"
            ) from None
        except duckdb.Error as error:
            first = str(error).strip().splitlines()[0]
            raise TransferError(f"cannot read {source_db}: {first}") from None
    raise AssertionError("unreachable")  # pragma: no cover (ExitStack swallows nothing)


def _check_locations(
    source: Path | str, target: PostgresDatabase | str
) -> tuple[Path, PostgresDatabase]:
    target_db = location(target) if not isinstance(target, PostgresDatabase) else target
    if not isinstance(target_db, PostgresDatabase):
        raise TransferError(
            f"the target must be a postgresql:// URL, not {str(target)!r} "
            "(e.g. postgresql://user@host:5432/db)"
        )
    source_db = location(source) if not isinstance(source, Path) else source
    if isinstance(source_db, PostgresDatabase):
        raise TransferError(
            f"the source must be an embedded DuckDB state file, not {describe(source_db)} "
            "(pass --db FILE, or unset SESSION_PIPELINE_DB)"
        )
    return source_db, target_db


# --- the source ----------------------------------------------------------------------------------


def _source_tables(src: duckdb.DuckDBPyConnection) -> list[_SourceTable]:
    """The base tables of the file's main schema (not views, not temporary), with their
    columns, keys and row counts."""
    found = src.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND NOT temporary ORDER BY table_name"
    ).fetchall()
    tables = []
    for (name,) in found:
        columns = [
            _Column(column, duck_type, bool(nullable), default)
            for column, duck_type, nullable, default in src.execute(
                "SELECT column_name, data_type, is_nullable, column_default FROM duckdb_columns() "
                "WHERE database_name = current_database() AND schema_name = 'main' "
                "AND table_name = ? ORDER BY column_index",
                [name],
            ).fetchall()
        ]
        unique = [
            (kind, list(names))
            for kind, names in src.execute(
                "SELECT constraint_type, constraint_column_names FROM duckdb_constraints() "
                "WHERE database_name = current_database() AND schema_name = 'main' "
                "AND table_name = ? AND constraint_type IN ('PRIMARY KEY', 'UNIQUE') "
                "ORDER BY constraint_index",
                [name],
            ).fetchall()
        ]
        row = src.execute(f"SELECT count(*) FROM {_ident(name)}").fetchone()
        tables.append(_SourceTable(name, columns, int(row[0]) if row else 0, unique))
    return tables


def _check_source_version(
    src: duckdb.DuckDBPyConnection, source_db: Path, tables: list[_SourceTable]
) -> None:
    """The file must be at this version's latest migration: the copy never writes to it."""
    version = 0
    if any(t.name == "schema_migrations" for t in tables):
        row = src.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        version = int(row[0]) if row else 0
    if version == 0 and not any(t.name == "session_processor_state" for t in tables):
        raise TransferError(f"{source_db} holds no session-pipeline state: nothing to migrate")
    if version < LATEST:
        raise TransferError(
            f"the state at {source_db} is from an older version (migration {version} of "
            f"{LATEST}): upgrade it first with `session-pipeline migrate --db {source_db}`, "
            "then run this again"
        )
    if version > LATEST:
        raise TransferError(
            f"the state at {source_db} was written by a newer session-pipeline (migration "
            f"{version}; this one knows {LATEST}): upgrade session-pipeline first"
        )


def _loaded_processors() -> list[Processor]:
    """Every registered processor that loads, enabled or not: a disabled one's tables and
    views are made too, as a run of it would make them."""
    return [e.processor for e in registry.entries() if e.processor is not None]


def _processor_names(source_db: Path, processors: list[Processor]) -> list[str]:
    """The processors whose runs could write the file: those registered, and any other
    that ever ran on this host (its lock file is beside the state)."""
    from state.hostlock import lock_path

    names = {p.name for p in processors}
    prefix, suffix = f"{source_db.name}.", ".lock"
    try:
        beside = list(source_db.parent.iterdir())
    except OSError:
        beside = []
    for path in beside:  # (not a glob: the file's name may hold `[`, `*` or `?`)
        if path.name.startswith(prefix) and path.name.endswith(suffix):
            name = path.name[len(prefix) : -len(suffix)]
            if name and lock_path(source_db, name) == path:
                names.add(name)
    return sorted(names)


def _hold_run_locks(stack: ExitStack, source_db: Path, names: list[str]) -> None:
    """Each processor's run lock on this host, for the whole copy: a run that is going is
    refused in one line, and none starts until the copy is done. A folder this process
    cannot write to holds no run either: nothing to lock there."""
    from state.hostlock import HostLock

    for name in names:
        try:
            stack.enter_context(HostLock(source_db, name))
        except OSError:
            return
        except StateError as error:
            raise TransferError(
                f"{error}; wait for it, or stop the pipeline, then migrate"
            ) from None


# --- the target ----------------------------------------------------------------------------------


class _Nested(PostgresConnection):
    """The target connection inside the copy's one transaction: the transactions that
    `migrate` opens and closes become savepoints of it."""

    _AS_SAVEPOINTS: ClassVar[dict[str, str]] = {
        "BEGIN": "SAVEPOINT transfer_step",
        "BEGIN TRANSACTION": "SAVEPOINT transfer_step",
        "COMMIT": "RELEASE SAVEPOINT transfer_step",
        "ROLLBACK": "ROLLBACK TO SAVEPOINT transfer_step",
    }

    def __init__(self, con: PostgresConnection) -> None:
        super().__init__(con.raw)

    def execute(self, sql: str, params: Any = None) -> Any:
        return super().execute(self._AS_SAVEPOINTS.get(sql.strip().upper(), sql), params)


@contextmanager
def _one_transaction(con: PostgresConnection) -> Iterator[None]:
    con.execute("BEGIN")
    try:
        yield
    except BaseException:
        with suppress(PostgresError):  # a lost connection has rolled back already
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _target_tables(con: PostgresConnection) -> dict[str, str]:
    """The relations of the target schema, by name: `r` table, `v` view, …"""
    return {
        str(name): str(kind)
        for name, kind in con.execute(
            "SELECT c.relname, c.relkind::TEXT FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        ).fetchall()
    }


def _check_empty(con: PostgresConnection, target_db: PostgresDatabase, ours: set[str]) -> None:
    present = _target_tables(con)
    holding = []
    for name in sorted(ours):
        if present.get(name) in ("r", "p"):
            row = con.execute(f"SELECT EXISTS (SELECT 1 FROM {_ident(name)})").fetchone()
            if row and row[0]:
                holding.append(name)
    if holding:
        shown = ", ".join(holding[:4]) + (
            f" and {len(holding) - 4} more" if len(holding) > 4 else ""
        )
        raise TransferError(
            f"{describe(target_db)} already holds session-pipeline state ({shown} not empty); "
            "migrate copies into an empty schema only: drop that schema first, or name "
            "another with ?options=-csearch_path%3D<schema>"
        )


def _drop_indexes(con: PostgresConnection, table: str) -> list[str]:
    """Drop the table's indexes that no constraint owns; their definitions, to make again."""
    found = con.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
        "JOIN pg_namespace n ON n.oid = t.relnamespace "
        "WHERE n.nspname = current_schema() AND t.relname = $1 "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
        [table],
    ).fetchall()
    for name, _ in found:
        con.execute(f"DROP INDEX {_ident(str(name))}")
    return [str(definition) for _, definition in found]


def _columns_of(con: PostgresConnection, table: str) -> set[str]:
    return {
        str(row[0])
        for row in con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1",
            [table],
        ).fetchall()
    }


def _outdated(processor: Processor, source_ddl: dict[str, tuple[str, str]]) -> bool:
    """Whether the source's tables of `processor` were made by another version of it (a run
    would rebuild or extend them): then they are copied as they are, and that run, on the
    target, upgrades them as it would have on the source."""
    declared = {t.name: t.ddl for t in processor.tables}
    for table, (owner, ddl) in source_ddl.items():
        if owner == processor.name and declared.get(table) != ddl:
            return True
    return False


def _copy_all(
    src: duckdb.DuckDBPyConnection,
    tgt: PostgresConnection,
    source_db: Path,
    target_db: PostgresDatabase,
    tables: list[_SourceTable],
    processors: list[Processor],
    say: Progress,
) -> list[TableCopy]:
    source_ddl: dict[str, tuple[str, str]] = {}
    if any(t.name == "processor_tables" for t in tables):
        source_ddl = {
            str(name): (str(owner), str(ddl))
            for owner, name, ddl in src.execute(
                "SELECT processor_name, table_name, ddl FROM processor_tables"
            ).fetchall()
        }
    ours = {t.name for t in tables} | set(PIPELINE_TABLES)
    ours |= {t.name for p in processors for t in p.tables}
    nested = _Nested(tgt)
    with postgres_backend.migration_lock(tgt), _one_transaction(tgt):
        _check_empty(tgt, target_db, ours)
        made: dict[str, str] = {}
        before = set(_target_tables(tgt))
        migrate(nested)
        for name in set(_target_tables(tgt)) - before:
            made[name] = "migrate"
        for processor in processors:
            if _outdated(processor, source_ddl):
                say(
                    f"{processor.name}: its tables are from another version of it; copied as "
                    "they are (its next run upgrades them, as it would have on the source)"
                )
                continue
            before = set(_target_tables(tgt))
            try:
                store.ensure_outputs(nested, processor)
            except PostgresError as error:
                raise TransferError(
                    f"processor {processor.name}: its tables or views cannot be made in "
                    f"PostgreSQL ({error}); nothing was written to {describe(target_db)}"
                ) from None
            for name in set(_target_tables(tgt)) - before:
                made[name] = f"processor {processor.name}"
        # What migrate and ensure_outputs recorded is replaced by the source's own rows.
        for name in ("schema_migrations", "processor_tables"):
            tgt.execute(f"DELETE FROM {_ident(name)}")
        present = _target_tables(tgt)
        for table in tables:
            kind = present.get(table.name)
            if kind is None:
                _create_table(tgt, table)
                made[table.name] = "catalog"
            elif kind not in ("r", "p"):
                raise TransferError(
                    f"{table.name} is a table in the source but a view in the target: the "
                    "source is from another version of its processor; run it once on the "
                    f"source (`session-pipeline run --db {source_db} ...`), then migrate"
                )
            else:
                has = _columns_of(tgt, table.name)
                missing = [c.name for c in table.columns if c.name not in has]
                if missing:
                    raise TransferError(
                        f"table {table.name}: the source has columns this version does not "
                        f"make ({', '.join(missing)}); run its processor once on the source, "
                        "then migrate"
                    )
        tgt.execute("SET LOCAL maintenance_work_mem = '256MB'")
        copies = []
        for table in tables:
            if table.rows >= PROGRESS_ROWS:
                say(f"copying {table.name} ({table.rows:,} rows)")
            started = time.monotonic()
            # An index is built once after the rows are in, not row by row (2M requests:
            # ~40% of the copy's time); the table, made in this transaction, takes its rows
            # frozen, so no vacuum has to rewrite them later.
            indexes = _drop_indexes(tgt, table.name) if table.rows else []
            tgt.execute(f"TRUNCATE {_ident(table.name)}")
            written = _copy_rows(src, tgt, table)
            for definition in indexes:
                tgt.execute(definition)
            row = tgt.execute(f"SELECT count(*) FROM {_ident(table.name)}").fetchone()
            target_rows = int(row[0]) if row else 0
            if written != table.rows:  # read more or fewer than counted: never expected
                raise CountMismatchError(
                    f"{table.name}: counted {table.rows} rows in the source but read {written}; "
                    f"nothing was written to {describe(target_db)}",
                    copies,
                )
            copies.append(
                TableCopy(
                    table.name,
                    table.rows,
                    target_rows,
                    time.monotonic() - started,
                    made.get(table.name, "existing"),
                )
            )
        wrong = [c for c in copies if not c.ok]
        if wrong:
            shown = ", ".join(f"{c.name} {c.source_rows} -> {c.target_rows}" for c in wrong[:3])
            raise CountMismatchError(
                f"row counts differ ({shown}); nothing was written to {describe(target_db)}",
                copies,
            )
        for table in tables:
            tgt.execute(f"ANALYZE {_ident(table.name)}")
    return copies


# --- DDL for a table no processor and no migration makes ---------------------------------------

_INTEGER_TYPES = {
    "TINYINT": "SMALLINT",
    "UTINYINT": "SMALLINT",
    "SMALLINT": "SMALLINT",
    "USMALLINT": "INTEGER",
    "INTEGER": "INTEGER",
    "UINTEGER": "BIGINT",
    "BIGINT": "BIGINT",
    "UBIGINT": "NUMERIC(20)",
    "HUGEINT": "NUMERIC(39)",
    "UHUGEINT": "NUMERIC(39)",
    "BIGNUM": "NUMERIC",
    "VARINT": "NUMERIC",
}
_PLAIN_TYPES = {
    "BOOLEAN": "BOOLEAN",
    "FLOAT": "REAL",
    "DOUBLE": "DOUBLE PRECISION",
    "VARCHAR": "VARCHAR",
    "JSON": "JSON",
    "BLOB": "BYTEA",
    "DATE": "DATE",
    "TIME": "TIME",
    "TIME WITH TIME ZONE": "TIMETZ",
    "TIMESTAMP": "TIMESTAMP",
    "TIMESTAMP_S": "TIMESTAMP",
    "TIMESTAMP_MS": "TIMESTAMP",
    "TIMESTAMP_NS": "TIMESTAMP",
    "TIMESTAMP WITH TIME ZONE": "TIMESTAMPTZ",
    "INTERVAL": "INTERVAL",
    "UUID": "UUID",
    "BIT": "VARBIT",
}
_NESTED = re.compile(r"^(STRUCT|MAP|UNION)\b|\[\d*\]$", re.I)
_DECIMAL = re.compile(r"^DECIMAL\((\d+),\s*(\d+)\)$", re.I)
_SIMPLE_DEFAULT = re.compile(
    r"^(-?\d+(\.\d+)?|'(?:[^']|'')*'|true|false|current_timestamp|now\(\))$", re.I
)


def postgres_type(duck_type: str) -> str:
    """A DuckDB column type as PostgreSQL's: nested values (lists, structs, maps) as JSON,
    anything without a counterpart (an ENUM) as text."""
    upper = duck_type.strip().upper()
    if upper in _INTEGER_TYPES:
        return _INTEGER_TYPES[upper]
    if upper in _PLAIN_TYPES:
        return _PLAIN_TYPES[upper]
    if _NESTED.search(upper):
        return "JSON"
    decimal = _DECIMAL.match(upper)
    if decimal:
        return f"NUMERIC({decimal.group(1)},{decimal.group(2)})"
    return "TEXT"


def _create_table(con: PostgresConnection, table: _SourceTable) -> None:
    parts = []
    for column in table.columns:
        text = f"{_ident(column.name)} {postgres_type(column.duck_type)}"
        default = (column.default or "").strip()
        if default and _SIMPLE_DEFAULT.match(default):
            text += f" DEFAULT {default}"
        if not column.nullable:
            text += " NOT NULL"
        parts.append(text)
    for kind, names in table.unique:
        parts.append(f"{kind} ({', '.join(_ident(n) for n in names)})")
    con.execute(f"CREATE TABLE {_ident(table.name)} ({', '.join(parts)})")
    if any(c.name == "session_file" for c in table.columns):
        # as postgres_backend.after_table does for a processor's tables
        index = _ident(f"{table.name}_by_session"[:63])
        con.execute(f"CREATE INDEX {index} ON {_ident(table.name)} (session_file)")


# --- rows ---------------------------------------------------------------------------------------


def _text(expression: str) -> str:
    """Text as a COPY text field: backslash, newline, carriage return and tab escaped, and
    NUL (which PostgreSQL text cannot hold) as U+FFFD, as the backend's own writes store it."""
    return (
        f"replace(replace(replace(replace(replace({expression}, '\\', '\\\\'), chr(10), '\\n'), "
        f"chr(13), '\\r'), chr(9), '\\t'), chr(0), '\ufffd')"
    )


def copy_field(column: str, duck_type: str) -> str:
    """DuckDB SQL giving the column's value as a field of PostgreSQL's COPY text format,
    exactly: doubles in their shortest round-trip form, timestamps with time zone as UTC
    with microseconds, BLOBs as hex bytea, nested values as JSON; NULL as `\\N`."""
    name = _ident(column)
    upper = duck_type.strip().upper()
    if upper == "BLOB":
        value = f"'\\\\x' || hex({name})"
    elif upper == "TIMESTAMP WITH TIME ZONE":
        value = (
            f"CASE WHEN isfinite({name}) THEN "
            f"CAST(make_timestamp(epoch_us({name})) AS VARCHAR) || '+00' "
            f"ELSE CAST({name} AS VARCHAR) END"
        )
    elif upper in ("TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS"):
        value = f"CAST(CAST({name} AS TIMESTAMP) AS VARCHAR)"
    elif postgres_type(upper) == "JSON" and upper != "JSON":
        value = _text(f"CAST(to_json({name}) AS VARCHAR)")
    elif (
        upper in _INTEGER_TYPES
        or (upper in _PLAIN_TYPES and upper not in ("VARCHAR", "JSON"))
        or _DECIMAL.match(upper)
    ):
        value = f"CAST({name} AS VARCHAR)"
    else:
        value = _text(f"CAST({name} AS VARCHAR)")
    return f"coalesce({value}, '\\N')"


def _copy_rows(src: duckdb.DuckDBPyConnection, tgt: PostgresConnection, table: _SourceTable) -> int:
    """Stream the table's rows into the target with one COPY; the number of rows sent."""
    import psycopg

    line = " || chr(9) || ".join(copy_field(c.name, c.duck_type) for c in table.columns)
    names = ", ".join(_ident(c.name) for c in table.columns)
    sent, batch = 0, 1
    try:
        result = src.execute(f"SELECT {line} || chr(10) FROM {_ident(table.name)}")
        sql = f"COPY {_ident(table.name)} ({names}) FROM STDIN (FREEZE)"
        with tgt.raw.cursor().copy(sql) as copy:
            while True:
                rows = result.fetchmany(batch)
                if not rows:
                    break
                piece = "".join(row[0] for row in rows)
                copy.write(piece)
                sent += len(rows)
                # Grow the pieces eightfold at a time, as long as they stay under BATCH_BYTES.
                fits = BATCH_BYTES * len(rows) // max(len(piece), 1)
                batch = max(1, min(batch * 8, fits, BATCH_ROWS))
    except psycopg.Error as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise TransferError(f"copying {table.name} failed: {message}") from None
    except duckdb.Error as error:
        message = str(error).strip().splitlines()[0]
        raise TransferError(f"reading {table.name} from the source failed: {message}") from None
    return sent


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


__all__ = [
    "BATCH_ROWS",
    "CountMismatchError",
    "PostgresError",
    "TableCopy",
    "TransferError",
    "copy_field",
    "migrate_state",
    "postgres_type",
]
