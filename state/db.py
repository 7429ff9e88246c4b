"""The state database, embedded or shared: one interface, two backends.

`SESSION_PIPELINE_DB` (or `--db`) names either a file, the embedded DuckDB default
(`state/duckdb_backend.py`), or a `postgresql://` URL, a server every worker host reaches
(`state/postgres_backend.py`). Flows and processors never ask which: they get a connection with
DuckDB's `execute(sql, params).fetchall()` shape (`?` or `$n` placeholders), `transaction`, the
processor's run lock, and the bulk row writes of the backend the connection belongs to, all from
here. SQL that both run is written once: `ON CONFLICT`, `UNNEST($n::TYPE[])`, `FILTER`, window
functions. What a processor declares (DDL, views) is DuckDB's SQL, which `dialect` translates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

import duckdb

from state import duckdb_backend
from state.errors import PostgresError, StateError

# The PostgreSQL backend is imported when a URL is first used: the embedded default's
# commands start no slower for it.
if TYPE_CHECKING:
    from state.postgres_backend import PostgresDatabase

    Database: TypeAlias = Path | PostgresDatabase
else:
    Database = Path  # (for annotations only: a URL's database is a PostgresDatabase)

__all__ = [
    "DATABASE_ERRORS",
    "Database",
    "StateError",
    "backend",
    "connect",
    "exists",
    "is_shared",
    "processor_lock",
    "sidecar",
    "transaction",
]

Connection = Any  # duckdb.DuckDBPyConnection or PostgresConnection: the same execute() shape

# What a failed statement raises, whichever backend ran it.
DATABASE_ERRORS: tuple[type[Exception], ...] = (duckdb.Error, PostgresError)


def location(text: str | Path) -> Database:
    """A database named by the user: a `postgresql://` URL, or a DuckDB file's path."""
    if not isinstance(text, str | Path):
        return text  # a database already
    raw = str(text)
    if raw.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        from state.postgres_backend import PostgresDatabase

        return PostgresDatabase(raw)
    return Path(text)


def is_shared(db: Database) -> bool:
    return not isinstance(db, Path)


def connect(
    db: Database, *, lock_timeout: float | None = None, read_only: bool = False
) -> AbstractContextManager[Connection]:
    """The state database for one unit of work (read-only: it must exist already)."""
    if isinstance(db, Path):
        return duckdb_backend.connect(db, lock_timeout=lock_timeout, read_only=read_only)
    return db.connect(read_only=read_only)


def exists(db: Database) -> bool:
    """Whether the state database has been created (by a run or a migration)."""
    return db.exists()


def backend(con: Connection) -> ModuleType:
    """The module that writes rows for this connection: `insert_columns`, `insert_documents`,
    `delete_by_key`, `dialect`."""
    if isinstance(con, duckdb.DuckDBPyConnection):
        return duckdb_backend
    from state import postgres_backend

    return postgres_backend


def processor_lock(db: Database, processor_name: str) -> AbstractContextManager[Any]:
    """One run of the processor at a time: a `flock` beside a DuckDB file (one host), a
    PostgreSQL advisory lock for a shared database (every host). Either goes with the process
    that holds it, however it dies."""
    if isinstance(db, Path):
        from state.hostlock import HostLock

        return HostLock(db, processor_name)
    return db.processor_lock(processor_name)


def sidecar(db: Database, suffix: str) -> Path:
    """A file of this host's about the state (`pipeline.duckdb.serve.json`): beside a DuckDB
    file; for a shared database, which has no place on this host, in
    `~/.session-pipeline/` under a name made from its URL."""
    if not isinstance(db, Path):
        import hashlib

        name = hashlib.sha256(db.url.encode()).hexdigest()[:16]
        return Path.home() / ".session-pipeline" / f"postgresql-{name}.{suffix}"
    db = db.resolve()
    return db.with_name(f"{db.name}.{suffix}")


def describe(db: Database) -> str:
    """The database for messages: a path, or a URL without its password."""
    return str(db) if isinstance(db, Path) else db.masked


@contextmanager
def transaction(con: Connection) -> Iterator[Connection]:
    """All or nothing: a crash or error inside leaves the database as it was."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
