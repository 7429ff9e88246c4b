"""The shared backend: the state in PostgreSQL, for teams whose workers run on several hosts.

The same tables, views and migrations as the embedded DuckDB file. A connection here has the
shape of DuckDB's (`execute(sql, params)` with `?` or `$n` placeholders, results by
`fetchall`/`fetchone`), so the store, the migrations and the flows run unchanged on either; it
is in autocommit mode, and `state.db.transaction` opens and closes the transactions, as on
DuckDB. Rows go in with `COPY`. A processor's run lock is an advisory lock held by a
connection of its own: whichever host runs the processor holds it, and a dead worker's lock
goes with its connection.

psycopg is imported when a connection is first made, so a command on the embedded default
never pays for it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from processors.base import Table
from state.errors import PostgresError, StateError

NAME = "postgresql"
Columns = dict[str, list[Any]]

# A dead peer is noticed within about 25 s even when its host vanishes without closing the
# socket (a killed process's socket is closed by its kernel at once).
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


class PostgresDatabase:
    """A `postgresql://` URL, as `SESSION_PIPELINE_DB` or `--db` names it. The tables live in
    the first schema of the URL's `search_path` (`?options=-csearch_path%3Dteam_a`), created
    when missing; `public` by default."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.name = "postgresql"

    def __str__(self) -> str:
        return self.url

    @property
    def masked(self) -> str:
        """The URL without its password, for messages."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    def __repr__(self) -> str:
        return f"PostgresDatabase({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PostgresDatabase) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def resolve(self) -> PostgresDatabase:
        return self

    def exists(self) -> bool:
        """Whether a run or a migration has created the state here."""
        with self.connect(read_only=True, must_exist=False) as con:
            row = con.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            return bool(row and row[0])

    @contextmanager
    def connect(
        self, *, read_only: bool = False, must_exist: bool = True
    ) -> Iterator[PostgresConnection]:
        raw = _open(self, read_only=read_only)
        con = PostgresConnection(raw)
        try:
            if read_only and must_exist:
                row = con.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
                if not (row and row[0]):
                    raise StateError(
                        f"state database {self.masked} does not exist yet; run a processor first"
                    )
            yield con
        finally:
            con.close()

    def lock_holder(self, processor_name: str) -> str | None:
        """Who holds the processor's run lock (a connection's `app_name`), without taking it;
        None when nobody does."""
        with self.connect(read_only=True, must_exist=False) as con:
            return _holder(con, *_lock_key(f"{_schema(con)}/{processor_name}"))

    @contextmanager
    def processor_lock(self, processor_name: str) -> Iterator[None]:
        """Hold the processor's advisory lock on a connection of its own, or refuse at once."""
        raw = _open(self, read_only=False)
        try:
            con = PostgresConnection(raw)
            schema = _schema(con)
            name = f"{schema}/{processor_name}"
            got = con.execute(
                "SELECT pg_try_advisory_lock($1::BIGINT)", [_advisory_key(name)]
            ).fetchone()
            if not (got and got[0]):
                who = _holder(con, *_lock_key(name)) or "another process"
                from state.hostlock import ProcessorBusyError

                raise ProcessorBusyError(
                    f"Processor '{processor_name}' is already running ({who} holds its "
                    f"lock in {self.masked})"
                )
            yield
        finally:
            raw.close()  # the lock goes with the connection


def app_name(host: str | None, pid: int | None) -> str:
    """How a connection names its process to the server (`pg_stat_activity`, lock holders)."""
    return f"session-pipeline {host} pid {pid}"[:63]


def _holder(con: PostgresConnection, classid: int, objid: int) -> str | None:
    row = con.execute(
        "SELECT coalesce(a.application_name, '?') FROM pg_locks l "
        "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.granted AND l.classid = $1::BIGINT::OID AND l.objid = $2::BIGINT::OID",
        [classid, objid],
    ).fetchone()
    return str(row[0]) if row else None


