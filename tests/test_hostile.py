"""Hostile input: property-based tests of the reader and of each processor's parsing, and a
data dir full of bad files run through the whole pipeline. Whatever a file holds, its session
is processed (bad lines counted), skipped or failed with a recorded reason; every other
session is processed; nothing stored is lost."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flows.pipeline import run_direct
from flows.work import to_columns
from processors import session as session_module
from processors import transcript
from processors import usage as processors_usage
from processors.base import ProcessResult, WholeReadNeeded
from processors.redact import MARKER, redact
from processors.session import FileChangedError, Session, SessionIdentity
from processors.usage import Line, UsageProcessor
from state import store
from state.db import connect, transaction
from state.migrations import migrate
from tests.conftest import EXAMPLES, user_line, write_session

ROOT = Path(__file__).resolve().parent.parent
# In a full run, Prefect's client threads left by earlier tests draw from the global `random`
# (retry jitter) while Hypothesis generates data here, and Hypothesis blames the strategies.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# strategies -------------------------------------------------------------------------------

TRICKY_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "user",
        "assistant",
        "tool_use",
        "tool_result",
        "text",
        "Skill",
        "Task",
        "mcp__",
        "mcp__plugin__",
        "mcp__plugin_x_y__tool",
        "<synthetic>",
        "m1",
        "r1",
        "t1",
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:00:00+14:00",
        "2026-02-30T00:00:00Z",
        "2026-11-01T10:00:00",
        "nan",
        "12",
        " 7 ",
        "١٢٣",  # digits, not ASCII
        "99999999999999999999999",
        "<command-name>/x</command-name><command-args>a</command-args>",
        "<command-name></command-name>",
        "<local-command-stdout>x",
        "\x00",
        "\u2028",  # a line separator inside a string
        "🚀" * 3,
    ]
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | TRICKY_STRINGS
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.text(max_size=8) | TRICKY_STRINGS, kids, max_size=4)
    ),
    max_leaves=12,
)


def _example_lines() -> list[dict[str, Any]]:
    lines = []
    for path in sorted(EXAMPLES.rglob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:  # the samples hold a cut-off line on purpose
                continue
            if isinstance(value, dict):
                lines.append(value)
    return lines


TEMPLATES = _example_lines()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _set(root: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = root
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return root


@st.composite
def realistic_lines(draw: st.DrawFn) -> Any:
    """A real transcript line (from the samples) with up to four of its fields, at any depth,
    replaced by a value of any type, or deleted; sometimes the whole line."""
    line: Any = copy.deepcopy(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(0, 4))):
        paths = list(_paths(line))
        path = draw(st.sampled_from(paths))
        if path and draw(st.booleans()) and isinstance(line, dict):
            parent = line
            for step in path[:-1]:
                parent = parent[step]
            if isinstance(parent, dict):
                del parent[path[-1]]
                continue
        line = _set(line, path, draw(JSON_VALUES))
    return line


RAW_LINES = st.one_of(
    realistic_lines().map(lambda v: json.dumps(v).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"",
            b"   ",
            b"\r",
            b"\x0b",
            b"{",
            b'{"a":1}{"b":2}',
            b'{"type":"user","message":{"content":"\xff\xfe"}}',
            b"\xef\xbb\xbf{}",
            b"[" * 2000 + b"]" * 2000,
            b'{"a":' * 2000 + b"1" + b"}" * 2000,
            b"1e999",
            b"NaN",
            b"[1,2]",
            b"42",
            b'"text"',
            b"null",
        ]
    ),
)


@st.composite
def transcripts(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(RAW_LINES, max_size=12))
    body = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    if lines and draw(st.booleans()):
        body += b"\n"
    return body


def _session(data: bytes, key: str = "alice/s.jsonl", size: int | None = None) -> Session:
    return Session(
        identity=SessionIdentity.from_key(key),
        path=Path("/nonexistent") / key,
        size=len(data) if size is None else size,
        _file=io.BytesIO(data),
    )


# the reader -------------------------------------------------------------------------------


@PROPERTY
@given(data=transcripts() | st.binary(max_size=600), chunk=st.integers(1, 64))
def test_every_complete_line_is_parsed_or_counted_and_the_hash_is_of_the_bytes(
    data: bytes, chunk: int
) -> None:
    complete = data[: data.rfind(b"\n") + 1]
    expected: list[dict[str, Any]] = []
    malformed = 0
    for raw in complete.split(b"\n")[:-1]:
        if not raw.strip():
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            malformed += 1
            continue
        if isinstance(value, dict):
            expected.append(value)
        else:
            malformed += 1
    saved = session_module.CHUNK_BYTES
    session_module.CHUNK_BYTES = chunk  # lines longer than a chunk, split anywhere
    try:
        session = _session(data)
        parsed = list(session.lines())
        digest = session.finish()
    finally:
        session_module.CHUNK_BYTES = saved
    assert parsed == expected
    assert session.malformed_lines == malformed
    assert digest == hashlib.sha256(data).hexdigest()
    assert session.complete_offset == len(complete)
    assert session.complete_hash == hashlib.sha256(complete).hexdigest()


def _same_numbers(value: Any) -> Any:
    """orjson reads an integer past 64 bits as a float, msgspec as an int: the same number
    for every use usage makes of it (never a token count, never a string)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**64:
        return float(value)
    if isinstance(value, list):
        return [_same_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _same_numbers(item) for key, item in value.items()}
    return value


