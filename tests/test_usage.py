"""Usage processor on transcripts in the real Claude Code shape (see tests/transcripts.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from processors.base import Processor, ProcessResult, Table
from processors.session import Session
from processors.usage import UsageProcessor
from tests.transcripts import (
    SONNET,
    Transcript,
    text,
    thinking,
    tool_use,
    usage,
)

SID = "7f3c2a9e-5b1d-4e8a-9c6f-2d4b8e1a3c5f"
KEY = f"alice/{SID}.jsonl"


def process(path: Path, key: str = KEY) -> ProcessResult:
    with Session.open(path, key=key) as session:
        return UsageProcessor().process(session)


def run(transcript: Transcript, tmp_path: Path, key: str = KEY) -> ProcessResult:
    return process(transcript.write(tmp_path / key), key)


def events(result: ProcessResult) -> list[dict[str, Any]]:
    return [dict(row) for row in result.rows["usage_events"]]


def priced(result: ProcessResult) -> duckdb.DuckDBPyConnection:
    """The result's rows in a DuckDB of their own, with the processor's views (costs are
    priced by SQL, not by the processor)."""
    con = duckdb.connect()
    processor = UsageProcessor()
    for table in processor.tables:
        con.execute(table.ddl)
        rows = result.rows.get(table.name, [])
        if rows:
            names = table.column_names
            con.executemany(
                f"INSERT INTO {table.name} VALUES ({', '.join('?' * len(names))})",
                [[row.get(name) for name in names] for row in rows],
            )
    for view in processor.views:
        con.execute(view)
    return con


def requests(result: ProcessResult) -> list[dict[str, Any]]:
    """The processor's request rows, each with its cost from the `usage_requests` view."""
    costs = dict(
        ((m, r), cost)
        for m, r, cost in priced(result)
        .execute("SELECT message_id, request_id, cost_usd FROM usage_requests")
        .fetchall()
    )
    return [
        {**row, "cost_usd": costs[(row["message_id"], row["request_id"])]}
        for row in result.rows["usage_requests_raw"]
    ]


def summary(result: ProcessResult) -> dict[str, Any]:
    """The processor's summary row with its cost and unpriced requests from the view."""
    (row,) = result.rows["usage_sessions_raw"]
    ((cost, unpriced),) = (
        priced(result).execute("SELECT cost_usd, unpriced_requests FROM usage_sessions").fetchall()
    )
    return {**row, "cost_usd": cost, "unpriced_requests": unpriced}


def test_processor_shape() -> None:
    processor = UsageProcessor()
    assert isinstance(processor, Processor)
    assert (processor.name, processor.version, processor.cadence_seconds) == ("usage", "3", 600)
    assert [t.name for t in processor.tables] == [
        "usage_events",
        "usage_requests_raw",
        "usage_sessions_raw",
    ]
    assert all(isinstance(t, Table) for t in processor.tables)
    assert [view.split("(", 1)[0].split(" AS", 1)[0].split()[-1] for view in processor.views] == [
        "usage_price_overrides",
        "usage_prices",
        "usage_requests",
        "usage_request_copies",
        "usage_requests_unique",
        "usage_sessions",
        "usage_rollup_archive",
        "usage_retention",
        "usage_daily",
        "usage_monthly",
        "usage_blocks",
        "usage_tools",
    ]


