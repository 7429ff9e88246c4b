"""The whole-read fallback of an append-safe processor goes in committed segments when the
processor names a restart checkpoint (memory bounded like any big read), and its rows equal a
clean read's."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows import work
from flows.pipeline import run_direct
from processors.usage import UsageProcessor
from state.db import connect
from tests.transcripts import Transcript, text, tool_use

TABLES = ("usage_events", "usage_requests", "usage_sessions")
KEY = "alice/long.jsonl"


def _tables(db: Path) -> dict[str, list[tuple[object, ...]]]:
    with connect(db, read_only=True) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


def test_a_late_result_for_an_old_call_rereads_in_segments(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    data_dir, db, fresh = tmp_path / "sessions", tmp_path / "s.duckdb", tmp_path / "f.duckdb"
    t = Transcript("s-long")
    for n in range(700):  # more tool calls than a checkpoint keeps
        t.user(f"step {n}")
        t.response([text("on it"), tool_use(f"toolu_{n:04d}", "Bash", {"command": f"echo {n}"})])
        if n:
            t.tool_result(f"toolu_{n:04d}")
    path = t.write(data_dir / KEY)
    monkeypatch.setattr(work, "SEGMENT_BYTES", path.stat().st_size // 4)
    assert run_direct(UsageProcessor(), data_dir, db, max_attempts=3).processed == 1
    t.tool_result("toolu_0000", is_error=True)  # the result of the very first call, at last
    t.write(path)
    caplog.set_level(logging.INFO)
    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    assert (figures.processed, figures.errors) == (1, 0)
    segments = [r for r in caplog.records if "committed its first" in r.getMessage()]
    assert len(segments) >= 3, "the fallback was read in one piece"
    assert run_direct(UsageProcessor(), data_dir, fresh, max_attempts=3).processed == 1
    assert _tables(db) == _tables(fresh)
    with connect(db, read_only=True) as con:
        assert con.execute(
            "SELECT is_error FROM usage_events WHERE tool_use_id = 'toolu_0000'"
        ).fetchall() == [(True,)]