@PROPERTY
@given(
    data=transcripts() | st.binary(max_size=600),
    chunk=st.integers(1, 64) | st.just(1 << 20),
    bulk=st.sampled_from([8 << 20, 16]),
    hash_thread=st.sampled_from([4 << 20, 0]),
)
def test_typed_lines_are_the_parsed_lines_decoded_and_count_the_same_malformed(
    data: bytes, chunk: int, bulk: int, hash_thread: int
) -> None:
    """Whatever the bytes, `typed_lines(Line)` yields exactly the lines `lines()` yields (each
    decoded as usage's shape), counts the same malformed lines and hashes the same bytes,
    whether the lines are decoded a chunk at a time or one by one, hashed on a thread or not."""
    saved = session_module.CHUNK_BYTES, session_module.BULK_BYTES, session_module.THREAD_HASH_BYTES
    session_module.CHUNK_BYTES, session_module.BULK_BYTES = chunk, bulk
    session_module.THREAD_HASH_BYTES = hash_thread
    try:
        parsed_session, typed_session = _session(data), _session(data)
        parsed = list(parsed_session.lines())
        typed = list(typed_session.typed_lines(Line))
        digests = parsed_session.finish(), typed_session.finish()
    finally:
        (
            session_module.CHUNK_BYTES,
            session_module.BULK_BYTES,
            session_module.THREAD_HASH_BYTES,
        ) = saved
    expected = [_same_numbers(msgspec.to_builtins(msgspec.convert(v, Line))) for v in parsed]
    assert [_same_numbers(msgspec.to_builtins(v)) for v in typed] == expected
    assert typed_session.malformed_lines == parsed_session.malformed_lines
    assert digests[0] == digests[1]
    assert typed_session.complete_offset == parsed_session.complete_offset
    assert typed_session.complete_hash == parsed_session.complete_hash


def test_typed_lines_take_any_type_where_usage_reads_and_skip_what_is_not_json() -> None:
    """A field of an unexpected type is no reason to drop a line, nor is nesting deeper than
    msgspec follows (orjson does); what orjson rejects (invalid UTF-8 in a string usage never
    reads, two objects on a line, an object across two lines, not an object) is malformed."""
    deep = b'{"x":' + b"[" * 990 + b"]" * 990 + b"}"
    good = [
        b'{"type":"user","message":{"content":{"not":"a list"}}}',
        b'{"type":["user"],"message":[1,2],"timestamp":17}',
        b'{"type":"assistant","message":{"usage":"lots","content":[1,"two",{"type":7}]}}',
        b'{"message":{"content":[{"type":"tool_use","input":[1]}]}}',
        deep,
    ]
    bad = [
        b'{"type":"user","toolUseResult":"\xff\xfe"}',
        b'{"a":1} {"b":2}',
        b'{"a":',
        b"1}",
        b"[1]",
    ]
    data = b"\n".join([*good, *bad]) + b"\n"
    session = _session(data)
    typed = list(session.typed_lines(Line))
    session.finish()
    assert len(typed) == len(good)
    assert session.malformed_lines == len(bad)
    assert isinstance(typed[0].message, processors_usage.Message)
    assert typed[1].type == ["user"] and typed[1].message == [1, 2]


