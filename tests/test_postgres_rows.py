"""PostgreSQL's row writes leave the same rows as DuckDB's: an increment's delete by key (NULLs
in a key compare equal, matched without `IS NOT DISTINCT FROM`, which PostgreSQL can neither
hash nor look up in an index), and a reader process's documents inserted in one COPY."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import duckdb
import orjson

from processors.base import Table
from state import duckdb_backend, postgres_backend
from state.db import connect, transaction

KEYED = Table(
    "keyed_rows",
    (
        ("session_file", "VARCHAR NOT NULL"),
        ("message_id", "VARCHAR"),
        ("request_id", "VARCHAR"),
        ("n", "INTEGER"),
    ),
    key=("message_id", "request_id"),
)


def _rows(rng: random.Random, sessions: list[str], count: int, start: int = 0) -> dict[str, list]:
    def key_part() -> str | None:  # few distinct values and many NULLs: every pattern occurs
        return None if rng.random() < 0.25 else f"k{rng.randrange(12)}"

    rows: dict[str, list[Any]] = {name: [] for name in KEYED.column_names}
    for i in range(count):
        rows["session_file"].append(rng.choice(sessions))
        rows["message_id"].append(key_part())
        rows["request_id"].append(key_part())
        rows["n"].append(start + i)
    return rows


def _stored(con: Any, table: Table) -> list[tuple[Any, ...]]:
    return sorted(
        con.execute(f"SELECT * FROM {table.name}").fetchall(),
        key=lambda row: tuple((v is None, v) for v in row),
    )


def test_delete_by_key_removes_the_rows_duckdb_removes(pg_db: Any, tmp_path: Path) -> None:
    rng = random.Random(15)
    sessions = ["alice/a.jsonl", "alice/b.jsonl", "bob/c.jsonl"]
    stored = _rows(rng, sessions, 600)
    # the increment: keys of each NULL pattern, of stored rows and of none, one session absent
    replaced = _rows(rng, [*sessions[:2], "carol/d.jsonl"], 150, start=10_000)
    replaced["message_id"] += [None, "k1"]
    replaced["request_id"] += [None, None]
    replaced["session_file"] += ["alice/a.jsonl", "bob/c.jsonl"]
    replaced["n"] += [1, 2]

    with duckdb.connect(str(tmp_path / "rows.duckdb")) as con:
        con.execute(KEYED.ddl)
        duckdb_backend.insert_columns(con, KEYED, {k: list(v) for k, v in stored.items()})
        duckdb_backend.delete_by_key(con, KEYED, replaced)
        expected = _stored(con, KEYED)

    with connect(pg_db) as con:
        con.execute(postgres_backend.dialect(KEYED.ddl))
        postgres_backend.after_table(con, KEYED)
        with transaction(con):
            postgres_backend.insert_columns(con, KEYED, {k: list(v) for k, v in stored.items()})
        with transaction(con):
            postgres_backend.delete_by_key(con, KEYED, replaced)
        assert _stored(con, KEYED) == expected
    assert 0 < len(expected) < 600  # some rows went, some stayed


def test_delete_by_key_of_one_big_session_matches_by_hash(pg_db: Any) -> None:
    """A segment of a big session replacing thousands of its rows: matched by key, not each
    replaced row compared with every row of the session (that took minutes)."""
    count = 40_000
    stored = {
        "session_file": ["alice/big.jsonl"] * count,
        "message_id": [f"m{i}" for i in range(count)],
        "request_id": [f"r{i}" if i % 7 else None for i in range(count)],
        "n": list(range(count)),
    }
    tail = slice(count - 10_000, count)
    replaced = {name: values[tail] for name, values in stored.items() if name != "n"}
    with connect(pg_db) as con:
        con.execute(postgres_backend.dialect(KEYED.ddl))
        postgres_backend.after_table(con, KEYED)
        with transaction(con):
            postgres_backend.insert_columns(con, KEYED, stored)
        con.execute(f"ANALYZE {KEYED.name}")
        with transaction(con):
            con.execute("SET LOCAL statement_timeout = '20s'")  # the old plan: minutes
            postgres_backend.delete_by_key(con, KEYED, replaced)
        assert con.execute(f"SELECT count(*), max(n) FROM {KEYED.name}").fetchone() == (
            30_000,
            29_999,
        )


def test_documents_go_in_one_copy_with_the_same_rows(pg_db: Any, monkeypatch: Any) -> None:
    """Many documents (one per session) in one COPY; a value PostgreSQL refuses (an INTEGER out
    of range) in one of them still leaves every row, that value NULL, as before."""
    table = Table(
        "doc_rows",
        (("session_file", "VARCHAR NOT NULL"), ("n", "INTEGER"), ("x", "DOUBLE"), ("s", "VARCHAR")),
    )
    documents = []
    expected = []
    for d in range(30):
        rows = [(f"u/s{d}.jsonl", d * 100 + i, i / 4, f"t{i}") for i in range(d % 4 + 1)]
        if d == 17:
            rows.append((f"u/s{d}.jsonl", 1 << 40, 0.5, "too big"))
        piece = [list(column) for column in zip(*rows, strict=True)]
        documents.append((len(rows), orjson.dumps({f"c{i}": v for i, v in enumerate(piece, 1)})))
        expected += [(s, n if n < 1 << 31 else None, x, t) for s, n, x, t in rows]
    copies: list[int] = []
    original = postgres_backend._copy

    def counted(con: Any, table: Table, piece: list[list[Any]]) -> None:
        copies.append(len(piece[0]))
        original(con, table, piece)

    monkeypatch.setattr(postgres_backend, "_copy", counted)
    with connect(pg_db) as con:
        con.execute(postgres_backend.dialect(table.ddl))
        with transaction(con):
            postgres_backend.insert_documents(con, table, documents)
        assert _stored(con, table) == sorted(
            expected, key=lambda r: tuple((v is None, v) for v in r)
        )
    assert copies == [len(expected), len(expected)]  # refused whole, then fitted: two COPYs
