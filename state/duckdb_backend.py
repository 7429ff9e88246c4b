"""The embedded backend: the state in one DuckDB file (the default).

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

Rows go in column-wise: as JSON documents DuckDB's reader parses in C++ where the values allow
it, as list parameters otherwise.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson

from processors.base import Table
from state.config import lock_timeout as config_lock_timeout
from state.errors import StateError

Columns = dict[str, list[Any]]
NAME = "duckdb"


def dialect(sql: str) -> str:
    """Processors declare their tables and views in DuckDB's SQL: nothing to translate."""
    return sql


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


# Rows per statement. DuckDB boxes every element of a list parameter into a Value of its own
# (~100 bytes each), so one statement for a 500 MB session's 189k rows peaked at +400 MB.
STATEMENT_ROWS = 10_000


def _slices(columns: list[list[Any]]) -> Iterator[list[list[Any]]]:
    """The columns cut into pieces of at most STATEMENT_ROWS rows."""
    total = len(columns[0])
    if total <= STATEMENT_ROWS:
        yield columns
        return
    for start in range(0, total, STATEMENT_ROWS):
        yield [column[start : start + STATEMENT_ROWS] for column in columns]


# Below this many rows the list path is faster: the JSON path's temporary file and reader
# cost ~4 ms more per statement, and boxing values only costs ~30 µs a row (22 columns).
JSON_MIN_ROWS = 256


def insert_columns(con: duckdb.DuckDBPyConnection, table: Table, columns: Columns) -> None:
    """Insert rows given column-wise, STATEMENT_ROWS at a time. A piece of JSON_MIN_ROWS
    rows or more goes to DuckDB as one JSON document when its values allow it
    (`json_rows`), anything else as list parameters."""
    names = table.column_names
    if not columns[names[0]]:
        return
    for piece in _slices([columns[name] for name in names]):
        document = json_rows(table, piece) if len(piece[0]) >= JSON_MIN_ROWS else None
        if document is None or not insert_json(con, table, document):
            insert_lists(con, table, piece)


def insert_lists(con: duckdb.DuckDBPyConnection, table: Table, piece: list[list[Any]]) -> None:
    """One list parameter per column, unnested and cast. Works for any value DuckDB's Python
    client takes, but boxes every element in a Value of its own: ~3x slower than JSON."""
    select = ", ".join(
        f"TRY_CAST(UNNEST(${i}) AS {sql_type})" for i, sql_type in enumerate(table.value_types, 1)
    )
    names = ", ".join(table.column_names)
    con.execute(f"INSERT INTO {table.name} ({names}) SELECT {select}", piece)


# How a column of each type travels in the JSON document: the type DuckDB reads it as, cast
# afterwards with TRY_CAST as the list path does (an integer out of range becomes NULL, not an
# error; timestamps go as text, parsed by the cast). Other types take the list path.
_JSON_READ_AS = {
    "VARCHAR": "VARCHAR",
    "TEXT": "VARCHAR",
    "BIGINT": "HUGEINT",
    "INTEGER": "HUGEINT",
    "DOUBLE": "DOUBLE",
    "BOOLEAN": "BOOLEAN",
    "TIMESTAMPTZ": "VARCHAR",
    "TIMESTAMP": "VARCHAR",
}


def json_rows(table: Table, piece: list[list[Any]]) -> bytes | None:
    """The piece as one JSON object of column lists (`{"c1": [...], ...}`), or None when
    JSON cannot carry it exactly: a column type without a JSON reading, a float that is not
    finite (JSON has no NaN), or a value orjson refuses (an integer past 64 bits, a lone
    surrogate in a string, a datetime, whose text form would change how it is cast)."""
    types = table.value_types
    if not all(t.upper() in _JSON_READ_AS for t in types):
        return None
    for values, sql_type in zip(piece, types, strict=True):
        # inf or NaN anywhere makes the sum inf or NaN (so can a huge sum: then the list path
        # is merely slower). None and zeros are left out; ints mixed in are fine.
        if sql_type.upper() == "DOUBLE" and not _finite_sum(values):
            return None
    try:
        return orjson.dumps(
            {f"c{i}": values for i, values in enumerate(piece, 1)},
            option=orjson.OPT_PASSTHROUGH_DATETIME,
        )
    except (orjson.JSONEncodeError, TypeError):
        return None


def _finite_sum(values: list[Any]) -> bool:
    try:
        return math.isfinite(sum(filter(None, values)))
    except (OverflowError, TypeError):
        return False


