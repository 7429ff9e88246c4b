"""The report views and `session-pipeline report`, on the bundled sample sessions (values
counted by hand from examples/sessions and its README), and the 5-hour blocks against
ccusage's rule applied request by request."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.pipeline import run_direct
from flows.report import main, register
from processors.usage import UsageProcessor
from processors.usage_reports import UNIQUE_REQUESTS
from state.db import connect
from tests.conftest import EXAMPLES, write_session

ALICE_1 = "3f6c2a1e-8b4d-4c71-9e2a-5d0b7f1c9a43"  # alice/b8e41d07 resumes it: 8 requests copied


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data_dir, db = root / "sessions", root / "state.duckdb"
    shutil.copytree(EXAMPLES, data_dir)
    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    assert figures.errors == 0
    return db


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with connect(db, read_only=True) as con:
        return con.execute(sql).fetchall()


def report(db: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*argv, "--db", str(db)]) == 0
    return capsys.readouterr().out


# --- views ------------------------------------------------------------------------------------


def test_usage_daily_counts_a_resumed_session_once(sample_db: Path) -> None:
    got = rows(
        sample_db,
        "SELECT day::VARCHAR, username, model, sessions, requests, input_tokens, output_tokens,"
        " cache_creation_input_tokens, cache_read_input_tokens, round(cost_usd, 8),"
        " unpriced_requests FROM usage_daily ORDER BY ALL",
    )
    # alice, 2026-11-03: 8 requests of 3f6c2a1e (also copied into b8e41d07) + 9 of b8e41d07;
    # input 5+8+9+9+9+4+5+9 + 10+4+3+6+4+3+9+9+10, output 857 + 1285.
    assert got[0] == (
        "2026-11-03", "alice", "claude-sonnet-4-5-20250929", 2, 17, 116, 2142, 12195,
        247274, 0.15239145, 0,
    )  # fmt: skip
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in got[1:]] == [
        ("2026-11-10", "bob", "claude-opus-4-5-20251101", 1, 5),
        # the Explore subagent's 3 Haiku requests belong to its parent session
        ("2026-11-12", "bob", "claude-haiku-4-5-20251001", 1, 3),
        ("2026-11-12", "bob", "claude-opus-4-5-20251101", 1, 8),
        ("2026-11-17", "carol", "claude-sonnet-4-5-20250929", 1, 9),
        ("2026-11-24", "carol", "claude-haiku-4-5-20251001", 1, 3),  # after `/model haiku`
        ("2026-11-24", "carol", "claude-sonnet-4-5-20250929", 1, 3),
    ]
    # every request once: the same as usage_requests_unique, 8 fewer than usage_requests
    ((requests, cost),) = rows(sample_db, "SELECT sum(requests), sum(cost_usd) FROM usage_daily")
    ((unique, unique_cost),) = rows(
        sample_db, "SELECT count(*), sum(cost_usd) FROM usage_requests_unique"
    )
    # (the same costs summed in another order: equal to the last bits or nearly)
    assert (requests, cost) == (unique, pytest.approx(unique_cost, rel=1e-12))
    assert rows(sample_db, "SELECT count(*) FROM usage_requests") == [(56,)]


def test_usage_monthly(sample_db: Path) -> None:
    got = rows(
        sample_db,
        "SELECT month::VARCHAR, username, sum(sessions), sum(requests), sum(output_tokens)"
        " FROM usage_monthly GROUP BY ALL ORDER BY ALL",
    )
    # bob: 2 sessions (Opus in both, Haiku in the subagent of the second: counted per model)
    assert got == [
        ("2026-11-01", "alice", 2, 17, 2142),
        ("2026-11-01", "bob", 3, 16, 724 + 800 + 286),
        ("2026-11-01", "carol", 3, 15, 1084 + 314 + 266),
    ]


def test_unique_requests_are_usage_requests_unique(sample_db: Path) -> None:
    cols = "session_file, message_id, request_id, output_tokens, cost_usd"
    assert rows(sample_db, f"SELECT {cols} FROM {UNIQUE_REQUESTS} u ORDER BY ALL") == rows(
        sample_db, f"SELECT {cols} FROM usage_requests_unique ORDER BY ALL"
    )


def test_usage_blocks(sample_db: Path) -> None:
    got = rows(
        sample_db,
        "SELECT username, strftime(block_start, '%m-%d %H:%M'), strftime(block_end, '%H:%M'),"
        " strftime(last_request_at, '%H:%M:%S'), requests, output_tokens, is_active"
        " FROM usage_blocks ORDER BY block_start",
    )
    assert got == [
        # 14:02:46 is 4 h 47 min after alice's last request, but more than 5 h after 09:00
        ("alice", "11-03 09:00", "14:00", "09:15:47", 8, 857, False),
        ("alice", "11-03 14:00", "19:00", "14:06:47", 9, 1285, False),
        ("bob", "11-10 16:00", "21:00", "16:48:41", 5, 724, False),
        ("bob", "11-12 10:00", "15:00", "10:07:17", 11, 1086, False),
        ("carol", "11-17 13:00", "18:00", "13:24:58", 9, 1084, False),
        ("carol", "11-24 08:00", "13:00", "08:54:25", 6, 580, False),
    ]


def test_usage_tools(sample_db: Path) -> None:
    got = {
        (r[0], r[1]): r[2:]
        for r in rows(
            sample_db,
            "SELECT event_type, name, calls, errors, error_rate, users, sessions FROM usage_tools",
        )
    }
    # Bash: 11 rows, 2 of them copies in the resumed file; its error (alice) is copied too.
    assert got[("tool", "Bash")] == (9, 1, 0.1111, 3, 6)
    assert got[("tool", "Edit")] == (5, 1, 0.2, 2, 3)  # bob's rejected Edit
    assert got[("mcp", "github/create_issue")] == (1, 0, 0.0, 1, 1)
    assert got[("mcp", "linear/list_issues")] == (1, 0, 0.0, 1, 1)  # a plugin's server
    assert got[("skill", "superpowers:brainstorming")] == (1, 0, 0.0, 1, 1)
    assert got[("subagent", "Explore")] == (1, 0, 0.0, 1, 1)
    assert got[("subagent", "general-purpose")] == (1, 0, 0.0, 1, 1)  # the older `Task`
    assert {k[1] for k in got if k[0] == "slash_command"} == {"/compact", "/review", "/model"}
    assert sum(v[0] for v in got.values()) == 43


# --- blocks: ccusage's rule, request by request -------------------------------------------------


def reference_blocks(times: list[datetime]) -> list[tuple[datetime, int]]:
    """ccusage's rule on one user's requests: (block start, requests)."""
    hour = timedelta(hours=1)
    five = timedelta(hours=5)
    blocks: list[list[Any]] = []
    previous: datetime | None = None
    for t in sorted(times):
        if not blocks or t - blocks[-1][0] > five or (previous and t - previous > five):
            floored = t.replace(minute=0, second=0, microsecond=0)
            assert floored <= t < floored + hour
            blocks.append([floored, 0])
        blocks[-1][1] += 1
        previous = t
    return [(b[0], b[1]) for b in blocks]


def request_line(t: datetime, n: int | str) -> dict[str, Any]:
    return {
        "type": "assistant",
        "uuid": f"a-{n}",
        "sessionId": "s1",
        "timestamp": t.isoformat().replace("+00:00", "Z"),
        "requestId": f"req_{n}",
        "message": {
            "id": f"msg_{n}",
            "model": "claude-sonnet-4-5",
            "role": "assistant",
            "stop_reason": "end_turn",
            "content": [{"type": "text", "text": "ok"}],
            "usage": {"input_tokens": 1, "output_tokens": 2},
        },
    }


BASE = datetime(2026, 11, 2, tzinfo=UTC)
# minutes from BASE: exact hours, exact 5-hour gaps and ends, and anything in between
_offsets = st.one_of(
    st.integers(0, 60 * 40),
    st.integers(0, 40).map(lambda h: h * 60),
    st.integers(0, 8).map(lambda h: h * 300),
)


@settings(max_examples=40, deadline=None)  # each example is a pipeline run
@given(st.lists(_offsets, min_size=1, max_size=40), st.lists(_offsets, max_size=10))
def test_blocks_follow_ccusage_rule(alice: list[int], bob: list[int]) -> None:
    with _tmp() as root:
        _blocks_follow_ccusage_rule(root, root / "s.duckdb", alice, bob)


@settings(max_examples=15, deadline=None)
@given(st.lists(_offsets, min_size=1, max_size=40), st.lists(_offsets, max_size=10))
def test_blocks_follow_ccusage_rule_on_postgresql(
    postgres_url: str, alice: list[int], bob: list[int]
) -> None:
    """The same SQL on PostgreSQL (its integer division, RANGE frames, recursion), a schema
    per example."""
    import uuid

    import psycopg

    from state.db import location
    from tests.conftest import postgres_schema_url

    name = f"test_{uuid.uuid4().hex[:12]}"
    try:
        with _tmp() as root:
            db = location(postgres_schema_url(postgres_url, name))
            _blocks_follow_ccusage_rule(root, db, alice, bob)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as con:
            con.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _blocks_follow_ccusage_rule(root: Path, db: Any, alice: list[int], bob: list[int]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SESSION_PIPELINE_READ_PROCESSES", "1")
        times = {
            "alice": [BASE + timedelta(minutes=m) for m in alice],
            "bob": [BASE + timedelta(minutes=m, seconds=1) for m in bob],
        }
        for user, ts in times.items():
            if ts:
                lines = [request_line(t, f"{user}{n}") for n, t in enumerate(ts)]
                write_session(root / "data", f"{user}/s-{user}.jsonl", lines)
        run_direct(UsageProcessor(), root / "data", db, max_attempts=1)
        got = rows(
            db,
            "SELECT username, block_start, requests, block_end - block_start FROM usage_blocks"
            " ORDER BY username, block_start",
        )
        want = [
            (user, start, n, timedelta(hours=5))
            for user, ts in sorted(times.items())
            for start, n in reference_blocks(ts)
        ]
        assert [(u, s.astimezone(UTC), n, d) for u, s, n, d in got] == want


class _tmp:
    """A temporary folder per hypothesis example (a pytest fixture is one per test)."""

    def __enter__(self) -> Path:
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        return Path(self._dir.name)

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()


def test_block_is_active_until_five_hours_after_its_last_request(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    write_session(tmp_path / "data", "alice/s.jsonl", [request_line(now - timedelta(minutes=5), 1)])
    write_session(tmp_path / "data", "bob/s.jsonl", [request_line(now - timedelta(hours=6), 2)])
    run_direct(UsageProcessor(), tmp_path / "data", tmp_path / "s.duckdb", max_attempts=1)
    assert rows(
        tmp_path / "s.duckdb", "SELECT username, is_active FROM usage_blocks ORDER BY 1"
    ) == [
        ("alice", True),
        ("bob", False),
    ]


# --- the command -------------------------------------------------------------------------------


def test_report_daily_table(sample_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = report(sample_db, "report", "daily", "--timezone", "UTC", capsys=capsys)
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["Date", "Models", "Users", "Sessions", "Requests"]
    assert lines[2].startswith("2026-11-03  sonnet-4-5 ")
    assert lines[2].split()[-6:] == ["116", "2,142", "12,195", "247,274", "261,727", "$0.15"]
    assert lines[-1].split() == [
        "Total", "3", "6", "48", "336", "5,616", "46,066", "648,064", "700,082", "$0.50",
    ]  # fmt: skip
    assert "*" not in out  # every request priced


def test_report_json_totals_and_filters(
    sample_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = json.loads(report(sample_db, "report", "daily", "--json", capsys=capsys))
    assert doc["totals"]["totalTokens"] == 700_082 and doc["totals"]["requests"] == 48
    assert sum(d["totalCost"] for d in doc["daily"]) == pytest.approx(doc["totals"]["totalCost"])
    doc = json.loads(
        report(
            sample_db,
            "report",
            "daily",
            "--json",
            "--user",
            "bob",
            "--model",
            "OPUS",
            "--since",
            "2026-11-11",
            "--until",
            "2026-11-12",
            capsys=capsys,
        )
    )
    assert [(d["date"], d["requests"]) for d in doc["daily"]] == [("2026-11-12", 8)]
    monthly = json.loads(report(sample_db, "report", "monthly", "--json", capsys=capsys))
    assert [m["month"] for m in monthly["monthly"]] == ["2026-11"]


def test_report_days_follow_the_time_zone(
    sample_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # carol's 2026-11-24 08:50 UTC session is still the 23rd in Honolulu (UTC-10)
    doc = json.loads(
        report(
            sample_db,
            "report",
            "daily",
            "--json",
            "--user",
            "carol",
            "--timezone",
            "Pacific/Honolulu",
            capsys=capsys,
        )
    )
    assert [d["date"] for d in doc["daily"]] == ["2026-11-17", "2026-11-23"]
    doc = json.loads(
        report(
            sample_db,
            "report",
            "daily",
            "--json",
            "--timezone",
            "Pacific/Honolulu",
            "--until",
            "2026-11-23",
            "--since",
            "2026-11-23",
            capsys=capsys,
        )
    )
    assert [d["requests"] for d in doc["daily"]] == [6]


def test_report_other_kinds(sample_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sessions = json.loads(report(sample_db, "report", "sessions", "--json", capsys=capsys))
    assert len(sessions["sessions"]) == 6 and sessions["totals"]["requests"] == 48
    bob2 = next(s for s in sessions["sessions"] if s["sessionId"].startswith("5a9e3c71"))
    assert bob2["requests"] == 11 and len(bob2["modelsUsed"]) == 2  # with its subagent
    blocks = json.loads(report(sample_db, "report", "blocks", "--json", capsys=capsys))
    assert [b["startTime"][:16] for b in blocks["blocks"]][:2] == [
        "2026-11-03T09:00",
        "2026-11-03T14:00",
    ]
    blocks = json.loads(
        report(sample_db, "report", "blocks", "--json", "--user", "carol", capsys=capsys)
    )
    assert blocks["totals"] == {**blocks["totals"], "blocks": 2, "requests": 15}
    tools = report(sample_db, "report", "tools", "--csv", capsys=capsys).splitlines()
    assert tools[0].startswith("type,name,calls,errors,errorRate")
    assert "tool,Bash,9,1,0.1111,3,6," in "\n".join(tools)


def test_partial_cost_is_marked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = request_line(datetime(2026, 11, 2, 10, tzinfo=UTC), 1)
    other = request_line(datetime(2026, 11, 2, 11, tzinfo=UTC), 2)
    other["message"]["model"] = "acme-large"  # no price
    write_session(tmp_path / "data", "alice/s.jsonl", [line, other])
    run_direct(UsageProcessor(), tmp_path / "data", tmp_path / "s.duckdb", max_attempts=1)
    out = report(tmp_path / "s.duckdb", "report", "daily", "--timezone", "UTC", capsys=capsys)
    assert out.splitlines()[2].endswith("$0.00*")
    assert out.splitlines()[-1].startswith("* partial: 1 request(s) of models without a price")


def test_mistakes_are_one_line(
    tmp_path: Path, sample_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, said in [
        (["report", "daily", "--db", str(tmp_path / "none.duckdb")], "no state yet at"),
        (["report", "daily", "--db", str(sample_db), "--timezone", "Mars/Base"], "time zone"),
        (["report", "blocks", "--db", str(sample_db), "--model", "opus"], "--model does not"),
        (
            [
                "report",
                "daily",
                "--db",
                str(sample_db),
                "--since",
                "2026-12-01",
                "--until",
                "2026-11-01",
            ],
            "is after",
        ),
    ]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        main(["report", "daily", "--since", "yesterday"])
    assert exit_.value.code == 2
    assert not (tmp_path / "none.duckdb").exists()


def test_report_reads_while_a_writer_holds_the_file_then_says_so(sample_db: Path) -> None:
    """Another process holding the state for writing: the report waits briefly, then one
    line (a fresh process, as a user runs it: this one already has the file attached)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys, time; c = duckdb.connect({str(sample_db)!r}); "
            "print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = subprocess.run(
            [sys.executable, "-m", "flows.report", "report", "daily", "--db", str(sample_db)],
            capture_output=True,
            text=True,
            env={**_env(), "SESSION_PIPELINE_DB_LOCK_TIMEOUT": "1"},
        )
    finally:
        holder.communicate("")
    assert done.returncode == 1 and done.stdout == ""
    assert "stayed locked by another process" in done.stderr
    assert done.stderr.count("\n") == 1


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_report_never_imports_prefect(sample_db: Path) -> None:
    code = (
        "import sys; from flows.report import main; "
        f"main(['report', 'blocks', '--db', {str(sample_db)!r}]); "
        "main(['report', 'tools', '--db', " + repr(str(sample_db)) + "]); "
        "assert not any(m.startswith('prefect') for m in sys.modules), 'prefect imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_register_adds_both_commands() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    functions = register(commands)
    assert set(functions) == {"report", "export"}
    args = parser.parse_args(["report", "tools", "--json", "--data-dir", "d", "--db", "x"])
    assert (args.kind, args.json, args.db) == ("tools", True, "x")


# --- ccusage -----------------------------------------------------------------------------------


def test_daily_totals_equal_ccusage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a corpus whose streamed lines all carry their requestId, `report daily --json`
    has ccusage's totals: tokens exactly, cost to the cent (and per day and model). Small
    sessions: no request reaches the long-context tier ccusage prices differently."""
    from bench.corpus import corpus
    from bench.peers import Unavailable, ccusage_daily

    sample = corpus(30, max_bytes=200_000, log=lambda *_: None)
    try:
        _, theirs = ccusage_daily(sample.path)
    except Unavailable as why:
        pytest.skip(str(why))
    db = tmp_path / "state.duckdb"
    assert run_direct(UsageProcessor(), sample.path, db, max_attempts=1).errors == 0
    assert rows(
        db,
        "SELECT count(*) FROM usage_requests WHERE input_tokens + cache_creation_input_tokens"
        " + cache_read_input_tokens > 200000",
    ) == [(0,)]
    ours = json.loads(report(db, "report", "daily", "--json", "--timezone", "UTC", capsys=capsys))
    tokens = ("inputTokens", "outputTokens", "cacheCreationTokens", "cacheReadTokens")
    for key in (*tokens, "totalTokens"):
        assert ours["totals"][key] == theirs["totals"][key], key
    assert round(ours["totals"]["totalCost"], 2) == round(theirs["totals"]["totalCost"], 2)
    theirs_days = {d.get("period", d.get("date")): d for d in theirs["daily"]}
    assert sorted(theirs_days) == [d["date"] for d in ours["daily"]]
    for day in ours["daily"]:
        for mine in day["modelBreakdowns"]:
            (other,) = [
                m
                for m in theirs_days[day["date"]]["modelBreakdowns"]
                if m["modelName"] == mine["modelName"]
            ]
            assert [mine[k] for k in tokens] == [other[k] for k in tokens]
            assert mine["cost"] == pytest.approx(other["cost"], abs=1e-9)


@pytest.mark.parametrize("filters", [(), ("--user", "bob"), ("--user", "nobody")])
def test_sessions_json_made_in_sql_is_the_records_python_makes(
    sample_db: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    """`report sessions --json` is built by DuckDB (fast on 100k sessions): the same records
    and totals the table and CSV are made from."""
    from flows import report as report_module
    from processors import usage_reports as sql

    document = json.loads(
        report(sample_db, "report", "sessions", "--json", *filters, capsys=capsys)
    )
    with connect(sample_db, read_only=True) as con:
        where = "username = ?" if filters and filters[0] == "--user" else ""
        params = [filters[1]] if where else []
        rows = report_module._dicts(con, sql.report_sessions_sql("UTC", where), params)
    expected = [
        {
            "sessionId": s["session"],
            "username": s["username"],
            "firstActivity": s["first_request_at"],
            "lastActivity": s["last_request_at"],
            "modelsUsed": s["models"] or [],
            "requests": int(s["requests"]),
            **report_module._token_record(s),
        }
        for s in rows
    ]
    assert document["sessions"] == [
        {**e, "totalCost": pytest.approx(e["totalCost"], rel=1e-12)} for e in expected
    ]
    if expected:
        total = report_module._sums(rows)
        assert document["totals"] == {
            "sessions": len(rows),
            "requests": total["requests"],
            **report_module._token_record(total),
            "totalCost": pytest.approx(total["cost_usd"], rel=1e-12),
        }
    else:
        assert "totals" not in document


@pytest.mark.parametrize("filters", [(), ("--user", "carol"), ("--since", "2026-11-10")])
def test_blocks_json_made_in_sql_is_the_records_python_makes(
    sample_db: Path, capsys: pytest.CaptureFixture[str], filters: tuple[str, ...]
) -> None:
    """`report blocks --json` is built by DuckDB, its times in UTC: the same blocks, figures
    and totals as the CSV (made in Python from the same query)."""
    import csv
    import io

    document = json.loads(
        report(
            sample_db, "report", "blocks", "--json", "--timezone", "UTC", *filters, capsys=capsys
        )
    )
    table = list(
        csv.DictReader(
            io.StringIO(
                report(
                    sample_db,
                    "report",
                    "blocks",
                    "--csv",
                    "--timezone",
                    "UTC",
                    *filters,
                    capsys=capsys,
                )
            )
        )
    )
    assert len(document["blocks"]) == len(table) > 0
    for got, want in zip(document["blocks"], table, strict=True):
        for name in ("startTime", "endTime", "actualEndTime"):
            assert datetime.fromisoformat(got[name]) == datetime.fromisoformat(want[name])
        assert got["username"] == want["username"]
        assert got["isActive"] == (want["isActive"] == "True")
        for name in ("requests", "inputTokens", "outputTokens", "cacheReadTokens", "totalTokens"):
            assert got[name] == int(want[name])
        assert got["totalCost"] == pytest.approx(float(want["totalCost"]), rel=1e-12)
    assert document["totals"]["blocks"] == len(table)
    assert document["totals"]["requests"] == sum(int(b["requests"]) for b in table)
