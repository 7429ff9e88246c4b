"""Discovery is stat-only, finds every layout, and never leaves the data dir."""

from __future__ import annotations

import os
from pathlib import Path

from state.scan import scan
from tests.conftest import user_line, write_session


def _keys(data_dir: Path) -> list[str]:
    return sorted(f.key for f in scan(data_dir))


def test_finds_sessions_old_and_new_subagents(data_dir: Path) -> None:
    write_session(data_dir, "alice/s1.jsonl", [user_line("hi")])
    write_session(data_dir, "alice/agent-old.jsonl", [user_line("hi")])
    write_session(data_dir, "alice/s1/subagents/agent-a1.jsonl", [user_line("hi")])
    (data_dir / "alice/s1/subagents/agent-a1.meta.json").write_text("{}")
    (data_dir / "alice/s1/tool-results").mkdir()
    (data_dir / "alice/s1/tool-results/x.jsonl").write_text("{}\n")  # not a transcript
    (data_dir / "alice/notes.txt").write_text("not a session")
    write_session(data_dir, "bob/s2.jsonl", [user_line("hi")])
    assert _keys(data_dir) == [
        "alice/agent-old.jsonl",
        "alice/s1.jsonl",
        "alice/s1/subagents/agent-a1.jsonl",
        "bob/s2.jsonl",
    ]


def test_finds_workflow_subagents_at_any_depth_below_subagents(data_dir: Path) -> None:
    """Newer Claude Code writes workflow subagents one level deeper, `.meta.json` beside."""
    write_session(data_dir, "alice/s1.jsonl", [user_line("hi")])
    workflow = "alice/s1/subagents/workflows/wf-1"
    write_session(data_dir, f"{workflow}/agent-w1.jsonl", [user_line("hi")])
    (data_dir / f"{workflow}/agent-w1.meta.json").write_text('{"agentType": "general"}')
    write_session(data_dir, "alice/s1/subagents/a/b/c/d/agent-deep.jsonl", [user_line("hi")])
    write_session(data_dir, "alice/s1/subagents/a/b/c/d/e/agent-too-deep.jsonl", [user_line("x")])
    write_session(data_dir, "alice/s1/other/agent-x.jsonl", [user_line("not a subagent dir")])
    assert _keys(data_dir) == [
        "alice/s1.jsonl",
        "alice/s1/subagents/a/b/c/d/agent-deep.jsonl",
        f"{workflow}/agent-w1.jsonl",
    ]


def test_a_link_cycle_below_subagents_ends(data_dir: Path) -> None:
    write_session(data_dir, "alice/s1/subagents/workflows/wf/agent-1.jsonl", [user_line("hi")])
    os.symlink(data_dir / "alice/s1/subagents", data_dir / "alice/s1/subagents/workflows/wf/loop")
    keys = _keys(data_dir)
    assert "alice/s1/subagents/workflows/wf/agent-1.jsonl" in keys
    assert len(keys) < 10  # bounded by the depth, not a hang


def test_stat_fields_are_recorded(data_dir: Path) -> None:
    path = write_session(data_dir, "alice/s1.jsonl", [user_line("hi")])
    (found,) = list(scan(data_dir))
    st = path.stat()
    assert (found.size, found.mtime_ns, found.username) == (st.st_size, st.st_mtime_ns, "alice")
    assert found.path == str(path)


def test_missing_data_dir_yields_nothing(tmp_path: Path) -> None:
    assert list(scan(tmp_path / "nope")) == []


def test_a_user_entry_that_is_a_file_is_ignored(data_dir: Path) -> None:
    (data_dir / "stray.jsonl").write_text("{}\n")
    write_session(data_dir, "alice/s1.jsonl", [user_line("hi")])
    assert _keys(data_dir) == ["alice/s1.jsonl"]


def test_links_are_followed_only_inside_the_data_dir(data_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_session(outside, "eve/secret.jsonl", [user_line("secret")])
    write_session(data_dir, "alice/s1.jsonl", [user_line("hi")])
    os.symlink(outside / "eve", data_dir / "eve")  # a user dir pointing out
    os.symlink(outside / "eve/secret.jsonl", data_dir / "alice/leak.jsonl")  # a file pointing out
    os.symlink(data_dir / "alice/s1.jsonl", data_dir / "alice/alias.jsonl")  # inside: fine
    (data_dir / "alice/s9").mkdir()
    os.symlink(outside / "eve", data_dir / "alice/s9/subagents")  # a subagents dir pointing out
    assert _keys(data_dir) == ["alice/alias.jsonl", "alice/s1.jsonl"]


def test_odd_names_are_kept_verbatim(data_dir: Path) -> None:
    write_session(data_dir, "ünï cødé/sess ion\nx.jsonl", [user_line("hi")])
    assert _keys(data_dir) == ["ünï cødé/sess ion\nx.jsonl"]