def insert_json(con: duckdb.DuckDBPyConnection, table: Table, document: bytes) -> bool:
    """Insert a `json_rows` document, which DuckDB's JSON reader parses in C++, ~3x faster than
    handing over the same values as list parameters. False, with nothing inserted, when the
    document cannot be written where DuckDB can read it (a full disk)."""
    types = table.value_types
    reads = ", ".join(f"'c{i}': '{_JSON_READ_AS[t.upper()]}[]'" for i, t in enumerate(types, 1))
    select = ", ".join(f"TRY_CAST(UNNEST(c{i}) AS {t})" for i, t in enumerate(types, 1))
    sql = (
        f"INSERT INTO {table.name} ({', '.join(table.column_names)}) SELECT {select} "
        f"FROM read_json($1, columns = {{{reads}}}, format = 'unstructured', "
        f"maximum_object_size = {len(document) + 1})"
    )
    with readable(document) as path:
        if path is None:
            return False
        con.execute(sql, [path])
        return True


@contextmanager
def readable(document: bytes) -> Iterator[str | None]:
    """A path this process's DuckDB can read `document` from, or None if it cannot be written.
    On Linux an anonymous in-memory file (memfd), which a killed process cannot leave behind;
    elsewhere a temporary file, removed afterwards."""
    remove: str | None = None
    try:
        fd = os.memfd_create("session-pipeline-rows", os.MFD_CLOEXEC)
        path = f"/proc/self/fd/{fd}"
    except (AttributeError, OSError):  # not Linux, or no memory file to be had
        try:
            fd, path = tempfile.mkstemp(prefix="session-pipeline-rows-", suffix=".json")
        except OSError:
            yield None
            return
        remove = path
    try:
        try:
            view = memoryview(document)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            yield None
            return
        yield path
    finally:
        os.close(fd)
        if remove is not None:
            os.unlink(remove)


def insert_documents(
    con: duckdb.DuckDBPyConnection, table: Table, documents: list[tuple[int, bytes]]
) -> None:
    """Insert serialized rows (`serialize_rows`): the documents of several outcomes go in one
    statement (the JSON reader takes them one after another), about STATEMENT_ROWS rows a
    statement. A document that cannot be written where DuckDB reads it goes as lists."""
    group: list[bytes] = []
    rows = 0
    for count, document in documents:
        group.append(document)
        rows += count
        if rows >= STATEMENT_ROWS:
            _insert_document_group(con, table, group)
            group, rows = [], 0
    if group:
        _insert_document_group(con, table, group)


def _insert_document_group(
    con: duckdb.DuckDBPyConnection, table: Table, group: list[bytes]
) -> None:
    if insert_json(con, table, b"\n".join(group)):
        return
    for document in group:
        columns = orjson.loads(document)
        piece = [columns[f"c{i}"] for i in range(1, len(table.column_names) + 1)]
        for part in _slices(piece):
            insert_lists(con, table, part)


def delete_by_key(con: duckdb.DuckDBPyConnection, table: Table, rows: Columns) -> None:
    """Remove the rows an increment replaces: those with the same session and key (NULLs in
    a key compare equal), or, for a table without a key, all rows of the sessions it
    returned rows for."""
    if not rows["session_file"]:
        return
    if not table.key:
        con.execute(
            f"DELETE FROM {table.name} WHERE session_file IN (SELECT UNNEST($1))",
            [sorted(set(rows["session_file"]))],
        )
        return
    types = dict(zip(table.column_names, table.value_types, strict=True))
    names = ["session_file", *table.key]
    select = ", ".join(
        f"TRY_CAST(UNNEST(${i}) AS {types[name]}) AS {name}" for i, name in enumerate(names, 1)
    )
    match = " AND ".join(f"t.{name} IS NOT DISTINCT FROM d.{name}" for name in names)
    sql = f"DELETE FROM {table.name} t USING (SELECT {select}) d WHERE {match}"
    for piece in _slices([rows[name] for name in names]):
        con.execute(sql, piece)


def prepare(con: duckdb.DuckDBPyConnection) -> None:
    """Nothing to define before the declared views: they are DuckDB's SQL."""


def after_table(con: duckdb.DuckDBPyConnection, table: Table) -> None:
    """No index: a delete by session scans DuckDB's columns quickly, and an index would slow
    every insert."""


def create_view(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    con.execute(sql)


_MIGRATING = threading.Lock()


@contextmanager
def migration_lock(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Threads of one process share one DuckDB instance, where concurrent catalog changes
    conflict; other processes are kept out by DuckDB's file lock."""
    with _MIGRATING:
        yield
