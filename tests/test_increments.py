"""Append-only increments: only new complete lines are read, and the rows equal a full read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from flows.pipeline import prepare, run_direct
from processors.base import Increment, Table
from processors.session import Session
from state.db import connect


class Tail:
    """Append-safe: one row per line keyed by its number, plus a per-session summary."""

    name = "tail"
    version = "1"
    cadence_seconds = 60
    append_safe = True
    views = ()
    tables = (
        Table(
            "tail_lines",
            (("session_file", "VARCHAR"), ("line_no", "INTEGER"), ("text", "VARCHAR")),
            key=("line_no",),
        ),
        Table(
            "tail_sessions",
            (("session_file", "VARCHAR"), ("lines", "INTEGER"), ("last", "VARCHAR")),
        ),
    )

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, int]] = []  # (key, checkpoint given, lines read)

    def process(self, session: Session) -> Any:
        raise AssertionError("an append-safe processor is driven through process_increment")

    def process_increment(self, session: Session, checkpoint: Any | None) -> Increment:
        count = checkpoint["count"] if checkpoint else 0
        last = checkpoint["last"] if checkpoint else None
        rows, read = [], 0
        for line in session.lines():
            count, read, last = count + 1, read + 1, str(line.get("t"))
            rows.append({"session_file": session.key, "line_no": count, "text": last})
        self.calls.append((session.key, checkpoint, read))
        summary = {"session_file": session.key, "lines": count, "last": last}
        return Increment(
            {"tail_lines": rows, "tail_sessions": [summary]}, count, {"count": count, "last": last}
        )


def _lines(*texts: str) -> bytes:
    return b"".join(orjson.dumps({"t": t}) + b"\n" for t in texts)


def _tables(db: Path) -> tuple[list[Any], list[Any], list[Any]]:
    with connect(db) as con:
        return (
            con.execute("SELECT * FROM tail_lines ORDER BY ALL").fetchall(),
            con.execute("SELECT * FROM tail_sessions ORDER BY ALL").fetchall(),
            con.execute(
                "SELECT session_file, items_extracted, malformed_lines, complete_offset, size_bytes "
                "FROM session_processor_state ORDER BY 1"
            ).fetchall(),
        )


def _full(tmp_path: Path, data_dir: Path) -> tuple[list[Any], list[Any], list[Any]]:
    """A clean run over the same files into a fresh database."""
    fresh = tmp_path / f"fresh-{len(list(tmp_path.iterdir()))}.duckdb"
    run_direct(Tail(), data_dir, fresh, max_attempts=3)
    return _tables(fresh)


def test_an_append_reads_only_the_new_lines(tmp_path: Path, data_dir: Path, db: Path) -> None:
    path = data_dir / "alice" / "s.jsonl"
    path.parent.mkdir()
    path.write_bytes(_lines("a", "b") + b"not json\n" + b'{"t": "par')  # ends mid-line
    first = Tail()
    run_direct(first, data_dir, db, max_attempts=3)
    assert first.calls == [("alice/s.jsonl", None, 2)]
    with path.open("ab") as f:
        f.write(b'tial"}\n' + _lines("c") + b"[1]\n")
    second = Tail()
    figures = run_direct(second, data_dir, db, max_attempts=3)
    assert figures.processed == 1
    assert second.calls == [("alice/s.jsonl", {"count": 2, "last": "b"}, 2)]  # "partial", "c"
    mine = _tables(db)
    assert mine == _full(tmp_path, data_dir)
    assert mine[0][-1] == ("alice/s.jsonl", 4, "c")
    assert mine[2] == [("alice/s.jsonl", 4, 2, path.stat().st_size, path.stat().st_size)]


def test_a_changed_prefix_is_read_whole(tmp_path: Path, data_dir: Path, db: Path) -> None:
    path = data_dir / "alice" / "s.jsonl"
    path.parent.mkdir()
    path.write_bytes(_lines("a", "b"))
    run_direct(Tail(), data_dir, db, max_attempts=3)
    path.write_bytes(_lines("A", "b", "c"))  # same length prefix, different bytes, and longer
    again = Tail()
    run_direct(again, data_dir, db, max_attempts=3)
    assert again.calls == [("alice/s.jsonl", None, 3)]
    assert _tables(db) == _full(tmp_path, data_dir)


def test_many_increments_equal_one_full_read(tmp_path: Path, data_dir: Path, db: Path) -> None:
    path = data_dir / "bob" / "s.jsonl"
    path.parent.mkdir()
    body = _lines(*[f"line {i}" for i in range(40)])
    for cut in (7, 8, 50, 51, 200, 333, 334, len(body) - 1, len(body)):
        path.write_bytes(body[:cut])
        run_direct(Tail(), data_dir, db, max_attempts=3)
    assert _tables(db) == _full(tmp_path, data_dir)


def test_a_shorter_file_and_a_version_bump_are_read_whole(
    tmp_path: Path, data_dir: Path, db: Path
) -> None:
    path = data_dir / "carol" / "s.jsonl"
    path.parent.mkdir()
    path.write_bytes(_lines("a", "b", "c"))
    run_direct(Tail(), data_dir, db, max_attempts=3)
    path.write_bytes(_lines("x"))
    shorter = Tail()
    run_direct(shorter, data_dir, db, max_attempts=3)
    assert shorter.calls == [("carol/s.jsonl", None, 1)]
    assert _tables(db) == _full(tmp_path, data_dir)
    bumped = Tail()
    bumped.version = "2"
    with path.open("ab") as f:
        f.write(_lines("y"))
    run_direct(bumped, data_dir, db, max_attempts=3)
    assert bumped.calls == [("carol/s.jsonl", None, 2)]


@pytest.mark.parametrize(
    "variant",
    ["defaults", "5-row-statements-compressed-checkpoints", "4k-segments", "forgetful"],
)
def test_usage_through_the_pipeline_equals_a_full_read(
    tmp_path: Path,
    data_dir: Path,
    db: Path,
    variant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real samples grown in three steps through the pipeline: every usage table matches a
    fresh full run, row for row, and the later runs read only what was appended. Also with
    inserts and keyed deletes cut into statements of a few rows and every checkpoint stored
    compressed; with files read in segments of 4 KB, each committed on its own; and with
    checkpoints that keep no entry, so increments fall back to whole reads."""
    from flows import work
    from processors.usage import UsageProcessor
    from state import duckdb_backend
    from tests.conftest import EXAMPLES

    if variant == "5-row-statements-compressed-checkpoints":
        monkeypatch.setattr(duckdb_backend, "STATEMENT_ROWS", 5)
        monkeypatch.setattr(work, "COMPRESS_CHECKPOINT_ABOVE", 0)
    if variant == "4k-segments":
        monkeypatch.setattr(work, "SEGMENT_BYTES", 4096)
    keep = 0 if variant == "forgetful" else None
    processor = UsageProcessor(keep, keep) if keep is not None else UsageProcessor()

    sources = sorted(p for p in EXAMPLES.rglob("*.jsonl"))
    bodies = {p.relative_to(EXAMPLES): p.read_bytes() for p in sources}
    for step in (3, 2, 1):  # a third, two thirds, everything; cuts fall inside lines
        for rel, body in bodies.items():
            target = data_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body[: len(body) * (4 - step) // 3])
        if step < 3:
            reasons = {c.reason for c in prepare(processor, data_dir, db).candidates}
            assert reasons == {"append"}
        figures = run_direct(processor, data_dir, db, max_attempts=3)
        assert (figures.errors, figures.processed) == (0, len(bodies))
    with connect(db) as con:
        reasons = con.execute(
            "SELECT count(*) FROM session_processor_state WHERE complete_offset = size_bytes"
        ).fetchone()
    assert reasons == (len(bodies),)
    monkeypatch.undo()
    fresh = tmp_path / "fresh.duckdb"
    run_direct(UsageProcessor(), data_dir, fresh, max_attempts=3)
    for table in ("usage_events", "usage_requests", "usage_sessions"):
        with connect(db) as con:
            mine = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        with connect(fresh) as con:
            theirs = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        assert mine == theirs, table


def test_checkpoints_are_stored_as_json_or_compressed_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.work import pack_checkpoint, unpack_checkpoint

    value = {"lines": 3, "strings": ["x" * 100] * 50, "spans": [[1, 2]]}
    small = pack_checkpoint(value)
    assert small == orjson.dumps(value)  # below the threshold: plain JSON, as older rows are
    monkeypatch.setattr("flows.work.COMPRESS_CHECKPOINT_ABOVE", 100)
    packed = pack_checkpoint(value)
    assert len(packed) < len(small) and unpack_checkpoint(packed) == value
    assert unpack_checkpoint(small) == value
    assert unpack_checkpoint(b"[1,2]") == [1, 2] and unpack_checkpoint(b"null") is None


def test_a_spent_time_budget_stops_a_big_file_between_segments(
    tmp_path: Path, data_dir: Path, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose time budget is spent stops after the segment it is reading, commits it
    (the session is deferred, not processed) and the next run continues from there."""
    from flows import work
    from processors.usage import UsageProcessor
    from tests.conftest import EXAMPLES

    source = max(EXAMPLES.rglob("*.jsonl"), key=lambda p: p.stat().st_size)
    target = data_dir / "alice" / source.name
    target.parent.mkdir(parents=True)
    target.write_bytes(source.read_bytes())
    clean = tmp_path / "clean.duckdb"
    run_direct(UsageProcessor(), data_dir, clean, max_attempts=3)
    monkeypatch.setattr(work, "SEGMENT_BYTES", 4096)
    cut = run_direct(UsageProcessor(), data_dir, db, max_attempts=3, time_budget_seconds=1e-6)
    assert (cut.processed, cut.deferred, cut.errors) == (0, 1, 0)
    with connect(db) as con:
        ((offset, size),) = con.execute(
            "SELECT complete_offset, size_bytes FROM session_processor_state"
        ).fetchall()
    assert 0 < offset == size < target.stat().st_size
    rest = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    assert (rest.processed, rest.deferred, rest.errors) == (1, 0, 0)
    for table in ("usage_events", "usage_requests", "usage_sessions"):
        sql = f"SELECT * FROM {table} ORDER BY ALL"
        with connect(db) as con:
            mine = con.execute(sql).fetchall()
        with connect(clean) as con:
            assert mine == con.execute(sql).fetchall(), table