@PROPERTY
@given(data=st.binary(max_size=300), missing=st.integers(1, 100))
def test_a_file_shorter_than_its_size_raises_file_changed_and_nothing_else(
    data: bytes, missing: int
) -> None:
    session = _session(data, size=len(data) + missing)
    with pytest.raises(FileChangedError):
        for _ in session.lines():
            pass
        session.finish()


# the usage processor ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_db() -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(":memory:")
    migrate(con)
    store.ensure_outputs(con, UsageProcessor())
    yield con
    con.close()


def _commit(
    con: duckdb.DuckDBPyConnection, key: str, data: bytes, columns: Any, items: int
) -> None:
    outcome = store.Outcome(
        key=key,
        status="processed",
        read_at=datetime.now(UTC),
        size=len(data),
        mtime_ns=0,
        file_hash=hashlib.sha256(data).hexdigest(),
        columns=columns,
        items=items,
    )
    with transaction(con):
        store.apply_batch(con, UsageProcessor(), [outcome], 5)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(lines=st.lists(realistic_lines(), min_size=1, max_size=10), subagent=st.booleans())
def test_usage_never_raises_and_its_rows_fit_and_commit(
    memory_db: duckdb.DuckDBPyConnection, lines: list[Any], subagent: bool
) -> None:
    key = "bob/s1/subagents/agent-a1.jsonl" if subagent else "bob/s1.jsonl"
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    processor = UsageProcessor()
    result = processor.process(_session(data, key))
    columns = to_columns(processor.tables, result)
    (summary,) = result.rows["usage_sessions_raw"]
    assert summary["lines"] + summary["malformed_lines"] == len(lines)
    _commit(memory_db, key, data, columns, result.items)  # DuckDB takes every value too
    stored = memory_db.execute(
        "SELECT count(*) FROM usage_sessions WHERE session_file = ?", [key]
    ).fetchone()
    assert stored == (1,)


@settings(max_examples=100, deadline=None)
@given(
    lines=st.lists(realistic_lines(), min_size=2, max_size=10),
    cut=st.integers(1, 9),
)
def test_usage_checkpoints_of_hostile_lines_are_json_and_resume(lines: list[Any], cut: int) -> None:
    assume(cut < len(lines))
    first = b"".join(json.dumps(line).encode() + b"\n" for line in lines[:cut])
    rest = b"".join(json.dumps(line).encode() + b"\n" for line in lines[cut:])
    processor = UsageProcessor()
    increment = processor.process_increment(_session(first), None)
    checkpoint = orjson.loads(orjson.dumps(increment.checkpoint))
    data = first + rest
    remainder = io.BytesIO(data)
    remainder.seek(len(first))  # a session continuing at `start` reads from there on
    session = Session(
        identity=SessionIdentity.from_key("alice/s.jsonl"),
        path=Path("/nonexistent/alice/s.jsonl"),
        size=len(data),
        _file=remainder,
        start=len(first),
        _hasher=hashlib.sha256(first),
    )
    try:
        more = processor.process_increment(session, checkpoint)
    except WholeReadNeeded:
        # The lines undo what the checkpoint summed up (a request changed model): the
        # pipeline then reads the file whole, which must work on the same bytes.
        session = _session(data)
        more = processor.process_increment(session, None)
    orjson.dumps(more.checkpoint)
    to_columns(processor.tables, ProcessResult(more.rows, more.items))
    assert session.finish() == hashlib.sha256(data).hexdigest()


# the verification processor's turn extraction and redaction ---------------------------------