def _advisory_key(text: str) -> int:
    """The advisory lock key of `text`: a stable 64-bit hash, signed as pg_advisory_lock takes
    it."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), signed=True)


def _lock_key(text: str) -> tuple[int, int]:
    """The same key as pg_locks shows it: two unsigned 32-bit halves (classid, objid)."""
    key = _advisory_key(text) % (1 << 64)
    return key >> 32, key & 0xFFFFFFFF


def _schema(con: PostgresConnection) -> str:
    row = con.execute("SELECT current_schema()").fetchone()
    return str(row[0]) if row and row[0] else "public"


_LOADERS_READY = threading.Lock()


def _open(db: PostgresDatabase, *, read_only: bool) -> Any:
    import psycopg

    app = app_name(socket.gethostname(), os.getpid())
    try:
        raw = psycopg.connect(
            db.url,
            autocommit=True,
            cursor_factory=psycopg.RawCursor,
            application_name=app,
            connect_timeout=10,
            **_KEEPALIVES,
        )
    except psycopg.Error as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise StateError(f"cannot reach PostgreSQL at {db.masked}: {first}") from None
    _adapt(raw)
    # The server's side of the keepalives too: a host that vanishes without closing its
    # socket would otherwise keep its run lock for the server's default of over two hours.
    raw.execute(
        "SET TIME ZONE 'UTC'; SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
        "SET tcp_keepalives_count = 3; SET tcp_user_timeout = 25000"
    )
    if read_only:
        raw.execute("SET default_transaction_read_only = on")
    else:
        row = raw.execute("SELECT current_schema()").fetchone()
        if not (row and row[0]):
            wanted = _first_search_path(db.url)
            raw.execute(f"CREATE SCHEMA IF NOT EXISTS {_identifier(wanted)}")
    return raw


def _first_search_path(url: str) -> str:
    options = dict(parse_qsl(urlsplit(url).query)).get("options", "")
    found = re.search(r"search_path\s*=\s*([^\s,]+)", options)
    return found.group(1).strip('"') if found else "public"


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _adapt(raw: Any) -> None:
    """Values come back as DuckDB's client gives them: text parameters typed as text, whole
    numbers (a sum of BIGINTs is NUMERIC here, HUGEINT there) as int, JSON as its text."""
    from psycopg.types.string import StrDumper, TextLoader

    raw.adapters.register_dumper(str, StrDumper)
    raw.adapters.register_loader("numeric", _number_loader())
    raw.adapters.register_loader("json", TextLoader)
    raw.adapters.register_loader("jsonb", TextLoader)


@functools.cache
def _number_loader() -> type:
    """NUMERIC as DuckDB gives it: a whole number as int, else a float (made once; psycopg is
    imported only on first use)."""
    from psycopg.adapt import Loader

    class NumberLoader(Loader):
        def load(self, data: Any) -> Any:
            text = bytes(data)
            if text in (b"NaN", b"Infinity", b"-Infinity"):
                return float(text)
            if b"." in text or b"e" in text or b"E" in text:
                value = float(text)
                return int(value) if value.is_integer() and b"." not in text else value
            return int(text)

    return NumberLoader


class _Result:
    """A finished statement's rows (none for a statement that returns none, as on DuckDB)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.description = cursor.description

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._cursor.fetchall() if self.description is not None else []

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cursor.fetchone() if self.description is not None else None

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        return self._cursor.fetchmany(size) if self.description is not None else []


class PostgresConnection:
    """A psycopg connection with DuckDB's `execute` shape."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._last: _Result | None = None

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> _Result:
        import psycopg

        text = _numbered(sql) if params else sql
        cursor = self.raw.cursor()
        try:
            cursor.execute(text, list(params) if params else None)
        except psycopg.Error as error:
            raise _failed(error) from error
        self._last = _Result(cursor)
        return self._last

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._last.fetchall() if self._last else []

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._last.fetchone() if self._last else None

    @property
    def description(self) -> Any:
        return self._last.description if self._last else None

    def interrupt(self) -> None:
        self.raw.cancel_safe()

    def close(self) -> None:
        self.raw.close()


def _failed(error: Exception) -> PostgresError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return PostgresError(message, getattr(error, "sqlstate", None))


_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\?")


def _numbered(sql: str) -> str:
    """`?` placeholders (outside quotes and comments) as PostgreSQL's `$1`, `$2`, …"""
    if "?" not in sql:
        return sql
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(0) != "?":
            return match.group(0)
        count += 1
        return f"${count}"

    return _TOKENS.sub(number, sql)


# --- DuckDB's SQL, as processors declare it, in PostgreSQL's ------------------------------------

