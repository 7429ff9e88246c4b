"""The bundled sample sessions through the real usage processor and DuckDB: the numbers a
person counted by hand (examples/sessions/README.md) must come out exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

from flows.pipeline import run_direct
from processors.usage import UsageProcessor
from state.db import connect
from tests.conftest import EXAMPLES

# file prefix: (requests, tool_use ids, skill, subagent, mcp, tool errors, slash commands, output tokens)
EXPECTED = {
    "alice/3f6c2a1e": (8, 7, 0, 0, 0, 1, 0, 857),
    "alice/b8e41d07": (17, 15, 0, 0, 0, 1, 1, 2142),
    "bob/c2d7a9f4": (5, 5, 0, 0, 1, 0, 1, 724),
    "bob/5a9e3c71-d048-4b2f-86e1-f0c4a7b2d938.jsonl": (8, 6, 0, 1, 0, 1, 0, 800),
    "bob/5a9e3c71-d048-4b2f-86e1-f0c4a7b2d938/subagents": (3, 4, 0, 0, 0, 0, 0, 286),
    "carol/e4b1f8a2": (9, 7, 1, 1, 1, 0, 0, 1084),
    "carol/7d2c5e90": (6, 3, 1, 0, 0, 0, 1, 580),
}


def test_sample_sessions_give_the_hand_counted_figures(tmp_path: Path) -> None:
    data_dir, db = tmp_path / "sessions", tmp_path / "state.duckdb"
    shutil.copytree(EXAMPLES, data_dir)
    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert (figures.scanned, figures.processed, figures.errors) == (7, 7, 0)
    with connect(db) as con:
        rows = con.execute(
            """
            SELECT session_file, assistant_messages, tool_calls, skill_calls, subagent_calls,
                   mcp_calls, tool_errors, slash_commands, output_tokens, malformed_lines
            FROM usage_sessions
            """
        ).fetchall()
        assert len(rows) == 7
        for prefix, expected in EXPECTED.items():
            (row,) = [r for r in rows if r[0].startswith(prefix)]
            assert row[1:9] == expected, row[0]
        assert sum(r[9] for r in rows) == 1  # the one malformed line
        unique = con.execute(
            "SELECT count(*), sum(output_tokens) FROM usage_requests_unique"
        ).fetchone()
        assert unique == (48, 5616)  # the resumed session's copied requests count once
        per_file = con.execute("SELECT count(*) FROM usage_requests").fetchone()
        assert per_file == (56,)
        subagent = con.execute(
            "SELECT agent_type, is_subagent FROM usage_sessions WHERE session_file LIKE '%/subagents/%'"
        ).fetchone()
        assert subagent == ("Explore", True)
        assert con.execute(
            "SELECT count(*) FROM usage_events WHERE is_sidechain AND agent_id IS NOT NULL"
        ).fetchone() == (4,)