def test_streamed_response_counts_tokens_once_from_the_complete_line(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("Fix the failing checkout test")
    t.response(
        [
            thinking("The test fails because …"),
            text("Let me look at the test."),
            tool_use("toolu_01A", "Read", {"file_path": "/home/alice/src/shop/test_checkout.py"}),
            tool_use("toolu_01B", "Bash", {"command": "pytest -q tests/test_checkout.py"}),
        ],
        final_usage=usage(input_tokens=4, output_tokens=420, cache_write=1200, cache_read=15000),
        stop_reason="tool_use",
    )
    result = run(t, tmp_path)

    (request,) = requests(result)
    assert request["output_tokens"] == 420  # not the placeholder 1, not 1+1+1+420
    assert request["input_tokens"] == 4
    assert request["cache_creation_input_tokens"] == 1200
    assert request["cache_read_input_tokens"] == 15000
    assert request["cache_creation_5m_input_tokens"] == 1200
    assert request["cache_creation_1h_input_tokens"] == 0
    assert request["stop_reason"] == "tool_use"
    assert request["model"] == SONNET
    assert request["service_tier"] == "standard"
    assert request["request_id"].startswith("req_")
    assert request["message_id"].startswith("msg_")
    # Sonnet 4.5: 4×3 + 420×15 + 1200×3.75 + 15000×0.30 = 15312 USD per million tokens.
    assert request["cost_usd"] == pytest.approx(0.015312)
    assert request["occurred_at"] == "2025-09-01T10:00:08+00:00"  # the response's first line
    assert [e["tool_use_id"] for e in events(result)] == ["toolu_01A", "toolu_01B"]
    assert result.items == 3
    assert summary(result)["output_tokens"] == 420
    assert summary(result)["assistant_messages"] == 1


def test_complete_line_wins_even_when_a_later_copy_is_partial(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("hello")
    lines = t.response([text("Hi!")], final_usage=usage(output_tokens=90))
    partial = orjson.loads(orjson.dumps(lines[0]))
    partial["message"]["stop_reason"] = None
    partial["message"]["usage"]["output_tokens"] = 1
    t.other(partial)
    (request,) = requests(run(t, tmp_path))
    assert (request["stop_reason"], request["output_tokens"]) == ("end_turn", 90)


def test_tool_calls_split_over_lines_are_neither_dropped_nor_doubled(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("Rename the module")
    lines = t.response(
        [
            tool_use("toolu_1", "Grep", {"pattern": "old_name"}),
            tool_use("toolu_2", "Edit", {"file_path": "a.py"}),
            tool_use("toolu_3", "Edit", {"file_path": "b.py"}),
        ],
        stop_reason="tool_use",
    )
    # Some writers repeat earlier blocks on later lines of the same response.
    lines[2]["message"]["content"] = [
        lines[1]["message"]["content"][0],
        tool_use("toolu_3", "Edit"),
    ]
    result = run(t, tmp_path)
    assert [e["tool_use_id"] for e in events(result)] == ["toolu_1", "toolu_2", "toolu_3"]
    assert {e["message_id"] for e in events(result)} == {lines[0]["message"]["id"]}
    assert len(requests(result)) == 1
    row = summary(result)
    assert (row["tool_calls"], row["distinct_tools"]) == (3, 2)


def test_classifies_skills_subagents_mcp_and_slash_commands(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.slash_command("review-pr", "123 --strict")
    t.user([text("<command-name>/compact</command-name>\n<command-args></command-args>")])
    t.response(
        [
            tool_use("toolu_s1", "Skill", {"skill": "superpowers:brainstorming"}),
            tool_use("toolu_s2", "Skill", {"name": "pdf"}),
            tool_use("toolu_t1", "Task", {"subagent_type": "Explore", "prompt": "find it"}),
            tool_use("toolu_t2", "Agent", {"subagent_type": "code-reviewer"}),
            tool_use("toolu_m1", "mcp__github__create_issue", {"title": "x"}),
            tool_use("toolu_m2", "mcp__plugin_context7_context7__resolve-library-id", {}),
            tool_use("toolu_b1", "Bash", {"command": "ls"}),
        ],
        stop_reason="tool_use",
    )
    result = run(t, tmp_path)
    found = {e["tool_use_id"] or e["command_name"]: e for e in events(result)}

    def pick(key: str, *columns: str) -> tuple[Any, ...]:
        return tuple(found[key][c] for c in columns)

    assert pick("review-pr", "event_type", "command_name", "command_args", "tool_name") == (
        "slash_command",
        "review-pr",
        "123 --strict",
        None,
    )
    assert pick("compact", "event_type", "command_args") == ("slash_command", None)
    assert pick("toolu_s1", "event_type", "skill_name") == ("skill", "superpowers:brainstorming")
    assert pick("toolu_s2", "event_type", "skill_name") == ("skill", "pdf")
    assert pick("toolu_t1", "event_type", "subagent_type", "tool_name") == (
        "subagent",
        "Explore",
        "Task",
    )
    assert pick("toolu_t2", "event_type", "subagent_type") == ("subagent", "code-reviewer")
    assert pick("toolu_m1", "event_type", "mcp_server", "mcp_tool", "mcp_plugin") == (
        "mcp",
        "github",
        "create_issue",
        None,
    )
    assert pick("toolu_m2", "event_type", "mcp_server", "mcp_tool", "mcp_plugin") == (
        "mcp",
        "context7",
        "resolve-library-id",
        "context7",
    )
    assert pick("toolu_b1", "event_type", "tool_name", "skill_name") == ("tool", "Bash", None)
    row = summary(result)
    assert (row["skill_calls"], row["subagent_calls"], row["mcp_calls"]) == (2, 2, 2)
    assert (row["slash_commands"], row["tool_calls"], row["distinct_skills"]) == (2, 7, 2)


def test_slash_commands_need_the_command_tag(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("/review the diff please")  # a leading slash is not how real files mark commands
    t.response([tool_use("toolu_r", "Read", {"file_path": "notes.md"})], stop_reason="tool_use")
    t.user([{"type": "tool_result", "tool_use_id": "toolu_r", "content": "<command-name>/x"}])
    assert [e["event_type"] for e in events(run(t, tmp_path))] == ["tool"]


def test_is_error_comes_from_the_matching_tool_result(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("run the tests")
    t.response(
        [
            tool_use("toolu_fail", "Bash", {"command": "pytest"}),
            tool_use("toolu_ok", "Bash", {"command": "ls"}),
            tool_use("toolu_pending", "Bash", {"command": "sleep 100"}),
        ],
        stop_reason="tool_use",
    )
    t.tool_result("toolu_fail", is_error=True)
    t.tool_result("toolu_ok")
    result = run(t, tmp_path)
    assert {e["tool_use_id"]: e["is_error"] for e in events(result)} == {
        "toolu_fail": True,
        "toolu_ok": False,
        "toolu_pending": None,
    }
    row = summary(result)
    assert (row["tool_errors"], row["user_messages"]) == (1, 1)  # tool results are not turns


def test_requests_without_request_id_dedupe_on_message_id(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("hi")
    t.response([thinking("…"), text("Hello")], request_id=None, final_usage=usage(output_tokens=7))
    t.user("again")
    t.response([text("Hello again")], request_id=None, final_usage=usage(output_tokens=9))
    rows = requests(run(t, tmp_path))
    assert [(r["request_id"], r["output_tokens"]) for r in rows] == [(None, 7), (None, 9)]


def test_synthetic_api_errors_are_not_requests(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("hi")
    t.api_error()
    t.api_error()
    t.response([text("Hello")])
    result = run(t, tmp_path)
    assert [r["model"] for r in requests(result)] == [SONNET]
    row = summary(result)
    assert (row["primary_model"], row["assistant_messages"], row["lines"]) == (SONNET, 1, 4)


def test_subagent_file_with_meta(tmp_path: Path) -> None:
    key = f"alice/{SID}/subagents/agent-a4f91c2.jsonl"
    t = Transcript(SID, agent_id="a4f91c2", is_sidechain=True)
    t.user("Find where the checkout total is computed")  # the parent's prompt, not a human
    t.response([tool_use("toolu_g", "Grep", {"pattern": "total"})], stop_reason="tool_use")
    t.tool_result("toolu_g")
    t.response([text("It is in cart.py")])
    path = t.write(tmp_path / key)
    meta = {"agentType": "Explore", "description": "Find total", "toolUseId": "toolu_t1"}
    (path.parent / "agent-a4f91c2.meta.json").write_bytes(orjson.dumps(meta))
    result = process(path, key)

    row = summary(result)
    assert (row["session_id"], row["agent_id"], row["is_subagent"]) == (SID, "a4f91c2", True)
    assert (row["agent_type"], row["user_messages"], row["assistant_messages"]) == (
        "Explore",
        0,
        2,
    )
    (event,) = events(result)
    assert (event["session_id"], event["agent_id"], event["is_sidechain"]) == (
        SID,
        "a4f91c2",
        True,
    )
    assert all(r["is_sidechain"] and r["agent_id"] == "a4f91c2" for r in requests(result))


@pytest.mark.parametrize("meta", [None, b"{not json", b"[1, 2]", b'{"agentType": 7}'])
def test_subagent_meta_missing_or_malformed(tmp_path: Path, meta: bytes | None) -> None:
    key = f"alice/{SID}/subagents/agent-b1.jsonl"
    t = Transcript(SID, agent_id="b1", is_sidechain=True)
    t.response([text("done")])
    path = t.write(tmp_path / key)
    if meta is not None:
        (path.parent / "agent-b1.meta.json").write_bytes(meta)
    row = summary(process(path, key))
    assert (row["agent_type"], row["is_subagent"], row["assistant_messages"]) == (None, True, 1)


def test_older_subagent_file_beside_the_session_takes_session_id_from_lines(
    tmp_path: Path,
) -> None:
    key = "alice/agent-c9.jsonl"
    t = Transcript(SID, agent_id="c9", is_sidechain=True)
    t.response([text("done")])
    row = summary(run(t, tmp_path, key))
    assert (row["session_id"], row["agent_id"], row["is_subagent"]) == (SID, "c9", True)


def test_empty_and_all_malformed_files_still_get_one_session_row(tmp_path: Path) -> None:
    empty = tmp_path / "alice" / "empty.jsonl"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    broken = tmp_path / "alice" / "broken.jsonl"
    broken.write_bytes(b'{"type": "user", "mess\n[1, 2]\n"just a string"\n')
    for path, malformed in ((empty, 0), (broken, 3)):
        result = process(path, f"alice/{path.name}")
        row = summary(result)
        assert (row["lines"], row["malformed_lines"], row["assistant_messages"]) == (
            0,
            malformed,
            0,
        )
        assert (row["session_id"], row["started_at"], row["cost_usd"]) == (path.stem, None, None)
        assert (row["input_tokens"], row["active_seconds"], result.items) == (0, 0.0, 0)


def test_wrong_typed_fields_never_raise(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("start")
    t.other({"type": "assistant", "message": "not a dict", "timestamp": 12345})
    t.other({"type": "assistant", "message": {"id": 5, "content": 7, "usage": [1]}})
    t.other({"type": "user", "message": {"content": 42}, "timestamp": "yesterday"})
    t.other({"type": "user", "message": {"content": [1, None, "x", {"type": 3}]}})
    t.other({"type": "user", "message": None, "isSidechain": "yes"})
    t.other({"type": 17, "message": {}})
    t.other({"type": "assistant", "requestId": 99, "message": {"id": "msg_x", "model": 3}})
    t.other(
        {
            "type": "assistant",
            "requestId": "req_strings",
            "timestamp": "2025-09-01T10:00:09Z",
            "isSidechain": "yes",
            "message": {
                "id": "msg_strings",
                "model": SONNET,
                "stop_reason": 5,
                "content": [
                    "a bare string",
                    {"type": "tool_use", "id": "toolu_noname", "name": 42, "input": []},
                    {"type": "tool_use", "id": "toolu_list_input", "name": "Skill", "input": []},
                    {"type": "tool_use", "id": 8, "name": "mcp__", "input": None},
                ],
                "usage": {
                    "input_tokens": "120",
                    "output_tokens": None,
                    "cache_creation_input_tokens": -5,
                    "cache_read_input_tokens": 1.5,
                    "cache_creation": [1, 2],
                    "service_tier": {"x": 1},
                },
            },
        }
    )
    t.other({"type": "assistant", "message": {"id": "msg_no_usage", "model": SONNET}})
    t.other({"type": "summary", "summary": "Checkout fix", "leafUuid": "uuid-1"})
    t.other({"type": "queue-operation", "operation": "enqueue", "timestamp": None})
    t.other({"type": "brand-new-type", "timestamp": "2025-09-01T10:00:20+02:00"})
    result = run(t, tmp_path)

    by_message = {r["message_id"]: r for r in requests(result)}
    strings = by_message["msg_strings"]
    assert (strings["input_tokens"], strings["output_tokens"]) == (120, None)
    assert (strings["cache_creation_input_tokens"], strings["cache_read_input_tokens"]) == (
        None,
        None,
    )
    assert (strings["stop_reason"], strings["service_tier"], strings["is_sidechain"]) == (
        None,
        None,
        False,
    )
    assert strings["cost_usd"] == pytest.approx(120 * 3 / 1e6)
    assert by_message["msg_no_usage"]["cost_usd"] is None
    assert by_message["msg_x"]["request_id"] is None and by_message["msg_x"]["model"] is None
    assert [(e["event_type"], e["tool_use_id"]) for e in events(result)] == [
        ("skill", "toolu_list_input"),
        ("mcp", None),
    ]
    row = summary(result)
    assert (row["lines"], row["user_messages"], row["malformed_lines"]) == (13, 1, 0)
    # "+02:00" is 08:00:20Z: earlier than the first line, so it extends started_at.
    assert row["started_at"] == "2025-09-01T08:00:20+00:00"
    assert row["ended_at"] == "2025-09-01T10:00:09+00:00"


def test_unknown_model_has_no_cost(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("hi")
    t.response([text("Hello")], model="gpt-4o-mini")
    result = run(t, tmp_path)
    (request,) = requests(result)
    assert request["cost_usd"] is None
    assert summary(result)["cost_usd"] is None

    t.user("and now")
    t.response([text("Hi")], model="claude-haiku-4-5-20251001", final_usage=usage(10, 20, 0, 0))
    result = run(t, tmp_path)
    assert [r["cost_usd"] for r in requests(result)] == [None, pytest.approx(110 / 1e6)]
    assert summary(result)["cost_usd"] == pytest.approx(110 / 1e6)  # known costs only


def test_one_hour_cache_writes_are_priced_at_the_one_hour_rate(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.response(
        [text("ok")],
        model="claude-opus-4-1-20250805",
        final_usage=usage(
            input_tokens=0, output_tokens=0, cache_write=1000, cache_read=0, cache_write_1h=400
        ),
    )
    unsplit = t.response([text("ok")], model="claude-opus-4-1-20250805")
    del unsplit[0]["message"]["usage"]["cache_creation"]
    split, plain = requests(run(t, tmp_path))
    assert (split["cache_creation_5m_input_tokens"], split["cache_creation_1h_input_tokens"]) == (
        600,
        400,
    )
    assert split["cost_usd"] == pytest.approx((600 * 18.75 + 400 * 30) / 1e6)
    assert plain["cache_creation_5m_input_tokens"] is None  # no split reported: raw stays NULL
    # …and all 1200 cache-write tokens are priced at the 5m rate.
    assert plain["cost_usd"] == pytest.approx(
        (4 * 15 + 350 * 75 + 1200 * 18.75 + 15000 * 1.5) / 1e6
    )


def test_session_summary_numbers(tmp_path: Path) -> None:
    t = Transcript(SID, git_branch="feature/checkout", version="2.0.14")
    t.other({"type": "summary", "summary": "Earlier work", "leafUuid": "uuid-0"})
    t.user("Fix the failing checkout test", advance=0)  # 10:00:00
    t.user("Caveat: local command output follows", isMeta=True, advance=1)  # 10:00:01
    t.response(  # 10:00:04, 10:00:04.4, 10:00:04.8
        [
            text("Reading the test."),
            tool_use("toolu_r", "Read", {"file_path": "test_checkout.py"}),
            tool_use("toolu_s", "Skill", {"skill": "tdd"}),
        ],
        final_usage=usage(input_tokens=10, output_tokens=200, cache_write=1000, cache_read=5000),
        stop_reason="tool_use",
    )
    t.tool_result("toolu_r", advance=2.2)  # 10:00:07
    t.tool_result("toolu_s", is_error=True, advance=3)  # 10:00:10
    t.api_error(advance=1)  # 10:00:11
    t.user("<local-command-stdout>Total cost: $0.01</local-command-stdout>", advance=1)
    t.user("Also add a regression test", advance=600)  # 10:10:12, an idle gap
    t.response(  # 10:10:15, 10:10:15.4
        [
            tool_use("toolu_m", "mcp__linear__create_issue", {"title": "checkout"}),
            text("Done."),
        ],
        model="claude-opus-4-5-20251101",
        final_usage=usage(input_tokens=20, output_tokens=100, cache_write=0, cache_read=8000),
    )
    t.slash_command("commit", advance=4.6)  # 10:10:20
    t.other({"type": "system", "subtype": "turn_duration", "timestamp": "2025-09-01T10:10:30Z"})
    row = summary(run(t, tmp_path))

    sonnet_cost = (10 * 3 + 200 * 15 + 1000 * 3.75 + 5000 * 0.3) / 1e6
    opus_cost = (20 * 5 + 100 * 25 + 8000 * 0.5) / 1e6
    assert row.pop("cost_usd") == pytest.approx(sonnet_cost + opus_cost)
    assert row.pop("active_seconds") == pytest.approx(12 + 18)  # the 10-minute gap is idle
    assert row == {
        "session_file": KEY,
        "username": "alice",
        "session_id": SID,
        "agent_id": None,
        "is_subagent": False,
        "agent_type": None,
        "started_at": "2025-09-01T10:00:00+00:00",
        "ended_at": "2025-09-01T10:10:30+00:00",
        "user_messages": 3,  # two typed messages and the typed /commit
        "assistant_messages": 2,
        "lines": 15,
        "malformed_lines": 0,
        "tool_calls": 3,
        "tool_errors": 1,
        "skill_calls": 1,
        "subagent_calls": 0,
        "mcp_calls": 1,
        "slash_commands": 1,
        "distinct_tools": 3,
        "distinct_skills": 1,
        "primary_model": SONNET,  # a tie is broken by the first model seen
        "input_tokens": 30,
        "output_tokens": 300,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 13000,
        "unpriced_requests": 0,
        "workflow_id": None,
        "cwd": "/home/alice/src/shop",
        "git_branch": "feature/checkout",
        "claude_version": "2.0.14",
    }


def test_malformed_lines_are_counted_and_the_rest_still_processed(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("hi")
    t.raw('{"type": "assistant", "message": {"id": "msg_trunc')
    t.response([text("Hello")])
    row = summary(run(t, tmp_path))
    assert (row["lines"], row["malformed_lines"], row["assistant_messages"]) == (2, 1, 1)


def _insert(con: duckdb.DuckDBPyConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    columns = table.column_names
    if not rows:
        return
    con.executemany(
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})",
        [[row.get(c) for c in columns] for row in rows],
    )


def test_view_dedupes_requests_copied_into_a_resumed_session(tmp_path: Path) -> None:
    original = Transcript(SID)
    original.user("Fix the test")
    first = original.response([text("On it.")], final_usage=usage(output_tokens=50))
    original.user("thanks")
    # A line of the next response was written just before the session ended: partial.
    partial = original.response(
        [text("…")], final_usage=usage(output_tokens=1), stop_reason="end_turn"
    )
    partial[0]["message"]["stop_reason"] = None

    resumed_sid = "0a1b2c3d-0000-4000-8000-000000000001"
    resumed = Transcript(resumed_sid, start="2025-09-02T09:00:00.000Z")
    for line in (*first, *partial):
        copied = orjson.loads(orjson.dumps(line))
        copied["message"]["stop_reason"] = "end_turn"
        copied["message"]["usage"]["output_tokens"] = 75 if line in partial else 50
        resumed.other(copied)
    resumed.user("continue")
    resumed.response([text("Continuing.")], final_usage=usage(output_tokens=30))

    processor = UsageProcessor()
    con = duckdb.connect()
    for table in processor.tables:
        con.execute(table.ddl)
    for view in processor.views:
        con.execute(view)
    for transcript, sid in ((original, SID), (resumed, resumed_sid)):
        key = f"alice/{sid}.jsonl"
        result = run(transcript, tmp_path, key)
        for table in processor.tables:
            _insert(con, table, list(result.rows[table.name]))
    # rows put in by hand: list the copies not kept from every request, as a new state does
    # (the pipeline keeps the list up to date as it writes; tests/test_request_copies.py)
    from processors.usage_reports import COPIES_DDL

    con.execute("DROP TABLE usage_request_copies")
    con.execute(COPIES_DDL)

    assert con.execute("SELECT count(*) FROM usage_requests").fetchone() == (5,)
    unique = con.execute(
        "SELECT message_id, session_file, output_tokens, stop_reason FROM usage_requests_unique "
        "ORDER BY occurred_at"
    ).fetchall()
    original_key, resumed_key = f"alice/{SID}.jsonl", f"alice/{resumed_sid}.jsonl"
    assert [(file, out, stop) for _, file, out, stop in unique] == [
        (min(original_key, resumed_key), 50, "end_turn"),  # identical: smallest session_file
        (resumed_key, 75, "end_turn"),  # the complete copy beats the partial original
        (resumed_key, 30, "end_turn"),
    ]
    assert len({message_id for message_id, *_ in unique}) == 3
    # Timestamps were cast on insert.
    (started,) = con.execute(
        "SELECT started_at FROM usage_sessions WHERE session_file = ?", [original_key]
    ).fetchone()
    assert started == datetime(2025, 9, 1, 10, 0, 5, tzinfo=UTC)
    assert con.execute("SELECT count(*) FROM usage_sessions").fetchone() == (2,)


def _mutations(value: Any) -> list[Any]:
    """Copies of a JSON value with one field at a time (at any depth) swapped for a wrong type."""
    wrong: list[Any] = [None, 7, -1, 2.5, "x", "", [], {}, True, [None], {"type": 1}]
    out: list[Any] = []
    if isinstance(value, dict):
        for key, child in value.items():
            for replacement in [*wrong, *_mutations(child)]:
                out.append({**value, key: replacement})
    elif isinstance(value, list):
        for index, child in enumerate(value):
            for replacement in [*wrong, *_mutations(child)]:
                out.append([*value[:index], replacement, *value[index + 1 :]])
    return out


def test_every_field_of_real_lines_with_a_wrong_type_never_raises(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.slash_command("review", "42")
    t.response(
        [
            text("ok"),
            tool_use("toolu_x", "mcp__plugin_p_s__t", {"a": 1}),
            tool_use("toolu_y", "Skill"),
        ],
        stop_reason="tool_use",
    )
    t.tool_result("toolu_x", is_error=True)
    t.api_error()
    originals = [line for line in t.lines if isinstance(line, dict)]
    fuzzed = Transcript(SID)
    for line in originals:
        for mutated in _mutations(line):
            fuzzed.other(mutated)
    result = run(fuzzed, tmp_path)
    assert len(fuzzed.lines) > 1000
    assert summary(result)["lines"] == len(fuzzed.lines)
    # Every row must survive insertion with its declared column types.
    con = duckdb.connect()
    for table in UsageProcessor().tables:
        con.execute(table.ddl)
        _insert(con, table, list(result.rows[table.name]))


def test_command_tags_quoted_by_the_model_are_not_typed_commands(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user(
        "This session is being continued from a previous conversation. Summary: the user ran "
        "<command-name>/review</command-name> …",
        isCompactSummary=True,
    )
    t.user("<command-name>/deploy</command-name>", isSidechain=True, agentId="a1")
    t.slash_command("review")
    result = run(t, tmp_path)
    assert [e["command_name"] for e in events(result)] == ["review"]
    assert summary(result)["user_messages"] == 1
