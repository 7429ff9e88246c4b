"""How fast `session-pipeline report` answers on a big state.

    .venv/bin/python -m bench.report_bench [--sessions 100000] [--repeats 3]

Builds (once, under `$BENCH_DIR`) a state database of N sessions by synthesizing rows straight
into the usage tables with SQL (running the pipeline over 100k transcripts would take most of
an hour and measure the pipeline, not the reports): ~20 requests per session over 100 users
and 90 days, five models and one without a price, 2% of the sessions resumed (their first
requests copied into a second file, as Claude Code does), subagent files, and ~12 events per
session (tools, skills, subagents, MCP, slash commands, 5% errors). Then runs each report kind
as a user does (`session-pipeline report KIND --json`, a new interpreter each time, its
start-up included) and prints the median seconds of each, beside a bare `session-pipeline
query "SELECT 1"` (the interpreter and imports alone). Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.corpus import bench_dir

REPORTS: tuple[tuple[str, ...], ...] = (
    ("daily",),
    ("monthly",),
    ("sessions",),
    ("blocks",),
    ("tools",),
    ("daily", "--user", "user7", "--since", "2026-09-01", "--until", "2026-09-30"),
)

# (model, weight): the last has no price, so reports show partial costs.
_MODELS = (
    ("claude-sonnet-4-5-20250929", 55),
    ("claude-opus-4-5-20251101", 20),
    ("claude-haiku-4-5-20251001", 15),
    ("claude-opus-4-1-20250805", 8),
    ("acme-large", 2),
)
_TOOLS = ("Read", "Edit", "Bash", "Grep", "Glob", "Write", "TodoWrite", "WebFetch")


def _model_case(column: str) -> str:
    """SQL choosing a model from a number in [0, 100)."""
    parts, edge = [], 0
    for name, weight in _MODELS:
        edge += weight
        parts.append(f"WHEN {column} < {edge} THEN '{name}'")
    return "CASE " + " ".join(parts) + " END"


def synthesize(db: Path, sessions: int, *, requests_per_session: int = 20) -> None:
    """A state database at `db` with the usage tables filled for `sessions` sessions."""
    from processors.usage import UsageProcessor
    from state import store
    from state.db import connect, transaction
    from state.migrations import migrate

    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(db.name + ".partial")
    partial.unlink(missing_ok=True)
    processor = UsageProcessor()
    model_sql = _model_case("(hash(s.i * 7 + 1) % 100)")
    with connect(partial) as con:
        migrate(con)
        with transaction(con):
            store.ensure_outputs(con, processor)
        # Sessions: user, start (Aug-Oct 2026), main model; 2% resumed copies of session i-1.
        con.execute(
            f"""CREATE TEMP TABLE synth_sessions AS
            SELECT i, 'user' || (i % 100) AS username,
                lpad(to_hex(hash(i)), 16, '0') || '-' || i AS session_id,
                TIMESTAMPTZ '2026-08-01 00:00:00+00'
                    + to_microseconds(CAST(hash(i * 3 + 2) % (90 * 86400000000) AS BIGINT))
                    AS started_at,
                {model_sql} AS model
            FROM range({sessions}) s(i)"""
        )
        n = requests_per_session
        con.execute(
            f"""INSERT INTO usage_requests_raw
            SELECT username || '/' || session_id || '.jsonl', username, session_id,
                'msg_' || i || '_' || j, 'req_' || i || '_' || j, model,
                CASE WHEN model = 'acme-large' THEN 'acme-large'
                     ELSE regexp_replace(model, '-\\d{{8}}$', '') END,
                1 + hash(i, j) % 9, 20 + hash(i, j, 1) % 400, 100 + hash(i, j, 2) % 3000,
                11904 + j * 400, NULL, NULL,
                CASE WHEN j = {n - 1} THEN 'end_turn' ELSE 'tool_use' END, 'standard',
                false, NULL,
                started_at + to_microseconds(CAST(j * 45000000 + hash(i, j, 3) % 30000000
                    AS BIGINT))
            FROM synth_sessions, range({n}) r(j)"""
        )
        # Resumed sessions: 2% of sessions copy the first 5 requests of the one before.
        con.execute(
            """INSERT INTO usage_requests_raw
            SELECT r.username || '/resumed-' || s.i || '.jsonl', r.username,
                'resumed-' || s.i, r.message_id, r.request_id, r.model, r.price_model,
                r.input_tokens, r.output_tokens, r.cache_creation_input_tokens,
                r.cache_read_input_tokens, NULL, NULL, r.stop_reason, r.service_tier,
                false, NULL, r.occurred_at
            FROM synth_sessions s
            JOIN usage_requests_raw r ON r.session_id = s.session_id
            WHERE s.i % 50 = 0 AND r.message_id LIKE 'msg_%' AND
                CAST(split_part(r.message_id, '_', 3) AS INTEGER) < 5"""
        )
        con.execute(
            f"""INSERT INTO usage_events (session_file, event_id, username, session_id,
                is_sidechain, event_type, tool_name, skill_name, subagent_type, mcp_server,
                mcp_tool, command_name, tool_use_id, is_error, model, occurred_at)
            SELECT username || '/' || session_id || '.jsonl', 'toolu_' || i || '_' || k,
                username, session_id, false, kind,
                CASE kind WHEN 'skill' THEN 'Skill' WHEN 'subagent' THEN 'Agent'
                    WHEN 'mcp' THEN 'mcp__github__' || tool WHEN 'slash_command' THEN NULL
                    ELSE tool END,
                CASE WHEN kind = 'skill' THEN 'pdf' END,
                CASE WHEN kind = 'subagent' THEN 'Explore' END,
                CASE WHEN kind = 'mcp' THEN 'github' END,
                CASE WHEN kind = 'mcp' THEN tool END,
                CASE WHEN kind = 'slash_command' THEN '/compact' END,
                'toolu_' || i || '_' || k, hash(i, k, 5) % 20 = 0, model,
                started_at + to_microseconds(CAST(k * 70000000 AS BIGINT))
            FROM (
                SELECT s.*, k,
                    CASE WHEN k = 0 AND i % 5 = 0 THEN 'slash_command'
                         WHEN k = 1 AND i % 7 = 0 THEN 'skill'
                         WHEN k = 2 AND i % 4 = 0 THEN 'subagent'
                         WHEN k = 3 AND i % 3 = 0 THEN 'mcp'
                         ELSE 'tool' END AS kind,
                    [{", ".join(f"'{t}'" for t in _TOOLS)}]
                        [CAST(1 + hash(i, k) % {len(_TOOLS)} AS BIGINT)] AS tool
                FROM synth_sessions s, range(12) e(k)
            )"""
        )
        con.execute(
            """INSERT INTO usage_sessions_raw (session_file, username, session_id, is_subagent,
                started_at, ended_at, primary_model)
            SELECT DISTINCT ON (session_file) session_file, username, session_id, false,
                min(occurred_at) OVER (PARTITION BY session_file),
                max(occurred_at) OVER (PARTITION BY session_file), model
            FROM usage_requests_raw"""
        )
        # rows put in by SQL: list the copies not kept from every request, as a state made
        # before the list existed does (the pipeline keeps it up to date as it writes)
        from processors.usage_reports import COPIES_DDL

        con.execute("DROP TABLE usage_request_copies")
        con.execute(COPIES_DDL)
        con.execute("CHECKPOINT")
    partial.rename(db)


def state(sessions: int) -> Path:
    """The synthesized state of `sessions` sessions, built once under $BENCH_DIR."""
    db = bench_dir() / f"report-state-v2-n{sessions}.duckdb"
    if not db.exists():
        synthesize(db, sessions)
    return db


def command() -> list[str]:
    """`session-pipeline`, as a user runs it."""
    return [str(Path(sys.executable).with_name("session-pipeline"))]


def timed(argv: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env, timeout=600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.decode()[-300:]}")
    return elapsed


def measure(db: Path, repeats: int = 3) -> dict[str, float]:
    """Median seconds of each report as a subprocess (`--json`), and of a bare
    `session-pipeline query "SELECT 1"` (interpreter, imports, opening the state)."""
    exe = str(Path(sys.executable).with_name("session-pipeline"))
    base = command()
    runs = {"query SELECT 1": [exe, "query", "SELECT 1", "--json"]}
    for kind in REPORTS:
        runs["report " + " ".join(kind)] = [*base, "report", *kind, "--json"]
    return {
        name: statistics.median(timed([*argv, "--db", str(db)]) for _ in range(repeats))
        for name, argv in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    db = state(args.sessions)
    print(f"state: {db} ({args.sessions} sessions)")
    print(f"command: {' '.join(command())}")
    for name, seconds in measure(db, args.repeats).items():
        print(f"{seconds:7.3f} s  {name} --json")


if __name__ == "__main__":
    main()