SECRET_PIECES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [" ", "\n", "=", ":", '"', "'", "@", "/", "://", "-", "_", "Bearer ", "export "]
    ),
    st.from_regex(r"sk-ant-[A-Za-z0-9_-]{16,30}", fullmatch=True),
    st.from_regex(r"sk-(proj-)?[A-Za-z0-9_-]{0,10}[0-9][A-Za-z0-9_-]{10,25}", fullmatch=True),
    st.from_regex(r"(AKIA|ASIA)[0-9A-Z]{16}", fullmatch=True),
    st.from_regex(r"gh[pousr]_[A-Za-z0-9]{30,36}", fullmatch=True),
    st.from_regex(r"github_pat_[A-Za-z0-9_]{22,30}", fullmatch=True),
    st.from_regex(r"xox[abprs]-[A-Za-z0-9-]{10,20}", fullmatch=True),
    st.from_regex(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{5,20}", fullmatch=True),
    st.from_regex(r"Bearer [A-Za-z0-9._~+/=-]{0,8}[0-9][A-Za-z0-9._~+/=-]{15,25}", fullmatch=True),
    st.from_regex(r"[a-z]{2,6}://[a-z]{1,8}:[^\s@/]{1,12}@[a-z]{1,8}", fullmatch=True),
    st.from_regex(
        r"(export )?[A-Za-z_]{0,6}(PASSWORD|SECRET|TOKEN|API_KEY|apiKey|password)"
        r"[A-Za-z_]{0,4} ?[=:] ?[\"']?[A-Za-z0-9$<{*]{1,12}[\"']?",
        fullmatch=True,
    ),
    st.from_regex(r"aws_secret_access_key ?= ?[A-Za-z0-9/+=]{30,40}", fullmatch=True),
    st.sampled_from(
        [
            "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc",
            "[REDACTED:openai_key]",
            MARKER.format(kind="secret_value"),
        ]
    ),
)
SECRET_TEXT = st.lists(SECRET_PIECES, max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=SECRET_TEXT | st.text())
def test_redaction_never_raises_and_is_idempotent(text: str) -> None:
    once, found = redact(text)
    assert found >= 0
    assert redact(once) == (once, 0)


def test_an_aws_key_glued_to_a_slack_webhook_is_redacted_in_one_pass() -> None:
    """The webhook has no `\\b`; replaced after the AWS pattern ran, it would give the glued
    key its trailing `\\b` too late, and only a second pass would redact the key."""
    text = "AKIAI437A8YS15FXWUO9https://hooks.slack.com/services/T000/B000/XXXX"
    once, _ = redact(text)
    assert "AKIA" not in once
    assert redact(once) == (once, 0)


@PROPERTY
@given(
    lines=st.lists(realistic_lines() | JSON_VALUES, max_size=12),
    max_turns=st.integers(1, 5),
    max_chars=st.integers(20, 400),
)
def test_turn_extraction_never_raises_and_stays_within_its_bounds(
    lines: list[Any], max_turns: int, max_chars: int
) -> None:
    dicts = [line for line in lines if isinstance(line, dict)]
    turns = transcript.read_turns(
        dicts, max_turns=max_turns, max_turn_chars=max_chars, clean=redact
    )
    assert len(turns) <= max_turns
    for turn in turns:
        assert turn.role in ("user", "assistant") and turn.text
        # clipped to head + tail around a marker of a few dozen characters
        assert len(turn.text) <= max_chars + 60


def test_a_clipped_turn_sends_nothing_redaction_would_catch() -> None:
    """A token glued to a word (no `\\b`) is not redacted before the clip; a clip that starts
    right at it gives it a boundary, so the clipped text must be redacted again."""
    token = "xoxb-" + "B1" * 1497 + "B"  # 3,000 characters: exactly the clip's tail
    text = "a" * 10_000 + "Q" + token
    (turn,) = transcript.read_turns([user_line(text)], clean=redact)
    assert redact(turn.text)[1] == 0, turn.text[-60:]
    assert "xoxb-" not in turn.text and turn.redactions == 1


def test_a_clipped_assistant_turn_sends_nothing_redaction_would_catch() -> None:
    token = "xoxb-" + "B1" * 1497 + "B"
    line = {
        "type": "assistant",
        "message": {
            "model": "m",
            "content": [{"type": "text", "text": "a" * 10_000 + "Q" + token}],
        },
    }
    (turn,) = transcript.read_turns([line], clean=redact)
    assert redact(turn.text)[1] == 0, turn.text[-60:]
    assert "xoxb-" not in turn.text and turn.redactions == 1


# a data dir full of hostile files, through the whole pipeline ----------------------------------

