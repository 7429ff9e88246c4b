"""Short-lived DuckDB connections, retried while another process holds the file.

DuckDB lets one process at a time open a database file for writing. Processors of different
processors run in different processes (each Prefect flow run is its own subprocess), so every
piece of work opens the file, does one transaction and closes it again; the long part of a run
(reading transcripts) holds no connection at all. A connection attempt that meets another
process's lock backs off and retries until `SESSION_PIPELINE_DB_LOCK_TIMEOUT` seconds (default
60) have passed, then fails with a clear message: nothing is written, nothing is lost.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from state.config import positive_int

DEFAULT_LOCK_TIMEOUT_SECONDS = 60


class StateError(Exception):
    """The state database cannot be used; the message is one line for the user."""


def _is_lock_conflict(error: duckdb.Error) -> bool:
    text = str(error)
    return "Could not set lock" in text or "Conflicting lock" in text


@contextmanager
def connect(
    path: Path, *, lock_timeout: float | None = None, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the state database for one unit of work, creating parent folders (read-only:
    the database must exist, and nothing can be changed through the connection)."""
    if lock_timeout is None:
        lock_timeout = positive_int(
            "SESSION_PIPELINE_DB_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_SECONDS
        )
    if path.exists() and path.is_dir():
        raise StateError(f"state database {path} is a directory, not a DuckDB file")
    if read_only and not path.exists():
        raise StateError(f"state database {path} does not exist yet; run a processor first")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StateError(f"cannot create the folder for {path}: {error.strerror}") from None
    deadline = time.monotonic() + lock_timeout
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.Error as error:
            if not _is_lock_conflict(error):
                raise StateError(_describe(path, error)) from None
            if time.monotonic() >= deadline:
                raise StateError(
                    f"state database {path} stayed locked by another process for "
                    f"{lock_timeout:g}s; nothing was written"
                ) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
    try:
        yield con
    finally:
        con.close()


def _describe(path: Path, error: duckdb.Error) -> str:
    text = str(error)
    if "not a valid DuckDB database file" in text:
        return f"{path} is not a DuckDB database"
    if "Permission denied" in text:
        return f"cannot open {path}: permission denied"
    first = text.splitlines()[0] if text else type(error).__name__
    return f"cannot open state database {path}: {first}"


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All or nothing: a crash or error inside leaves the database as it was."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
