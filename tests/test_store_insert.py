"""Rows reach DuckDB the same whichever way they travel: as one JSON document (the fast path)
or as list parameters (every value the JSON path cannot carry exactly)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.base import Table
from state.duckdb_backend import (
    JSON_MIN_ROWS,
    STATEMENT_ROWS,
    insert_columns,
    insert_json,
    insert_lists,
    json_rows,
)

TABLE = Table(
    "t",
    (
        ("session_file", "VARCHAR NOT NULL"),
        ("n", "BIGINT"),
        ("small", "INTEGER"),
        ("x", "DOUBLE"),
        ("flag", "BOOLEAN"),
        ("seen_at", "TIMESTAMPTZ"),
        ("local", "TIMESTAMP"),
    ),
)
LISTS_ONLY = Table("u", (("session_file", "VARCHAR"), ("tags", "VARCHAR[]")))


def _both(piece: list[list[Any]], table: Table = TABLE) -> tuple[list[Any], list[Any]]:
    """The rows the list path stores, and those the JSON path stores (None: it declined)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(table.ddl)
    insert_lists(con, table, piece)
    by_lists = con.execute(f"SELECT * FROM {table.name} ORDER BY ALL").fetchall()
    con.execute(f"DELETE FROM {table.name}")
    document = json_rows(table, piece)
    if document is None:
        return by_lists, None  # type: ignore[return-value]
    assert insert_json(con, table, document)
    return by_lists, con.execute(f"SELECT * FROM {table.name} ORDER BY ALL").fetchall()


def _piece(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


def test_ordinary_values_take_the_json_path_and_store_the_same() -> None:
    rows = [
        ("alice/a.jsonl", 1, 2, 0.5, True, "2026-11-28T10:00:00.123456+00:00", "2026-11-28 10:00"),
        ("bob/b.jsonl", None, None, None, None, None, None),
        ("ünï/çødé 🙂.jsonl", -(2**63), 2**31 - 1, 3, False, "2026-11-28T10:00:00Z", "bad"),
        ('q"uote\\slash\n/x.jsonl', 2**63 - 1, -(2**31), -1e300, None, "not a time", ""),
        ("x/nul\x00.jsonl", 0, 0, 0.0, False, "2026-11-28", "2026-11-28T23:59:59.999999"),
    ]
    lists, json = _both(_piece(rows))
    assert json is not None
    assert json == lists
    assert len(json) == len(rows)


@pytest.mark.parametrize(
    ("row", "why"),
    [
        (("a/x", 2**64, 1, 1.0, True, None, None), "an integer past 64 bits"),
        (("a/x", 1, 1, math.nan, True, None, None), "NaN"),
        (("a/x", 1, 1, math.inf, True, None, None), "infinity"),
        (("a/x", 1, 1, 1.0, True, datetime(2026, 11, 28, tzinfo=UTC), None), "a datetime"),
    ],
)
def test_values_json_cannot_carry_exactly_take_the_list_path(
    row: tuple[Any, ...], why: str
) -> None:
    piece = _piece([row, ("b/y", 5, 6, 7.0, False, "2026-11-28T00:00:00Z", None)])
    assert json_rows(TABLE, piece) is None, why
    con = duckdb.connect()
    con.execute(TABLE.ddl)
    insert_columns(con, TABLE, dict(zip(TABLE.column_names, piece, strict=True)))
    assert con.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_a_lone_surrogate_is_declined_by_the_json_path_as_by_duckdb() -> None:
    piece = _piece([("a/\ud800", 1, 1, 1.0, True, None, None)])
    assert json_rows(TABLE, piece) is None
    with pytest.raises(duckdb.InvalidInputException, match="surrogate"):
        insert_lists(duckdb.connect(), TABLE, piece)


def test_out_of_range_integers_become_null_on_both_paths() -> None:
    piece = _piece([("a/x", 2**63 + 5, 2**31, 1.0, True, None, None)])
    lists, json = _both(piece)
    assert json == lists == [("a/x", None, None, 1.0, True, None, None)]


def test_a_table_with_a_type_json_does_not_read_takes_the_list_path() -> None:
    piece = _piece([("a/x", ["one", "two"])])
    assert json_rows(LISTS_ONLY, piece) is None
    lists, json = _both(piece, LISTS_ONLY)
    assert json is None and lists == [("a/x", ["one", "two"])]


def test_more_rows_than_a_statement_holds_all_arrive_by_the_json_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from state import duckdb_backend

    def no_lists(*_: Any) -> None:
        raise AssertionError("these rows fit the JSON path")

    monkeypatch.setattr(duckdb_backend, "insert_lists", no_lists)
    total = STATEMENT_ROWS * 2 + JSON_MIN_ROWS
    columns = {
        "session_file": [f"u/{i}" for i in range(total)],
        "n": list(range(total)),
        "small": [i % 100 for i in range(total)],
        "x": [i / 3 for i in range(total)],
        "flag": [i % 2 == 0 for i in range(total)],
        "seen_at": [
            (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)).isoformat()
            for i in range(total)
        ],
        "local": [None] * total,
    }
    con = duckdb.connect()
    con.execute(TABLE.ddl)
    insert_columns(con, TABLE, columns)
    assert con.execute("SELECT count(*), sum(n), count(DISTINCT seen_at) FROM t").fetchone() == (
        total,
        total * (total - 1) // 2,
        total,
    )