GOOD = {
    "alice/3f6c2a1e-8b4d-4c71-9e2a-5d0b7f1c9a43.jsonl": "alice/3f6c2a1e-8b4d-4c71-9e2a-5d0b7f1c9a43.jsonl",
    "al ice/my session.jsonl": "bob/c2d7a9f4-1e6b-4f38-a5c0-9b3e8d2f7a16.jsonl",
    "zoë/séance 🚀.jsonl": "carol/7d2c5e90-3a1f-4b86-9d4e-c8f0b6a1e257.jsonl",
    "bob/new\nline.jsonl": "carol/e4b1f8a2-9c3d-4e57-b6a0-2d8f1c7e5b39.jsonl",
}


def _wrong_types() -> list[bytes]:
    """Realistic lines with a field of the wrong type, one per line."""
    base_user = user_line("hello", ts="2026-11-01T10:00:00Z")
    assistant = next(t for t in TEMPLATES if t.get("type") == "assistant")
    variants: list[Any] = []
    for path, value in [
        (("message",), ["not", "a", "dict"]),
        (("message", "content"), 12),
        (("message", "content"), {"type": "text"}),
        (("timestamp",), 1730000000),
        (("timestamp",), "not a time"),
        (("type",), ["user"]),
        (("sessionId",), {"id": 1}),
        (("isSidechain",), "yes"),
    ]:
        variants.append(_set(copy.deepcopy(base_user), path, value))
    for path, value in [
        (("message", "usage"), "lots"),
        (("message", "usage", "input_tokens"), -5),
        (("message", "usage", "output_tokens"), 1e30),
        (("message", "usage", "cache_read_input_tokens"), True),
        (("message", "usage", "input_tokens"), "12"),
        (("message", "id"), {"nested": True}),
        (("message", "model"), 4),
        (("message", "content"), "plain string"),
        (("message", "content"), [1, "two", None, {"type": "tool_use", "name": ["x"]}]),
        (("requestId",), 7),
    ]:
        variant = copy.deepcopy(assistant)
        try:
            variants.append(_set(variant, path, value))
        except (KeyError, TypeError):
            continue
    return [orjson.dumps(v) for v in variants]


def _hostile_data_dir(data_dir: Path, outside: Path) -> tuple[set[str], set[str]]:
    """(keys that must be read, keys that must be processed with malformed lines counted)."""
    rng = random.Random(7)
    for key, source in GOOD.items():
        path = data_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((EXAMPLES / source).read_bytes())
    hostile: dict[str, bytes] = {
        "eve/empty.jsonl": b"",
        "eve/garbage.jsonl": rng.randbytes(1 << 16).replace(b"\n", b"\x00")
        + b"\n"
        + b"\n".join(rng.randbytes(200).replace(b"\n", b"") for _ in range(50))
        + b"\n",
        "eve/invalid-utf8.jsonl": b'{"type":"user","message":{"content":"\xff\xfe"}}\n'
        + orjson.dumps(user_line("fine"))
        + b"\n\xc3\x28\n",
        "eve/nested.jsonl": b"[" * 10_000
        + b"]" * 10_000
        + b"\n"
        + b'{"a":' * 10_000
        + b"1"
        + b"}" * 10_000
        + b"\n"
        + orjson.dumps(_set(user_line("deep"), ("message", "content"), _nest(200)))
        + b"\n",
        "eve/not-objects.jsonl": b"\n".join(
            [b"[1,2]", b"42", b"-0.5", b'"text"', b"null", b"true", b"1e999", b"[]", b"{}"]
        )
        + b"\n",
        "eve/wrong-types.jsonl": b"\n".join(_wrong_types()) + b"\n",
    }
    for key, body in hostile.items():
        path = data_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    # Links: out of the data dir (a user, a file, a subagents folder) are never read; a link
    # inside is read under its own name; a loop is nothing.
    write_session(outside, "mallory/s.jsonl", [user_line("outside")])
    (data_dir / "mallory").symlink_to(outside / "mallory")
    (data_dir / "alice" / "outside.jsonl").symlink_to(outside / "mallory" / "s.jsonl")
    (data_dir / "alice" / "sid").mkdir()
    (data_dir / "alice" / "sid" / "subagents").symlink_to(outside / "mallory")
    (data_dir / "alice" / "inside.jsonl").symlink_to(
        data_dir / "alice" / "3f6c2a1e-8b4d-4c71-9e2a-5d0b7f1c9a43.jsonl"
    )
    (data_dir / "alice" / "loop.jsonl").symlink_to(data_dir / "alice" / "loop.jsonl")
    # A user entry that is a file, a directory named like a session, a FIFO: not sessions.
    (data_dir / "stray.jsonl").write_bytes(orjson.dumps(user_line("stray")) + b"\n")
    (data_dir / "alice" / "dir.jsonl").mkdir()
    os.mkfifo(data_dir / "alice" / "fifo.jsonl")
    read = set(GOOD) | set(hostile) | {"alice/inside.jsonl"}
    return read, set(hostile) - {"eve/empty.jsonl", "eve/wrong-types.jsonl"}


