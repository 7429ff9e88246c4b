"""The copies of requests that resumed sessions make are found as rows are written: whatever
sessions come, change, grow or go, `usage_requests_unique` keeps exactly the copy a ranking of
every request would keep."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.pipeline import run_direct
from processors.usage import UsageProcessor
from state.db import connect
from state.store import forget_missing
from tests.transcripts import Transcript, text, usage

# The reference: rank every request's copies (the view's rule before this table existed).
# (SQL DuckDB and PostgreSQL both run: the same tests run on each.)
RANKED = """SELECT session_file, message_id, request_id FROM (
    SELECT session_file, message_id, request_id, row_number() OVER (
        PARTITION BY message_id, request_id ORDER BY
        CASE WHEN stop_reason IS NULL THEN 1 ELSE 0 END, output_tokens DESC NULLS LAST,
        session_file COLLATE "C") AS copy_rank
    FROM usage_requests) ranked WHERE copy_rank = 1 ORDER BY 1, 2, 3"""
UNIQUE = "SELECT session_file, message_id, request_id FROM usage_requests_unique ORDER BY 1, 2, 3"

# A pool of requests the sessions draw from: a request in two sessions is a resumed copy.
POOL = [(f"msg_{n:03d}", f"req_{n:03d}" if n % 5 else None) for n in range(12)]


def _add(t: Transcript, picks: list[tuple[int, int, bool]]) -> Transcript:
    for n, output, complete in picks:
        message_id, request_id = POOL[n]
        t.user(f"ask {n}")
        t.response(  # an incomplete copy (no stop_reason) ranks after a complete one
            [text("a"), text("b")],
            message_id=message_id,
            request_id=request_id,
            final_usage=usage(output_tokens=output),
            stop_reason="end_turn" if complete else None,  # type: ignore[arg-type]
        )
    return t


def _write(path: Path, picks: list[tuple[int, int, bool]]) -> Transcript:
    t = _add(Transcript(path.stem), picks)
    t.write(path)
    return t


def _unique_is_exact(db: Any) -> None:
    with connect(db, read_only=True) as con:
        assert con.execute(UNIQUE).fetchall() == con.execute(RANKED).fetchall()


session_contents = st.lists(
    st.tuples(st.integers(0, len(POOL) - 1), st.integers(1, 400), st.booleans()),
    min_size=1,
    max_size=6,
    unique_by=lambda pick: pick[0],
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=st.lists(session_contents, min_size=2, max_size=5),
    second=st.lists(
        st.one_of(st.none(), session_contents, st.tuples(st.just("grow"), session_contents)),
        min_size=2,
        max_size=5,
    ),
)
def test_unique_requests_follow_every_change(
    tmp_path_factory: object, first: list, second: list
) -> None:
    """Sessions written, then rewritten, grown (read as increments) or deleted, then the
    deleted ones forgotten: after each step the kept copies are exactly a full ranking's."""
    root = tmp_path_factory.mktemp("copies")  # type: ignore[attr-defined]
    _follow_every_change(root, root / "state.duckdb", first, second)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=st.lists(session_contents, min_size=2, max_size=5),
    second=st.lists(
        st.one_of(st.none(), session_contents, st.tuples(st.just("grow"), session_contents)),
        min_size=2,
        max_size=5,
    ),
)
def test_unique_requests_follow_every_change_on_postgresql(
    tmp_path_factory: object, postgres_url: str, first: list, second: list
) -> None:
    """The same on PostgreSQL (its own SQL for the copies of a commit's keys), a schema per
    example."""
    import uuid

    import psycopg

    from state.db import location
    from tests.conftest import postgres_schema_url

    root = tmp_path_factory.mktemp("copies_pg")  # type: ignore[attr-defined]
    name = f"test_{uuid.uuid4().hex[:12]}"
    try:
        db = location(postgres_schema_url(postgres_url, name))
        _follow_every_change(root, db, first, second)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as con:
            con.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _follow_every_change(root: Path, db: Any, first: list, second: list) -> None:
    from flows import request_copies

    data_dir = root / "sessions"
    paths = [data_dir / f"u{i % 2}" / f"s{i}.jsonl" for i in range(len(first))]
    transcripts = [_write(path, picks) for path, picks in zip(paths, first, strict=True)]
    run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    _unique_is_exact(db)
    for path, t, change in zip(paths, transcripts, second, strict=False):
        if change is None:
            path.unlink(missing_ok=True)
        elif change[0] == "grow":
            _add(t, change[1]).write(path)  # the same lines and more: an append
        else:
            _write(path, change)
    run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    _unique_is_exact(db)
    with connect(db) as con:
        forget_missing(con, UsageProcessor(), around=request_copies.forget_hooks())
    _unique_is_exact(db)
    shutil.rmtree(root, ignore_errors=True)


def test_a_state_from_before_fills_the_table_from_every_request(
    tmp_path: Path, state_db: Any
) -> None:
    data_dir, db = tmp_path / "sessions", state_db
    _write(data_dir / "u/a.jsonl", [(1, 10, True), (2, 20, True)])
    _write(data_dir / "u/b.jsonl", [(1, 30, True), (3, 5, True)])
    run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    with connect(db) as con:
        con.execute("DROP TABLE usage_request_copies CASCADE")  # as a state made before it
    run_direct(UsageProcessor(), data_dir, db, max_attempts=3)  # nothing to read: views made
    _unique_is_exact(db)
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT * FROM usage_request_copies").fetchall() == [
            ("u/a.jsonl", "msg_001", "req_001")
        ]