_TYPES = (
    (re.compile(r"\bDOUBLE\b(?!\s+PRECISION)", re.I), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
    (re.compile(r"\bHUGEINT\b", re.I), "NUMERIC(38)"),
    (re.compile(r"\bUBIGINT\b", re.I), "NUMERIC(20)"),
    (re.compile(r"\bTINYINT\b", re.I), "SMALLINT"),
)


# DuckDB's integer division; on PostgreSQL `/` of two integers is one (the same precedence,
# truncated toward zero as DuckDB's): the SQL that uses it divides integers only.
_INTEGER_DIVISION = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|//")


def dialect(sql: str) -> str:
    """Declared tables and views (and the reports' SQL) in PostgreSQL's SQL: DuckDB's type
    names that PostgreSQL does not know become its own, DuckDB's integer division `//` its
    `/`. Functions DuckDB has and PostgreSQL lacks are defined by `prepare` instead, so the
    SQL stays as written."""
    for pattern, replacement in _TYPES:
        sql = pattern.sub(replacement, sql)
    if "//" in sql:
        sql = _INTEGER_DIVISION.sub(lambda m: "/" if m.group(0) == "//" else m.group(0), sql)
    return sql


# DuckDB functions the declared views (and reports, and people's queries) call, defined in the
# state's schema with DuckDB's results: signature -> (what it returns and is, its body). Each
# body is one SELECT of one expression, so PostgreSQL inlines it into the query.
FUNCTIONS: dict[str, tuple[str, str]] = {
    # (used by round below, so made first)
    "duckdb_round_half_away(y DOUBLE PRECISION)": (
        "DOUBLE PRECISION LANGUAGE sql IMMUTABLE PARALLEL SAFE",
        "SELECT sign(y) * (floor(abs(y)) + CASE WHEN abs(y) - floor(abs(y)) >= 0.5 THEN 1 "
        "ELSE 0 END)",
    ),
    # DuckDB's round of a DOUBLE: std::round (half away from zero) of x * 10^n, over 10^n
    "round(x DOUBLE PRECISION, n INTEGER)": (
        "DOUBLE PRECISION LANGUAGE sql IMMUTABLE PARALLEL SAFE",
        "SELECT CASE WHEN n >= 0 "
        "THEN duckdb_round_half_away(x * CAST(10 AS DOUBLE PRECISION) ^ n) "
        "/ CAST(10 AS DOUBLE PRECISION) ^ n "
        "ELSE duckdb_round_half_away(x / CAST(10 AS DOUBLE PRECISION) ^ (-n)) "
        "* CAST(10 AS DOUBLE PRECISION) ^ (-n) END",
    ),
    # microseconds since the epoch (exact: extract gives a numeric)
    "epoch_us(t TIMESTAMPTZ)": (
        "BIGINT LANGUAGE sql IMMUTABLE PARALLEL SAFE",
        "SELECT CAST(extract(epoch FROM t - TIMESTAMPTZ '1970-01-01 00:00:00+00') * 1000000 "
        "AS BIGINT)",
    ),
    # the instant that many microseconds after the epoch
    "make_timestamptz(us BIGINT)": (
        "TIMESTAMPTZ LANGUAGE sql IMMUTABLE PARALLEL SAFE",
        "SELECT timezone('UTC', TIMESTAMP '1970-01-01 00:00:00' "
        "+ (us / 1000000) * INTERVAL '1 second' + (us % 1000000) * INTERVAL '1 microsecond')",
    ),
    # DuckDB's format codes %Y %m %d %H %M %S %g (milliseconds) %f (microseconds) and %%; the
    # rest of the format is text, quoted for to_char
    "strftime(t TIMESTAMP, format TEXT)": (
        "TEXT LANGUAGE sql STABLE PARALLEL SAFE",
        "SELECT to_char(t, '\"' || replace(replace(replace(replace(replace(replace(replace("
        "replace(replace(replace(replace(replace(format, '\\', '\\\\'), '\"', '\\\"'), "
        "'%%', chr(1)), '%Y', '\"YYYY\"'), '%m', '\"MM\"'), '%d', '\"DD\"'), "
        "'%H', '\"HH24\"'), '%M', '\"MI\"'), '%S', '\"SS\"'), '%g', '\"MS\"'), "
        "'%f', '\"US\"'), chr(1), '%') || '\"')",
    ),
}
# What else the declared SQL needs here: an index finding a request's rows by its key, for the
# copies of resumed sessions each usage commit lists again (flows/request_copies.py).
_INDEXES: dict[str, tuple[str, str]] = {
    "usage_requests_raw_by_request": (
        "usage_requests_raw",
        "CREATE INDEX IF NOT EXISTS usage_requests_raw_by_request "
        "ON usage_requests_raw ((coalesce(message_id, '')), (coalesce(request_id, '')))",
    ),
}


def _function_sql(signature: str) -> str:
    returns, body = FUNCTIONS[signature]
    return f"CREATE OR REPLACE FUNCTION {signature} RETURNS {returns} AS $body${body}$body$"


def _missing_functions(con: PostgresConnection) -> list[str]:
    """The functions above not in the current schema as written here (missing, or made by
    another version)."""
    rows = con.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p "
        "WHERE p.pronamespace = to_regnamespace(current_schema())::OID "
        "AND p.proname = ANY($1::TEXT[])",
        [sorted({signature.split("(")[0] for signature in FUNCTIONS})],
    ).fetchall()
    bodies = {(name, body) for name, body in rows}
    return [
        signature
        for signature, (_, body) in FUNCTIONS.items()
        if (signature.split("(")[0], body) not in bodies
    ]


