"""The shared JSONL reader: streaming, tolerant, and exact about which bytes it read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from processors import session as session_module
from processors.session import FileChangedError, Session, SessionIdentity, hash_prefix


def _read(path: Path, key: str = "alice/s.jsonl") -> tuple[list[dict], Session, str]:
    with Session.open(path, key=key) as s:
        lines = list(s.lines())
        digest = s.finish()
    return lines, s, digest


def test_malformed_and_non_object_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"a": 1}\n{"broken": \n[1, 2]\n42\n"text"\n\n   \n{"b": 2}\n\xff\xfe\n')
    lines, s, _ = _read(path)
    assert lines == [{"a": 1}, {"b": 2}]
    assert s.malformed_lines == 5  # truncated object, array, number, string, invalid UTF-8


def test_last_line_without_newline_is_left_for_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}')
    lines, s, digest = _read(path)
    assert lines == [{"a": 1}]
    assert s.malformed_lines == 0
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()  # the hash covers all bytes


def test_a_line_longer_than_a_chunk_is_joined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "CHUNK_BYTES", 64)
    path = tmp_path / "s.jsonl"
    big = "x" * 1000
    path.write_text(f'{{"big": "{big}"}}\n{{"small": 1}}\n')
    lines, _, digest = _read(path)
    assert lines == [{"big": big}, {"small": 1}]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_reads_only_the_size_observed_at_open(tmp_path: Path) -> None:
    """Bytes appended after the stat belong to the next run, not this one."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"a": 1}\n')
    with path.open("rb") as f:
        size = path.stat().st_size
        with path.open("ab") as appender:
            appender.write(b'{"b": 2}\n')
        s = Session(SessionIdentity.from_key("alice/s.jsonl"), path, size, f)
        assert list(s.lines()) == [{"a": 1}]
        assert s.finish() == hashlib.sha256(b'{"a": 1}\n').hexdigest()


def test_finish_hashes_what_the_processor_did_not_read(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n')
    with Session.open(path) as s:
        next(iter(s.lines()))
        assert s.finish() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_that_shrinks_while_read_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"a": 1}\n' * 10)
    with path.open("rb") as f:
        size = path.stat().st_size
        path.write_text('{"a": 1}\n')
        s = Session(SessionIdentity.from_key("alice/s.jsonl"), path, size, f)
        with pytest.raises(FileChangedError):
            list(s.lines())
        with pytest.raises(FileChangedError):
            hash_prefix(f, size)


@pytest.mark.parametrize(
    ("key", "username", "session_id", "agent_id", "workflow_id", "is_subagent"),
    [
        ("alice/abc.jsonl", "alice", "abc", None, None, False),
        ("alice/abc/subagents/agent-a1.jsonl", "alice", "abc", "a1", None, True),
        ("alice/abc/subagents/workflows/wf-9/agent-a2.jsonl", "alice", "abc", "a2", "wf-9", True),
        ("alice/abc/subagents/other/deeper/agent-a3.jsonl", "alice", "abc", "a3", None, True),
        ("alice/abc/subagents/workflows/wf-9/notes.jsonl", "alice", "abc", None, "wf-9", True),
        ("bob/agent-7f.jsonl", "bob", None, "7f", None, True),
        ("name with space/é ü.jsonl", "name with space", "é ü", None, None, False),
    ],
)
def test_identity_from_key(
    key: str,
    username: str,
    session_id: str | None,
    agent_id: str | None,
    workflow_id: str | None,
    is_subagent: bool,
) -> None:
    identity = SessionIdentity.from_key(key)
    assert (
        identity.username,
        identity.session_id,
        identity.agent_id,
        identity.workflow_id,
        identity.is_subagent,
    ) == (username, session_id, agent_id, workflow_id, is_subagent)


def test_complete_offset_and_hash_mark_where_the_next_read_continues(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    done = b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(done + b'{"c": ')  # an append in progress
    lines, s, digest = _read(path)
    assert lines == [{"a": 1}, {"b": 2}]
    assert s.complete_offset == len(done)
    assert s.complete_hash == hashlib.sha256(done).hexdigest()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with path.open("ab") as f:
        f.write(b'3}\n{"d": 4}\n')
    with Session.open(path, start=s.complete_offset) as more:
        assert list(more.lines()) == [{"c": 3}, {"d": 4}]
        assert more.finish() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert more.complete_offset == path.stat().st_size