_text = st.one_of(st.none(), st.text(max_size=20))
_rows = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=10),
        st.one_of(st.none(), st.integers(min_value=-(2**64), max_value=2**64)),
        st.one_of(st.none(), st.integers(min_value=-(2**40), max_value=2**40)),
        st.one_of(
            st.none(), st.floats(), st.integers(min_value=-(2**53), max_value=2**53), st.booleans()
        ),
        st.one_of(st.none(), st.booleans()),
        st.one_of(
            _text,
            st.datetimes(timezones=st.just(timezone(timedelta(hours=5)))).map(
                lambda d: d.isoformat()
            ),
        ),
        _text,
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(_rows)
def test_whatever_the_values_both_paths_store_the_same(rows: list[tuple[Any, ...]]) -> None:
    lists, json = _both(_piece(rows))
    if json is not None:
        assert json == lists


def test_without_a_memory_file_or_a_writable_temporary_folder_rows_take_the_list_path(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import tempfile

    def no_memory_file(name: str, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_memory_file, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    piece = _piece([("a/x", 1, 2, 0.5, True, None, None)])
    con = duckdb.connect()
    con.execute(TABLE.ddl)
    document = json_rows(TABLE, piece)
    assert document is not None and not insert_json(con, TABLE, document)
    insert_columns(con, TABLE, dict(zip(TABLE.column_names, piece, strict=True)))
    assert con.execute("SELECT n, small, x, flag FROM t").fetchall() == [(1, 2, 0.5, True)]


def test_without_a_memory_file_the_document_goes_through_a_temporary_file_left_nowhere(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import tempfile

    monkeypatch.delattr(os, "memfd_create", raising=False)  # as on macOS
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    piece = _piece([("a/x", 1, 2, 0.5, True, None, None)] * 300)
    con = duckdb.connect()
    con.execute(TABLE.ddl)
    document = json_rows(TABLE, piece)
    assert document is not None and insert_json(con, TABLE, document)
    assert con.execute("SELECT count(*), sum(n) FROM t").fetchone() == (300, 300)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(__import__("os"), "memfd_create"), reason="Linux only")
def test_the_document_never_touches_the_temporary_folder_on_linux(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed while DuckDB reads the document cannot leave a file behind."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # would fail if used
    piece = _piece([("a/x", 1, 2, 0.5, True, None, None)] * 300)
    con = duckdb.connect()
    con.execute(TABLE.ddl)
    document = json_rows(TABLE, piece)
    assert document is not None and insert_json(con, TABLE, document)
    assert con.execute("SELECT count(*) FROM t").fetchone() == (300,)