def _nest(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def _snapshot(db: Path, keys: set[str]) -> dict[str, list[tuple[Any, ...]]]:
    with connect(db, read_only=True) as con:
        return {
            table: con.execute(
                f"SELECT * FROM {table} WHERE session_file IN (SELECT UNNEST(?)) ORDER BY ALL",
                [sorted(keys)],
            ).fetchall()
            for table in ("usage_events", "usage_requests", "usage_sessions")
        }


def test_a_data_dir_of_hostile_files_loses_nothing_and_processes_every_good_session(
    data_dir: Path, db: Path, tmp_path: Path
) -> None:
    # Stored first: the good sessions' rows, which nothing after may lose.
    for key, source in GOOD.items():
        path = data_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((EXAMPLES / source).read_bytes())
    first = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert (first.processed, first.errors) == (len(GOOD), 0)
    before = _snapshot(db, set(GOOD))
    assert all(before.values())

    read, with_malformed = _hostile_data_dir(data_dir, tmp_path / "outside")
    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)

    assert figures.scanned == len(read)
    assert (figures.processed, figures.skipped, figures.errors) == (
        len(read) - len(GOOD),
        len(GOOD),
        0,
    )
    with connect(db, read_only=True) as con:
        state = {
            row[0]: row[1:]
            for row in con.execute(
                "SELECT session_file, status, malformed_lines, last_error "
                "FROM session_processor_state"
            ).fetchall()
        }
        sessions = dict(
            con.execute("SELECT session_file, malformed_lines FROM usage_sessions").fetchall()
        )
        lines = dict(con.execute("SELECT session_file, lines FROM usage_sessions").fetchall())
    assert set(state) == read  # nothing outside, no stray file, no directory, FIFO or loop
    assert all(status == "ok" and error is None for status, _, error in state.values())
    for key in with_malformed:
        assert state[key][1] > 0 and sessions[key] == state[key][1], key
    assert state["eve/not-objects.jsonl"][1] == 8  # all but `{}`
    assert state["eve/nested.jsonl"][1] == 2  # past orjson's depth limit: counted, not a crash
    assert state["eve/empty.jsonl"][1] == 0 and sessions["eve/empty.jsonl"] == 0
    assert state["eve/wrong-types.jsonl"][1] == 0  # objects all: read, odd fields ignored
    assert lines["eve/wrong-types.jsonl"] == len(_wrong_types())
    assert _snapshot(db, set(GOOD)) == before  # nothing stored was lost
    with connect(db, read_only=True) as con:
        outside = con.execute(
            "SELECT count(*) FROM usage_sessions WHERE session_file LIKE 'mallory/%' "
            "OR session_file LIKE '%outside%' OR session_file LIKE 'alice/sid/%'"
        ).fetchone()
    assert outside == (0,)
    again = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert (again.processed, again.skipped, again.errors) == (0, len(read), 0)


