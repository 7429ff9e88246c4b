"""Append-only increments of the usage processor: wherever a file is split (between lines or
inside one, in two reads or many), continuing from the checkpoint and merging the returned rows
by table key gives exactly a whole read's rows."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest

from processors.base import AppendSafe, Row, Table, WholeReadNeeded, is_append_safe
from processors.session import Session
from processors.usage import UsageProcessor
from tests.conftest import EXAMPLES
from tests.test_usage import _mutations
from tests.transcripts import SONNET, Transcript, text, thinking, tool_use, usage

SID = "9d2e4f6a-1b3c-4d5e-8f70-a1b2c3d4e5f6"
PROCESSOR = UsageProcessor()
# Keeps no entry: every increment needs an entry it dropped (WholeReadNeeded).
FORGETFUL = UsageProcessor(keep_events=0, keep_requests=0)
TABLES: tuple[Table, ...] = PROCESSOR.tables
TRIALS = 30  # random splittings per file
WALK_READS = 100

Values = tuple[Any, ...]


def values(table: Table, row: Row) -> Values:
    return tuple(row[name] for name in table.column_names)


def key_of(table: Table, row: Row) -> Values:
    return tuple(row[name] for name in table.key)


def ordered(rows: Iterable[Values]) -> list[Values]:
    """Rows in a stable order (None beside str never compares, repr always does)."""
    return sorted(rows, key=repr)


def json_only(value: Any) -> bool:
    """Only what JSON has: no tuples, no non-str keys, no sets."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list):
        return all(json_only(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_only(v) for k, v in value.items())
    return False


@dataclass
class Read:
    """What one read returned, and the offset the next read continues from."""

    rows: dict[str, list[Row]]
    items: int
    checkpoint: Any
    complete_offset: int
    whole: bool = False  # the increment needed a whole read (WholeReadNeeded), which this is


def read(
    path: Path,
    key: str,
    start: int = 0,
    checkpoint: Any = None,
    processor: UsageProcessor = PROCESSOR,
) -> Read:
    """One read as the pipeline does it: an increment, or the whole file when the increment
    raises WholeReadNeeded."""
    handed_in = orjson.dumps(checkpoint)
    try:
        with Session.open(path, key=key, start=start) as session:
            increment = processor.process_increment(session, checkpoint)
            session.finish()
            offset = session.complete_offset
    except WholeReadNeeded:
        assert checkpoint is not None  # a whole read never needs one
        step = read(path, key, 0, None, processor)
        step.whole = True
        return step
    assert orjson.dumps(checkpoint) == handed_in  # pure: a retry can hand the same one again
    assert json_only(increment.checkpoint)
    # Through JSON and back, as the pipeline stores it.
    stored = orjson.loads(orjson.dumps(increment.checkpoint))
    assert stored == increment.checkpoint
    return Read(
        {name: list(rows) for name, rows in increment.rows.items()},
        increment.items,
        stored,
        offset,
    )


def whole(path: Path, key: str) -> tuple[dict[str, list[Values]], int]:
    with Session.open(path, key=key) as session:
        result = PROCESSOR.process(session)
    rows = {t.name: ordered(values(t, r) for r in result.rows[t.name]) for t in TABLES}
    for table in TABLES:  # merging by key needs keys unique within a file
        if table.key:
            keys = [key_of(table, r) for r in result.rows[table.name]]
            assert len(set(keys)) == len(keys), table.name
    return rows, result.items


def read_in_steps(
    data: bytes,
    cuts: Sequence[int],
    path: Path,
    key: str,
    processor: UsageProcessor = PROCESSOR,
    first: Any = None,
) -> tuple[dict[str, list[Values]], int, int, int]:
    """Write the file in pieces ending at each cut (then the rest), reading after each piece
    from where the last read stopped, the first from checkpoint `first`; merge rows by key (a
    whole read replaces them all). Returns rows, items, reads and how many of them had to be
    whole reads."""
    merged: dict[str, dict[Values, Values]] = {t.name: {} for t in TABLES}
    path.write_bytes(b"")
    written, start, checkpoint = 0, 0, first
    items = reads = wholes = 0
    for cut in [*cuts, len(data)]:
        with path.open("ab") as f:
            f.write(data[written:cut])
        written = cut
        step = read(path, key, start, checkpoint, processor)
        if step.whole:
            wholes += 1
            checkpoint = None
            merged = {t.name: {} for t in TABLES}
        for table in TABLES:
            returned = step.rows[table.name]
            if not table.key:
                if returned:  # an empty key: the table's rows for the file are replaced whole
                    merged[table.name] = {(i,): values(table, r) for i, r in enumerate(returned)}
                continue
            keys = [key_of(table, r) for r in returned]
            assert len(set(keys)) == len(keys), (table.name, cuts)
            for k, row in zip(keys, returned, strict=True):
                if checkpoint is not None:  # unchanged rows are never returned again
                    assert merged[table.name].get(k) != values(table, row), (table.name, k, cuts)
                merged[table.name][k] = values(table, row)
        assert len(step.rows["usage_sessions_raw"]) == 1
        start, checkpoint, items = step.complete_offset, step.checkpoint, step.items
        reads += 1
    return {name: ordered(rows.values()) for name, rows in merged.items()}, items, reads, wholes


def splittings(data: bytes, seed: str) -> list[list[int]]:
    """Random cut lists (1 to 4 cuts, anywhere: inside lines, on newlines, at 0 or the end),
    plus reading line by line, and line by line with each line split in half (on long files
    every k-th line, at most WALK_READS reads: each open hashes the prefix again)."""
    rng = random.Random(seed)
    size = len(data)
    cuts = [sorted(rng.sample(range(size + 1), rng.choice((1, 2, 2, 3, 4)))) for _ in range(TRIALS)]
    ends = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    ends = ends[:: max(1, len(ends) // WALK_READS)]
    cuts.append(ends)
    starts = [0, *ends]
    cuts.append(
        sorted({cut for a, b in zip(starts, ends, strict=False) for cut in (a + (b - a) // 2, b)})
    )
    return cuts


def assert_increments_match_whole(
    path: Path, key: str, seed: str, processor: UsageProcessor = PROCESSOR
) -> tuple[int, int]:
    """Every splitting gives the whole read's rows. Returns the reads, and how many of them
    had to read the file whole."""
    data = path.read_bytes()
    try:
        expected, expected_items = whole(path, key)
        reads = wholes = 0
        for cuts in splittings(data, seed):
            got, items, n, w = read_in_steps(data, cuts, path, key, processor)
            reads, wholes = reads + n, wholes + w
            for table in TABLES:
                assert got[table.name] == expected[table.name], (key, table.name, cuts)
            assert items == expected_items, (key, cuts)
        return reads, wholes
    finally:
        path.write_bytes(data)


# --- the samples ------------------------------------------------------------------------------


def sample_keys() -> list[str]:
    return sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.jsonl"))


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    root = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, root)
    return root


@pytest.mark.parametrize("key", sample_keys())
def test_samples_split_anywhere_give_the_whole_read(samples: Path, key: str) -> None:
    reads, wholes = assert_increments_match_whole(samples / key, key, seed=key)
    assert reads > 3 * TRIALS
    assert wholes == 0  # real transcripts only touch recent entries


@pytest.mark.parametrize(
    "key", sorted(sample_keys(), key=lambda k: (EXAMPLES / k).stat().st_size)[-3:]
)
def test_a_checkpoint_keeping_almost_nothing_still_gives_the_whole_read(
    samples: Path, key: str
) -> None:
    _, wholes = assert_increments_match_whole(samples / key, key, key, FORGETFUL)
    assert wholes > 0  # the fallback was taken, and gave the same rows


# --- synthetic transcripts --------------------------------------------------------------------


def tricky_transcript() -> Transcript:
    """Every kind of state that spans lines: streamed responses, late and early tool results,
    an error outcome arriving after a success, slash commands with missing and repeated uuids,
    a model filled in by a less complete line, timestamps out of order, a malformed line."""
    t = Transcript(SID, git_branch="feature/x", version="2.1.0")
    t.other({"type": "summary", "summary": "Earlier", "leafUuid": "uuid-0"})
    t.slash_command("review", "42 --strict", advance=0)
    t.user("Fix the failing checkout test")
    t.response(
        [
            thinking("The test fails because …"),
            text("Let me look."),
            tool_use("toolu_A", "Read", {"file_path": "test_checkout.py"}),
            tool_use("toolu_B", "Bash", {"command": "pytest -q"}),
            tool_use("toolu_S", "Skill", {"skill": "tdd"}),
        ],
        final_usage=usage(input_tokens=4, output_tokens=420, cache_write=1200, cache_read=15000),
        stop_reason="tool_use",
    )
    t.tool_result("toolu_A")
    t.tool_result("toolu_early", is_error=True)  # before its tool_use
    t.raw('{"type": "assistant", "message": {"id": "msg_trunc')
    lines = t.response(
        [
            tool_use("toolu_early", "mcp__plugin_linear_linear__list_issues", {}),
            tool_use("toolu_T", "Task", {"subagent_type": "Explore"}),
            {"type": "tool_use", "name": "Grep", "input": {}},  # no id: a fallback event_id
            {"type": "tool_use", "name": "Grep", "input": {}},
        ],
        stop_reason="tool_use",
    )
    # Writers repeat earlier blocks on later lines of the same response.
    lines[1]["message"]["content"] = [
        lines[0]["message"]["content"][0],
        tool_use("toolu_T", "Task"),
    ]
    t.tool_result("toolu_B", is_error=False)
    t.tool_result("toolu_B", is_error=True)  # a second outcome: the call failed after all
    t.tool_result("toolu_T")
    # No line of a response names its model; a less complete copy written later does.
    blank = t.response([text("a"), text("b")], final_usage=usage(output_tokens=77))
    for line in blank:
        del line["message"]["model"]
    late_copy = orjson.loads(orjson.dumps(blank[0]))
    late_copy["message"]["model"] = SONNET
    t.other(late_copy)
    # A repeated complete line: the same row, not a change.
    t.other(orjson.loads(orjson.dumps(blank[1])))
    # Slash commands: one without uuid, one whose uuid was already used.
    no_uuid = t.slash_command("compact")
    del no_uuid["uuid"]
    again = t.slash_command("commit", "-m x")
    again["uuid"] = t.lines[1]["uuid"]  # type: ignore[index]
    t.api_error()
    t.response([text("Hello")], request_id=None, final_usage=usage(output_tokens=9))
    t.response([text("Opus now")], model="claude-opus-4-5-20251101", final_usage=usage(1, 2, 0, 0))
    t.user("back after a break", advance=1800)  # an idle gap
    t.response([text("ok")], model="claude-opus-4-5-20251101")
    # Timestamps out of order: extend the first run, start a run, then bridge the two.
    for ts in ("2025-09-01T10:03:30Z", "2025-09-01T10:12:00Z", "2025-09-01T10:08:00Z"):
        t.other({"type": "system", "subtype": "turn_duration", "timestamp": ts})
    t.other({"type": "system", "timestamp": "2025-09-01T12:00:00+02:00"})  # equal to 10:00Z
    t.user("<command-name>/deploy</command-name>", isSidechain=True, agentId="a1")
    t.user("<local-command-stdout>done</local-command-stdout>")
    return t


def subagent_transcript() -> Transcript:
    t = Transcript(SID, agent_id="a4f91c2", is_sidechain=True)
    t.user("Find where the checkout total is computed")
    t.response([tool_use("toolu_g", "Grep", {"pattern": "total"})], stop_reason="tool_use")
    t.tool_result("toolu_g")
    t.response([text("It is in cart.py")], model="claude-haiku-4-5-20251001")
    return t


def fuzzed_transcript() -> Transcript:
    """Real lines with one field at a time swapped for a wrong type (1000+ lines)."""
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
    fuzzed = Transcript(SID)
    for line in [line for line in t.lines if isinstance(line, dict)]:
        for mutated in _mutations(line):
            fuzzed.other(mutated)
    return fuzzed


def write(t: Transcript, root: Path, key: str, tail: bytes = b"") -> Path:
    path = t.write(root / key)
    with path.open("ab") as f:
        f.write(tail)
    return path


def test_tricky_transcript_split_anywhere(tmp_path: Path) -> None:
    key = f"alice/{SID}.jsonl"
    path = write(tricky_transcript(), tmp_path, key, tail=b'{"type": "user", "message": {"con')
    assert_increments_match_whole(path, key, seed="tricky")
    # The tail is an append in progress: read by no one until its newline arrives.
    with Session.open(path, key=key) as session:
        row = PROCESSOR.process(session).rows["usage_sessions_raw"][0]
    assert (row["malformed_lines"], row["lines"], row["slash_commands"]) == (1, 34, 3)
    assert (row["tool_errors"], row["primary_model"]) == (2, SONNET)


def test_subagent_split_anywhere(tmp_path: Path) -> None:
    key = f"alice/{SID}/subagents/agent-a4f91c2.jsonl"
    path = write(subagent_transcript(), tmp_path, key)
    meta = {"agentType": "Explore", "toolUseId": "toolu_t1"}
    (path.parent / "agent-a4f91c2.meta.json").write_bytes(orjson.dumps(meta))
    assert_increments_match_whole(path, key, seed="subagent")


def test_fuzzed_lines_split_anywhere(tmp_path: Path) -> None:
    key = f"alice/{SID}.jsonl"
    path = write(fuzzed_transcript(), tmp_path, key)
    assert_increments_match_whole(path, key, seed="fuzz")


@pytest.mark.parametrize("make", [tricky_transcript, fuzzed_transcript])
def test_forgetful_checkpoints_split_anywhere(tmp_path: Path, make: Any) -> None:
    key = f"alice/{SID}.jsonl"
    path = write(make(), tmp_path, key)
    _, wholes = assert_increments_match_whole(path, key, "forgetful", FORGETFUL)
    assert wholes > 0


# --- what one increment returns ---------------------------------------------------------------


def test_contract_and_keys() -> None:
    assert is_append_safe(PROCESSOR) and isinstance(PROCESSOR, AppendSafe)
    keys = {t.name: t.key for t in TABLES}
    assert keys == {
        "usage_events": ("event_id",),
        "usage_requests_raw": ("message_id", "request_id"),
        "usage_sessions_raw": (),
    }


def test_an_increment_without_new_lines_returns_only_the_session_row(samples: Path) -> None:
    key = sample_keys()[0]
    path = samples / key
    first = read(path, key)
    with path.open("ab") as f:
        f.write(b'{"type": "user", "mess')  # an unfinished line is not a new line
    again = read(path, key, first.complete_offset, first.checkpoint)
    assert again.rows["usage_events"] == [] and again.rows["usage_requests_raw"] == []
    assert again.rows["usage_sessions_raw"] == first.rows["usage_sessions_raw"]
    assert (again.items, again.complete_offset) == (first.items, first.complete_offset)
    assert again.checkpoint == first.checkpoint


def test_checkpoint_of_the_largest_sample_is_small(samples: Path) -> None:
    path = max((samples / key for key in sample_keys()), key=lambda p: p.stat().st_size)
    step = read(path, path.relative_to(samples).as_posix())
    assert step.items > 20
    assert len(orjson.dumps(step.checkpoint)) < 64 * 1024
    assert len(orjson.dumps(step.checkpoint)) < path.stat().st_size / 4


def test_a_late_tool_result_returns_just_that_event_with_is_error(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("run the tests")
    t.response(
        [tool_use("toolu_fail", "Bash", {"command": "pytest"}), tool_use("toolu_ok", "Bash")],
        stop_reason="tool_use",
    )
    path = t.write(tmp_path / "alice" / "s.jsonl")
    first = read(path, "alice/s.jsonl")
    assert [e["is_error"] for e in first.rows["usage_events"]] == [None, None]
    t.lines.clear()
    t.tool_result("toolu_fail", is_error=True)
    with path.open("ab") as f:
        f.write(b"".join(orjson.dumps(line) + b"\n" for line in t.lines))  # type: ignore[arg-type]
    second = read(path, "alice/s.jsonl", first.complete_offset, first.checkpoint)
    (event,) = second.rows["usage_events"]
    assert (event["event_id"], event["tool_use_id"], event["is_error"]) == (
        "toolu_fail",
        "toolu_fail",
        True,
    )
    assert second.rows["usage_requests_raw"] == []
    assert second.rows["usage_sessions_raw"][0]["tool_errors"] == 1


def test_a_response_streamed_across_the_boundary_is_counted_once(tmp_path: Path) -> None:
    t = Transcript(SID)
    t.user("hello")
    t.response(
        [thinking("…"), text("Hi"), tool_use("toolu_r", "Read"), text("done")],
        final_usage=usage(output_tokens=420),
    )
    data = orjson.dumps(t.lines[0]) + b"\n"
    rest = b"".join(orjson.dumps(line) + b"\n" for line in t.lines[1:])  # type: ignore[arg-type]
    cut = len(data) + rest.index(b"\n", rest.index(b"\n") + 1) + 1 + 10  # 2 lines and a bit
    path = tmp_path / "alice" / "s.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes((data + rest)[:cut])
    first = read(path, "alice/s.jsonl")
    (partial,) = first.rows["usage_requests_raw"]
    assert (partial["output_tokens"], partial["stop_reason"]) == (1, None)
    path.write_bytes(data + rest)
    second = read(path, "alice/s.jsonl", first.complete_offset, first.checkpoint)
    (complete,) = second.rows["usage_requests_raw"]
    assert (complete["output_tokens"], complete["stop_reason"]) == (420, "end_turn")
    assert complete["occurred_at"] == partial["occurred_at"]  # the response's first line
    assert [e["tool_use_id"] for e in second.rows["usage_events"]] == ["toolu_r"]
    row = second.rows["usage_sessions_raw"][0]
    assert (row["assistant_messages"], row["output_tokens"], row["tool_calls"]) == (1, 420, 1)


def test_slash_command_event_ids(tmp_path: Path) -> None:
    t = Transcript(SID)
    first = t.slash_command("review")
    no_uuid = t.slash_command("compact")
    del no_uuid["uuid"]
    repeated = t.slash_command("commit")
    repeated["uuid"] = first["uuid"]
    path = t.write(tmp_path / "alice" / "s.jsonl")
    events = read(path, "alice/s.jsonl").rows["usage_events"]
    assert [e["event_id"] for e in events] == [first["uuid"], "line:2", "line:3"]


def test_a_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    path = Transcript(SID).write(tmp_path / "alice" / "s.jsonl")
    for checkpoint in ({"format": 0}, [], "x"):
        with Session.open(path) as session, pytest.raises(ValueError):
            PROCESSOR.process_increment(session, checkpoint)


def test_activity_spans_match_the_sorted_gaps_in_any_order(tmp_path: Path) -> None:
    """The spans against the definition: sort every timestamp, add the gaps of at most five
    minutes. Lines in random order, clustered so runs extend, start and bridge each other."""
    rng = random.Random("spans")
    base = datetime(2025, 9, 1, 10, tzinfo=UTC)
    for trial in range(40):
        micros = [
            rng.randrange(0, 3_600_000_000, rng.choice((1, 1000, 60_000_000))) for _ in range(40)
        ]
        t = Transcript(SID)
        for m in micros:
            ts = (base + timedelta(microseconds=m)).isoformat()
            t.other({"type": "system", "subtype": "turn_duration", "timestamp": ts})
        path = t.write(tmp_path / "alice" / f"{trial}.jsonl")
        (row,) = read(path, f"alice/{trial}.jsonl").rows["usage_sessions_raw"]
        ordered_micros = sorted(micros)
        gaps = [b - a for a, b in pairwise(ordered_micros) if b - a <= 300_000_000]
        assert row["active_seconds"] == sum(gaps) / 1_000_000, trial
        assert row["started_at"] == (base + timedelta(microseconds=ordered_micros[0])).isoformat()
        assert row["ended_at"] == (base + timedelta(microseconds=ordered_micros[-1])).isoformat()


def test_a_whole_read_restarts_keeping_the_calls_late_lines_answer_and_needs_no_other(
    samples: Path,
) -> None:
    """A tool result for a call the checkpoint dropped long ago (a background task finishing)
    needs the whole-read fallback. The error names a restart checkpoint that keeps that call
    all along, so the file can be read whole in segments (bounded memory, like any big read)
    without dropping it again: at any split, no further fallback and the whole read's rows."""
    key = max(sample_keys(), key=lambda k: (EXAMPLES / k).stat().st_size)
    path = samples / key
    head = path.read_bytes()
    first_call = orjson.loads(
        next(line for line in head.splitlines() if b'"tool_use"' in line and b"toolu_" in line)
    )
    call_id = next(
        block["id"] for block in first_call["message"]["content"] if block["type"] == "tool_use"
    )
    late = Transcript(SID)
    late.tool_result(call_id, is_error=True)
    data = head + b"".join(orjson.dumps(line) + b"\n" for line in late.lines)
    small = UsageProcessor(keep_events=2, keep_requests=2)
    before = read(path, key, processor=small)
    path.write_bytes(data)
    with (
        Session.open(path, key=key, start=before.complete_offset) as session,
        pytest.raises(WholeReadNeeded) as needed,
    ):
        small.process_increment(session, before.checkpoint)
    restart = needed.value.restart
    assert restart is not None and json_only(restart)
    expected, expected_items = whole(path, key)
    rng = random.Random(key)
    for cuts in [sorted(rng.sample(range(len(data) + 1), n)) for n in (1, 2, 3, 5, 8) * 4]:
        got, items, _, wholes = read_in_steps(data, cuts, path, key, small, first=restart)
        assert wholes == 0, cuts  # the restart keeps the call: no read needs another fallback
        assert got == expected and items == expected_items, cuts
    path.write_bytes(data)