def prepare(con: PostgresConnection) -> None:
    """What the declared views need here, before they are made: the DuckDB functions they
    call (made only when missing or changed: this runs at every run's start, and runs that
    start at once take turns), and the usage tables' index by request. The indexes a DELETE by
    session needs are made per table by `after_table`."""
    if _missing_functions(con):
        key = _advisory_key(f"{_schema(con)}/functions")
        con.execute("SELECT pg_advisory_xact_lock($1::BIGINT)", [key])
        for signature in _missing_functions(con):
            con.execute(_function_sql(signature))
    for index, (table, sql) in _INDEXES.items():
        row = con.execute(
            "SELECT to_regclass($1::TEXT) IS NULL AND to_regclass($2::TEXT) IS NOT NULL",
            [index, table],
        ).fetchone()
        if row and row[0]:  # (asked first: CREATE INDEX IF NOT EXISTS locks the table)
            con.execute(sql)


def after_table(con: PostgresConnection, table: Table) -> None:
    """Index a new output table by session: every commit deletes a session's rows by it."""
    con.execute(
        f"CREATE INDEX IF NOT EXISTS {table.name}_by_session ON {table.name} (session_file)"
    )


def create_view(con: PostgresConnection, sql: str) -> None:
    """`CREATE OR REPLACE VIEW` where PostgreSQL allows it (same columns, or new ones at the
    end); a view whose columns changed is dropped with its dependants, which the processor's
    later views make again."""
    sql = dialect(sql)
    found = re.match(r"\s*CREATE\s+OR\s+REPLACE\s+VIEW\s+(\w+)", sql, re.I)
    # A view made from this very SQL is left alone: replacing it takes an exclusive lock,
    # which waits for every query reading it (an analyst's long report) and holds up every
    # query after it, at every run's start. The SQL's hash is kept as the view's comment.
    mark = "session-pipeline " + hashlib.sha256(sql.encode()).hexdigest()[:32]
    if found:
        row = con.execute(
            "SELECT obj_description(to_regclass($1::TEXT), 'pg_class')", [found.group(1)]
        ).fetchone()
        if row and row[0] == mark:
            return
    con.execute("SAVEPOINT view_change")
    try:
        con.execute(sql)
    except PostgresError:
        con.execute("ROLLBACK TO SAVEPOINT view_change")
        if not found:
            raise
        con.execute(f"DROP VIEW IF EXISTS {found.group(1)} CASCADE")
        con.execute(sql)
    con.execute("RELEASE SAVEPOINT view_change")
    if found:
        con.execute(f"COMMENT ON VIEW {found.group(1)} IS '{mark}'")


# --- rows ----------------------------------------------------------------------------------------

_INT_RANGES = {"SMALLINT": 15, "INTEGER": 31, "INT": 31, "BIGINT": 63}


def insert_columns(con: PostgresConnection, table: Table, columns: Columns) -> None:
    """Rows given column-wise, with one COPY. Values PostgreSQL would refuse where DuckDB's
    TRY_CAST makes them NULL (an integer out of range) or that text cannot carry (a NUL
    character, a lone surrogate) are made fit first, only when the COPY refused them."""
    names = table.column_names
    if not columns.get(names[0]):
        return
    count = len(columns[names[0]])
    piece = [columns.get(name) or [None] * count for name in names]
    con.execute("SAVEPOINT copy_rows")
    try:
        _copy(con, table, piece)
    except (PostgresError, UnicodeError, ValueError):
        con.execute("ROLLBACK TO SAVEPOINT copy_rows")
        _copy(con, table, _fit(table, piece))
    con.execute("RELEASE SAVEPOINT copy_rows")