def test_names_that_are_not_utf8_are_skipped_with_a_warning_and_fail_nothing(
    data_dir: Path, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys are text: such a name once reached DuckDB as a str with surrogates and failed
    the commit, the run, and every later run."""
    write_session(data_dir, "alice/good.jsonl", [user_line("fine")])
    bob, mallory = os.fsencode(data_dir / "bob"), os.fsencode(data_dir) + b"/mall\xffory"
    os.makedirs(bob)
    os.makedirs(mallory)
    for path in (bob + b"/bad\xff.jsonl", mallory + b"/s.jsonl"):
        with open(path, "wb") as f:
            f.write(orjson.dumps(user_line("bad name")) + b"\n")
    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert (figures.scanned, figures.processed, figures.errors) == (1, 1, 0)
    with connect(db, read_only=True) as con:
        assert con.execute(
            "SELECT session_file, status FROM session_processor_state"
        ).fetchall() == [("alice/good.jsonl", "ok")]
    warned = {r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()}
    assert warned == {
        "skipping 'bad\\udcff.jsonl': its name is not valid UTF-8",
        "skipping 'mall\\udcffory': its name is not valid UTF-8",
    }


# a single 100 MB line, in a process of its own so its memory can be measured ----------------

BIG_LINE = """
import json, resource, sys
from pathlib import Path
from flows.pipeline import run_direct
from processors.usage import UsageProcessor

data_dir, db, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
size = 100 << 20
path = data_dir / "alice" / "big.jsonl"
path.parent.mkdir(parents=True)
chunk = b"a" * (1 << 20)
with path.open("wb") as f:
    if kind == "json":
        f.write(b'{"type":"user","timestamp":"2026-11-01T10:00:00Z","message":{"content":"')
    for _ in range(size // len(chunk)):
        f.write(chunk)
    if kind == "json":
        f.write(b'"}}')
    if kind != "unfinished":
        f.write(b"\\n")
(data_dir / "alice" / "small.jsonl").write_bytes(
    b'{"type":"user","timestamp":"2026-11-01T10:00:00Z","message":{"content":"hi"}}\\n'
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"figures": figures.as_dict(), "peak_growth_mb": (after - before) / 1024}))
"""


@pytest.mark.parametrize(
    ("kind", "lines", "malformed", "max_growth_mb"),
    [
        ("json", 1, 0, 450),  # a 100 MB JSON object: parsed (measured ~340 MB of peak growth)
        ("garbage", 0, 1, 350),  # 100 MB of non-JSON: counted malformed (measured ~240 MB)
        ("unfinished", 0, 0, 250),  # no newline: an append in progress, left (~140 MB)
    ],
)
def test_a_single_100_mb_line_is_handled_in_memory_proportional_to_it(
    tmp_path: Path, kind: str, lines: int, malformed: int, max_growth_mb: int
) -> None:
    data_dir, db = tmp_path / "sessions", tmp_path / "state.duckdb"
    done = subprocess.run(
        [sys.executable, "-c", BIG_LINE, str(data_dir), str(db), kind],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    figures = result["figures"]
    assert (figures["processed"], figures["errors"]) == (2, 0)
    with connect(db, read_only=True) as con:
        assert con.execute(
            "SELECT lines, malformed_lines FROM usage_sessions WHERE session_file = 'alice/big.jsonl'"
        ).fetchall() == [(lines, malformed)]
        assert con.execute(
            "SELECT size_bytes >= 100 * 1024 * 1024 FROM session_processor_state "
            "WHERE session_file = 'alice/big.jsonl'"
        ).fetchall() == [(True,)]
    assert result["peak_growth_mb"] < max_growth_mb, result


# polynomial regexes: one crafted line must not stall a processor -------------------------------

STALL = """
import sys, time
from pathlib import Path
what, n = sys.argv[1], int(sys.argv[2])
if what == "usage":
    import io, orjson
    from processors.session import Session, SessionIdentity
    from processors.usage import UsageProcessor
    line = orjson.dumps({"type": "user", "message": {"content": "<command-name>" * n}}) + b"\\n"
    session = Session(SessionIdentity.from_key("a/s.jsonl"), Path("a/s.jsonl"), len(line), io.BytesIO(line))
    UsageProcessor().process(session)
else:
    from processors.transcript import read_turns
    read_turns([{"type": "user", "message": {"content": "<system-reminder>" * n}}])
print("done")
"""


@pytest.mark.parametrize("processor", ["usage", "verification"])
def test_a_line_of_unclosed_tags_does_not_stall_the_processor(processor: str) -> None:
    """12,000 unclosed `<command-name>` (usage) or `<system-reminder>` (verification) tags in
    one user message, ~200 KB: a linear scan takes milliseconds. The lazy `<tag>(.*?)</tag>`
    regexes this replaced took 3.2 s (usage) and 1.6 s (verification) for 4,000 tags, doubling
    them quadrupled it, so a 1 MB line held a processor for 6 to 20 minutes, inside one
    session that no time budget can interrupt."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", STALL, processor, "12000"],
            capture_output=True,
            text=True,
            timeout=4,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("one 200 KB line kept the processor busy for more than 4 s")
    assert done.stdout.strip() == "done", done.stderr[-2000:]
