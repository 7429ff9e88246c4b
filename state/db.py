"""Short-lived DuckDB units of work, retried while another process holds the file.

DuckDB lets one process at a time open a database file for writing. Processors of different
processors run in different processes (each Prefect flow run is its own subprocess), so every
piece of work takes the file, does one transaction and lets it go again; the long part of a run
(reading transcripts) holds no lock at all. A unit of work that meets another process's lock
backs off and retries until `SESSION_PIPELINE_DB_LOCK_TIMEOUT` seconds (default 60) have
passed, then fails with a clear message: nothing is written, nothing is lost.

A new DuckDB instance builds its catalog of built-in functions (25 to 35 ms here, for
`:memory:` too), which was most of a small run's cost when every unit of work opened one. So
each process keeps one in-memory instance and ATTACHes the state file to it for a unit of
work (a few milliseconds) and DETACHes it afterwards, which checkpoints and releases the file
lock exactly as closing a connection did. Units of work of one process that overlap share the
attachment.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from state.config import lock_timeout as config_lock_timeout


class StateError(Exception):
    """The state database cannot be used; the message is one line for the user."""


def _is_lock_conflict(error: duckdb.Error) -> bool:
    text = str(error)
    return "Could not set lock" in text or "Conflicting lock" in text


@contextmanager
def connect(
    path: Path, *, lock_timeout: float | None = None, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The state database for one unit of work, creating parent folders (read-only: the
    database must exist, and nothing can be changed through it unless this process already
    has it open for writing)."""
    if lock_timeout is None:
        lock_timeout = config_lock_timeout()
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
    key = os.path.realpath(path)
    while True:
        try:
            con = _ATTACHMENTS.take(key, path.stem, read_only)
            break
        except duckdb.Error as error:
            if not _is_lock_conflict(error):
                raise StateError(_describe(path, error)) from None
        except _WrongMode:
            pass  # opened read-only by another unit of work of this process: wait for it
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
        _ATTACHMENTS.give_back(key, con)


class _WrongMode(Exception):
    """The file is attached read-only and a unit of work wants to write."""


@dataclass
class _Attached:
    alias: str
    read_only: bool
    users: int = 0


class _Attachments:
    """The process's one DuckDB instance and the state files attached to it, by path."""

    RESERVED = frozenset({"memory", "system", "temp", "main"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instance: duckdb.DuckDBPyConnection | None = None
        self._attached: dict[str, _Attached] = {}
        self._numbers = 0
        self._inherited: list[duckdb.DuckDBPyConnection] = []

    def forget(self) -> None:
        """After fork: the parent's instance and its threads are not the child's to use. Nor
        to close: its destructor would touch threads that do not exist in the child (a
        subprocess started with a `preexec_fn` crashed that way before exec), so it is kept
        referenced and never released."""
        self._lock = threading.Lock()
        if self._instance is not None:
            self._inherited.append(self._instance)
        self._instance, self._attached = None, {}

    def _base(self) -> duckdb.DuckDBPyConnection:
        if self._instance is None:
            spill = Path(tempfile.gettempdir()) / f"session-pipeline-duckdb-{os.getpid()}"
            self._instance = duckdb.connect(":memory:", config={"temp_directory": str(spill)})
        return self._instance

    def _alias(self, stem: str) -> str:
        """The file's stem, as a connection to the file would name it, unless it is taken."""
        taken = {a.alias for a in self._attached.values()} | self.RESERVED
        alias = stem
        while alias.lower() in taken or not alias:
            self._numbers += 1
            alias = f"state_{self._numbers}"
        return alias

    def take(self, key: str, stem: str, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A connection whose default database is the file at `key` (a real path)."""
        with self._lock:
            attached = self._attached.get(key)
            if attached is None:
                base = self._base()
                alias = self._alias(stem)
                mode = " (READ_ONLY)" if read_only else ""
                base.execute(f"ATTACH {_literal(key)} AS {_identifier(alias)}{mode}")
                attached = self._attached[key] = _Attached(alias, read_only)
            elif attached.read_only and not read_only:
                raise _WrongMode
            con = self._base().cursor()
            try:
                con.execute(f"USE {_identifier(attached.alias)}")
            except BaseException:
                con.close()
                self._release(key, attached)
                raise
            attached.users += 1
            return con

    def give_back(self, key: str, con: duckdb.DuckDBPyConnection) -> None:
        with self._lock:
            con.close()
            attached = self._attached[key]
            attached.users -= 1
            self._release(key, attached)

    def _release(self, key: str, attached: _Attached) -> None:
        """Detach a file no unit of work uses any more: checkpoint, and the lock goes."""
        if attached.users:
            return
        del self._attached[key]
        try:
            self._base().execute(f"DETACH {_identifier(attached.alias)}")
        except BaseException:
            # Whatever failed (a checkpoint that could not be written), the file must not
            # stay locked by this process: the instance goes, with whatever else it held.
            instance, self._instance, self._attached = self._instance, None, {}
            if instance is not None:
                instance.close()
            raise


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_ATTACHMENTS = _Attachments()
os.register_at_fork(after_in_child=_ATTACHMENTS.forget)


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