def _copy(con: PostgresConnection, table: Table, piece: list[list[Any]]) -> None:
    import psycopg

    sql = f"COPY {table.name} ({', '.join(table.column_names)}) FROM STDIN"
    try:
        with con.raw.cursor().copy(sql) as copy:
            write = copy.write_row
            for row in zip(*piece, strict=True):
                write(row)
    except psycopg.Error as error:
        raise _failed(error) from error


def _fit(table: Table, piece: list[list[Any]]) -> list[list[Any]]:
    fitted = []
    for values, sql_type in zip(piece, table.value_types, strict=True):
        kind = sql_type.upper()
        bits = _INT_RANGES.get(kind)
        fitted.append([_fit_value(v, bits, kind) for v in values])
    return fitted


def _fit_value(value: Any, bits: int | None, kind: str) -> Any:
    if value is None:
        return None
    if bits is not None:
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            return None
        return number if -(1 << bits) <= number < (1 << bits) else None
    if isinstance(value, str):
        text = value.replace("\x00", "\ufffd")
        return text.encode("utf-8", "replace").decode("utf-8")
    return value


def insert_documents(
    con: PostgresConnection, table: Table, documents: list[tuple[int, bytes]]
) -> None:
    """Rows a reader process serialized (`state.store.serialize_rows`), each document a JSON
    object of column lists: all of them in one COPY. (A COPY and its savepoint per document,
    one per session and table, were three round trips each: 17k of them, 39 s of a 5.8k
    session first run whose DuckDB commits took 9 s.)"""
    import orjson

    if not documents:
        return
    names = table.column_names
    merged: Columns = {name: [] for name in names}
    for _, document in documents:
        columns = orjson.loads(document)
        for i, name in enumerate(names, 1):
            merged[name].extend(columns[f"c{i}"])
    insert_columns(con, table, merged)


def delete_by_key(con: PostgresConnection, table: Table, rows: Columns) -> None:
    """Remove the rows an increment replaces: those with the same session and key (NULLs in
    a key compare equal), or, for a table without a key, all rows of the sessions it
    returned rows for.

    Matched by equality, the rows of the sessions concerned hashed by their key: `IS NOT
    DISTINCT FROM` can be neither hashed nor looked up in an index, so PostgreSQL compared
    every replaced row with every row of its session (the three increments of a 50 MB
    session took 33 s). A key holding NULLs is matched with `IS NULL` on those columns, one
    statement per pattern of NULLs (nearly always one statement)."""
    sessions = rows["session_file"]
    if not sessions:
        return
    if not table.key:
        con.execute(
            f"DELETE FROM {table.name} WHERE session_file = ANY($1::VARCHAR[])",
            [sorted(set(sessions))],
        )
        return
    types = dict(zip(table.column_names, table.value_types, strict=True))
    patterns: dict[tuple[bool, ...], list[int]] = {}
    for at, values in enumerate(zip(*(rows[name] for name in table.key), strict=True)):
        patterns.setdefault(tuple(value is None for value in values), []).append(at)
    for nulls, where in patterns.items():
        names = ["session_file", *(n for n, null in zip(table.key, nulls, strict=True) if not null)]
        values = [rows[name] for name in names]
        if len(where) < len(sessions):  # rows of several patterns: this pattern's only
            values = [[column[at] for at in where] for column in values]
        select = ", ".join(
            f"UNNEST(${i}::{dialect(types[name])}[]) AS {name}" for i, name in enumerate(names, 1)
        )
        match = " AND ".join(
            [f"t.{name} = d.{name}" for name in names]
            + [f"t.{n} IS NULL" for n, null in zip(table.key, nulls, strict=True) if null]
        )
        con.execute(
            f"DELETE FROM {table.name} WHERE ctid IN (SELECT t.ctid FROM {table.name} t "
            f"JOIN (SELECT {select}) d ON {match} "
            f"WHERE t.session_file = ANY(${len(names) + 1}::VARCHAR[]))",
            [*values, sorted(set(values[0]))],
        )


@contextmanager
def migration_lock(con: PostgresConnection) -> Iterator[None]:
    """Hosts that start at once on a new database migrate it one after the other."""
    key = _advisory_key(f"{_schema(con)}/schema_migrations")
    con.execute("SELECT pg_advisory_lock($1::BIGINT)", [key])
    try:
        yield
    finally:
        con.execute("SELECT pg_advisory_unlock($1::BIGINT)", [key])
