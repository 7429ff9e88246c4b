"""The pipeline's invariants, on real files and a real DuckDB file, without Prefect."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from flows.pipeline import run_direct
from processors.base import ProcessResult, Table
from processors.session import Session
from state.db import connect
from state.migrations import migrate
from tests.conftest import user_line, write_session


class Recorder:
    """A processor that keeps one row per line and can be told to fail, sleep or misbehave."""

    name = "recorder"
    cadence_seconds = 60
    views = ()
    tables = (
        Table(
            "recorder_rows",
            (("session_file", "VARCHAR NOT NULL"), ("line_no", "INTEGER"), ("text", "VARCHAR")),
        ),
    )

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.seen: list[str] = []
        self.fail: set[str] = set()
        self.during: Any = None  # called with the session while it is being processed

    def process(self, session: Session) -> ProcessResult:
        self.seen.append(session.key)
        if session.key in self.fail:
            raise RuntimeError(f"cannot handle {session.key}")
        if self.during:
            self.during(session)
        rows = [
            {
                "session_file": session.key,
                "line_no": i,
                "text": line.get("message", {}).get("content"),
            }
            for i, line in enumerate(session.lines(), 1)
        ]
        return ProcessResult({"recorder_rows": rows}, items=len(rows))


@pytest.fixture
def db(state_db: Any) -> Any:
    """Every test here runs on the embedded DuckDB file and on PostgreSQL."""
    return state_db


def _rows(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connect(db) as con:
        return con.execute(sql, params or []).fetchall()


def _run(proc: Any, data_dir: Path, db: Path, max_attempts: int = 5) -> dict[str, Any]:
    return run_direct(proc, data_dir, db, max_attempts=max_attempts).as_dict()


def _two_sessions(data_dir: Path) -> None:
    write_session(
        data_dir, "alice/s1.jsonl", [user_line("one"), user_line("two", ts="2026-11-01T10:01:00Z")]
    )
    write_session(data_dir, "bob/s2.jsonl", [user_line("three")])


def test_first_run_processes_everything_and_records_state(data_dir: Path, db: Path) -> None:
    _two_sessions(data_dir)
    figures = _run(Recorder(), data_dir, db)
    assert {
        k: figures[k] for k in ("scanned", "processed", "skipped", "errors", "items_extracted")
    } == {
        "scanned": 2,
        "processed": 2,
        "skipped": 0,
        "errors": 0,
        "items_extracted": 3,
    }
    state = _rows(
        db,
        "SELECT session_file, username, items_extracted, status, attempts, processor_version, "
        "size_bytes, file_hash IS NOT NULL FROM session_processor_state ORDER BY 1",
    )
    size = (data_dir / "alice/s1.jsonl").stat().st_size
    assert state[0] == ("alice/s1.jsonl", "alice", 2, "ok", 0, "1", size, True)
    assert _rows(db, "SELECT count(*) FROM recorder_rows") == [(3,)]
    run = _rows(
        db, "SELECT processor_name, scanned, processed, errors, status, pid FROM processor_runs"
    )
    assert run == [("recorder", 2, 2, 0, "completed", os.getpid())]


def test_a_run_that_dies_is_marked_failed_in_the_ledger(data_dir: Path, db: Path) -> None:
    class Exploding(Recorder):
        def process(self, session: Session) -> ProcessResult:
            raise KeyboardInterrupt  # not an Exception: escapes session isolation, ends the run

    _two_sessions(data_dir)
    with pytest.raises(KeyboardInterrupt):
        _run(Exploding(), data_dir, db)
    assert _rows(db, "SELECT status, finished_at IS NOT NULL FROM processor_runs") == [
        ("failed", True)
    ]
    assert _rows(db, "SELECT count(*) FROM session_processor_state") == [(0,)]


def test_an_empty_data_dir_gives_all_zero_figures(tmp_path: Path, db: Path) -> None:
    (tmp_path / "empty").mkdir()
    figures = _run(Recorder(), tmp_path / "empty", db)
    assert figures["errors_detail"] == []
    assert all(
        figures[k] == 0 for k in ("scanned", "processed", "skipped", "errors", "items_extracted")
    )


def test_a_missing_or_too_deep_data_dir_is_an_error_before_any_write(
    tmp_path: Path, db: Path
) -> None:
    from state.config import ConfigError

    with pytest.raises(ConfigError, match=r"does not exist \(expected <data-dir>/<user>/"):
        _run(Recorder(), tmp_path / "absent", db)
    # one user's folder given as the data dir: its sessions sit directly inside
    write_session(tmp_path / "sessions", "alice/s1.jsonl", [user_line("hi")])
    write_session(tmp_path / "sessions", "alice/s1/subagents/agent-a.jsonl", [user_line("hi")])
    with pytest.raises(ConfigError, match="one level too deep"):
        _run(Recorder(), tmp_path / "sessions" / "alice", db)
    assert not db.exists()
    # a stray .jsonl beside real user folders is no reason to refuse
    (tmp_path / "sessions" / "stray.jsonl").write_text("{}\n")
    assert _run(Recorder(), tmp_path / "sessions", db)["processed"] == 2


def test_unchanged_files_are_never_opened(data_dir: Path, db: Path) -> None:
    """Proved with a CPython audit hook: every open() of anything under the data dir is seen."""
    _two_sessions(data_dir)
    _run(Recorder(), data_dir, db)
    opened: list[str] = []
    watching = threading.Event()
    root = str(data_dir)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if watching.is_set() and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            if path.startswith(root) and path.endswith(".jsonl"):
                opened.append(path)

    sys.addaudithook(hook)
    watching.set()
    try:
        proc = Recorder()
        figures = _run(proc, data_dir, db)
    finally:
        watching.clear()
    assert figures["skipped"] == 2 and figures["processed"] == 0
    assert proc.seen == []
    assert opened == []
    # and the hook does see opens: a changed file is opened exactly once
    write_session(data_dir, "bob/s2.jsonl", [user_line("three"), user_line("four")])
    watching.set()
    try:
        _run(Recorder(), data_dir, db)
    finally:
        watching.clear()
    assert opened == [str(data_dir / "bob/s2.jsonl")]


def test_touch_does_not_reprocess(data_dir: Path, db: Path) -> None:
    _two_sessions(data_dir)
    _run(Recorder(), data_dir, db)
    before = _rows(
        db,
        "SELECT session_file, processed_at, items_extracted FROM session_processor_state ORDER BY 1",
    )
    path = data_dir / "alice/s1.jsonl"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    proc = Recorder()
    figures = _run(proc, data_dir, db)
    assert proc.seen == []
    assert (figures["processed"], figures["skipped"]) == (0, 2)
    assert (
        _rows(
            db,
            "SELECT session_file, processed_at, items_extracted FROM session_processor_state ORDER BY 1",
        )
        == before
    )
    # the new mtime is remembered: the next run does not even hash it
    assert _rows(
        db, "SELECT mtime_ns FROM session_processor_state WHERE session_file = 'alice/s1.jsonl'"
    ) == [(path.stat().st_mtime_ns,)]


def test_changed_file_replaces_its_rows_exactly(data_dir: Path, db: Path) -> None:
    _two_sessions(data_dir)
    _run(Recorder(), data_dir, db)
    write_session(data_dir, "alice/s1.jsonl", [user_line("only")])
    figures = _run(Recorder(), data_dir, db)
    assert (figures["processed"], figures["skipped"]) == (1, 1)
    assert _rows(db, "SELECT session_file, text FROM recorder_rows ORDER BY 1, 2") == [
        ("alice/s1.jsonl", "only"),
        ("bob/s2.jsonl", "three"),
    ]


def test_append_during_processing_is_picked_up_next_run(data_dir: Path, db: Path) -> None:
    path = write_session(data_dir, "alice/s1.jsonl", [user_line("one")])
    proc = Recorder()

    def append(session: Session) -> None:
        with path.open("ab") as f:
            f.write(b'{"type": "user", "message": {"content": "late"}}\n')

    proc.during = append
    _run(proc, data_dir, db)
    assert _rows(db, "SELECT text FROM recorder_rows") == [("one",)]
    proc.during = None
    figures = _run(proc, data_dir, db)
    assert figures["processed"] == 1
    assert _rows(db, "SELECT text FROM recorder_rows ORDER BY line_no") == [("one",), ("late",)]


def test_version_bump_reprocesses_that_processor_alone(data_dir: Path, db: Path) -> None:
    class Other(Recorder):
        name = "other"
        tables = (
            Table(
                "other_rows",
                (("session_file", "VARCHAR"), ("line_no", "INTEGER"), ("text", "VARCHAR")),
            ),
        )

        def process(self, session: Session) -> ProcessResult:
            result = super().process(session)
            return ProcessResult({"other_rows": result.rows["recorder_rows"]}, result.items)

    _two_sessions(data_dir)
    _run(Recorder("1"), data_dir, db)
    _run(Other("1"), data_dir, db)
    bumped, other = Recorder("2"), Other("1")
    assert _run(bumped, data_dir, db)["processed"] == 2
    assert _run(other, data_dir, db)["processed"] == 0
    assert sorted(bumped.seen) == ["alice/s1.jsonl", "bob/s2.jsonl"] and other.seen == []
    assert _rows(
        db,
        "SELECT DISTINCT processor_version FROM session_processor_state WHERE processor_name = 'recorder'",
    ) == [("2",)]
    assert _rows(db, "SELECT count(*) FROM recorder_rows") == [(3,)]  # replaced, not duplicated


def test_failure_keeps_old_rows_and_quarantine_then_release(data_dir: Path, db: Path) -> None:
    from state.store import release

    _two_sessions(data_dir)
    _run(Recorder(), data_dir, db)
    write_session(data_dir, "alice/s1.jsonl", [user_line("changed")])
    proc = Recorder()
    proc.fail = {"alice/s1.jsonl"}
    for attempt in range(1, 4):
        figures = _run(proc, data_dir, db, max_attempts=3)
        assert figures["errors"] == 1
        assert figures["errors_detail"][0]["session"] == "alice/s1.jsonl"
        assert "RuntimeError: cannot handle alice/s1.jsonl" in figures["errors_detail"][0]["error"]
        row = _rows(
            db,
            "SELECT attempts, status FROM session_processor_state WHERE session_file = 'alice/s1.jsonl'",
        )
        assert row == [(attempt, "failed" if attempt < 3 else "quarantined")]
        # what the run did, and how many it leaves held
        assert (figures["quarantined"], figures["quarantined_held"]) == (
            (0, 0) if attempt < 3 else (1, 1)
        )
    assert "quarantined after 3 attempts" in figures["errors_detail"][0]["error"]
    with connect(db) as con:
        assert con.execute(
            "SELECT quarantined, quarantined_held FROM processor_runs ORDER BY started_at DESC LIMIT 1"
        ).fetchall() == [(1, 1)]
    # the old rows survive every failure
    assert _rows(
        db, "SELECT text FROM recorder_rows WHERE session_file = 'alice/s1.jsonl' ORDER BY 1"
    ) == [("one",), ("two",)]
    # quarantined: left alone
    proc.seen.clear()
    figures = _run(proc, data_dir, db, max_attempts=3)
    assert proc.seen == [] and figures["errors"] == 0
    assert (figures["quarantined"], figures["quarantined_held"]) == (0, 1)
    # released, and the processor fixed: processed again, rows replaced
    with connect(db) as con:
        assert release(con, "recorder", quarantined_only=True) == 1
    figures = _run(Recorder(), data_dir, db, max_attempts=3)
    assert figures["processed"] == 1
    assert (figures["quarantined"], figures["quarantined_held"]) == (0, 0)
    assert _rows(db, "SELECT text FROM recorder_rows WHERE session_file = 'alice/s1.jsonl'") == [
        ("changed",)
    ]


def test_new_sessions_go_before_retries(data_dir: Path, db: Path) -> None:
    write_session(data_dir, "alice/bad.jsonl", [user_line("x")])
    proc = Recorder()
    proc.fail = {"alice/bad.jsonl"}
    _run(proc, data_dir, db)
    write_session(data_dir, "alice/new.jsonl", [user_line("y")])
    proc.seen.clear()
    _run(proc, data_dir, db)
    assert proc.seen == ["alice/new.jsonl", "alice/bad.jsonl"]


def test_time_budget_defers_the_rest(data_dir: Path, db: Path) -> None:
    """Past the budget no new session starts; the first always does, so runs make progress."""
    for i in range(3):
        write_session(data_dir, f"alice/s{i}.jsonl", [user_line(str(i))])
    proc = Recorder()
    proc.during = lambda session: __import__("time").sleep(1.2)  # one session outlasts the budget
    figures = run_direct(proc, data_dir, db, max_attempts=5, time_budget_seconds=1).as_dict()
    assert (figures["processed"], figures["deferred"], figures["errors"]) == (1, 2, 0)
    proc.during = None
    assert _run(proc, data_dir, db)["processed"] == 2


def test_wrong_return_type_counts_as_zero_items_and_is_marked(data_dir: Path, db: Path) -> None:
    class Sloppy(Recorder):
        def process(self, session: Session) -> Any:
            return 17

    _two_sessions(data_dir)
    figures = _run(Sloppy(), data_dir, db)
    assert (figures["processed"], figures["items_extracted"], figures["errors"]) == (2, 0, 0)
    assert _rows(db, "SELECT DISTINCT status, items_extracted FROM session_processor_state") == [
        ("ok", 0)
    ]


def test_rows_that_do_not_fit_fail_that_session_only(data_dir: Path, db: Path) -> None:
    class Bad(Recorder):
        def process(self, session: Session) -> ProcessResult:
            if session.username == "alice":
                return ProcessResult(
                    {"recorder_rows": [{"session_file": session.key, "line_no": "x"}]}
                )
            return super().process(session)

    _two_sessions(data_dir)
    figures = _run(Bad(), data_dir, db)
    assert (figures["processed"], figures["errors"]) == (1, 1)
    assert "recorder_rows.line_no expects INTEGER" in figures["errors_detail"][0]["error"]


def test_a_failed_commit_leaves_the_old_rows(data_dir: Path, db: Path) -> None:
    """Delete and insert are one transaction: a failing insert rolls the delete back."""
    from state.db import DATABASE_ERRORS, transaction
    from state.store import Outcome, apply_batch

    _two_sessions(data_dir)
    _run(Recorder(), data_dir, db)
    bad = Outcome(
        "alice/s1.jsonl",
        "processed",
        __import__("datetime").datetime.now(__import__("datetime").UTC),
        1,
        1,
        "h",
        columns={"recorder_rows": {"session_file": [None], "line_no": [1], "text": ["x"]}},
    )
    with connect(db) as con, pytest.raises(DATABASE_ERRORS), transaction(con):
        apply_batch(con, Recorder(), [bad], 5)
    assert _rows(
        db, "SELECT count(*) FROM recorder_rows WHERE session_file = 'alice/s1.jsonl'"
    ) == [(2,)]
    assert _rows(
        db,
        "SELECT size_bytes <> 1 FROM session_processor_state WHERE session_file = 'alice/s1.jsonl'",
    ) == [(True,)]


def test_output_schema_change_rebuilds_and_reprocesses(data_dir: Path, db: Path) -> None:
    class Wider(Recorder):
        tables = (
            Table(
                "recorder_rows",
                (
                    ("session_file", "VARCHAR NOT NULL"),
                    ("line_no", "INTEGER"),
                    ("text", "VARCHAR"),
                    ("extra", "VARCHAR"),
                ),
            ),
        )

    class Reshaped(Recorder):
        tables = (
            Table(
                "recorder_rows",
                (
                    ("session_file", "VARCHAR NOT NULL"),
                    ("extra", "VARCHAR"),
                    ("line_no", "BIGINT"),
                    ("text", "VARCHAR"),
                ),
            ),
        )

    _two_sessions(data_dir)
    _run(Recorder(), data_dir, db)
    # a column added at the end: added in place, nothing reprocessed (an LLM processor's
    # history would otherwise be paid for again)
    figures = _run(Wider(), data_dir, db)
    assert (figures["processed"], figures["skipped"]) == (0, 2)
    assert _rows(db, "SELECT count(*), count(extra) FROM recorder_rows") == [(3, 0)]
    # anything else rebuilds the table and reprocesses every session
    figures = _run(Reshaped(), data_dir, db)
    assert figures["processed"] == 2
    assert _rows(db, "SELECT count(*), count(extra) FROM recorder_rows") == [(3, 0)]
    assert _rows(
        db,
        "SELECT upper(data_type) FROM information_schema.columns "
        "WHERE table_name = 'recorder_rows' AND column_name = 'line_no' "
        "AND table_schema = current_schema()",
    ) == [("BIGINT",)]


def test_files_vanishing_between_scan_and_read_fail_with_a_reason(data_dir: Path, db: Path) -> None:
    _two_sessions(data_dir)
    from flows import pipeline

    original = pipeline._prepare

    def prepare_then_delete(*args: Any, **kwargs: Any) -> Any:
        the_plan = original(*args, **kwargs)
        (data_dir / "bob/s2.jsonl").unlink()
        return the_plan

    pipeline._prepare = prepare_then_delete  # type: ignore[assignment]
    try:
        figures = _run(Recorder(), data_dir, db)
    finally:
        pipeline._prepare = original  # type: ignore[assignment]
    assert (figures["processed"], figures["errors"]) == (1, 1)
    assert figures["errors_detail"][0]["error"].startswith("FileNotFoundError")


def test_to_columns_validates_and_coerces_column_by_column() -> None:
    from flows.work import RowError, to_columns

    table = Table(
        "t",
        (("session_file", "VARCHAR"), ("n", "BIGINT"), ("x", "DOUBLE"), ("meta", "JSON")),
    )
    rows = [
        {"session_file": "a", "n": True, "x": 1, "meta": {"k": [1]}},
        {"session_file": "b", "n": None, "x": 2.5},
    ]
    columns = to_columns([table], ProcessResult({"t": rows}, 2))["t"]
    assert columns == {
        "session_file": ["a", "b"],
        "n": [1, None],
        "x": [1, 2.5],
        "meta": ['{"k":[1]}', None],
    }
    assert type(columns["n"][0]) is int
    with pytest.raises(RowError, match=r"t\.n expects BIGINT, got str"):
        to_columns([table], ProcessResult({"t": [{"session_file": "a", "n": "7"}]}, 1))
    with pytest.raises(RowError, match="t has no column"):
        to_columns([table], ProcessResult({"t": [{"session_file": "a", "zzz": 1}]}, 1))


def test_commit_seconds_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from state.config import ConfigError, commit_seconds

    assert commit_seconds() == 5
    monkeypatch.setenv("SESSION_PIPELINE_COMMIT_SECONDS", "0")
    assert commit_seconds() == 0
    for bad in ("", "-1", "1.5", "soon"):
        monkeypatch.setenv("SESSION_PIPELINE_COMMIT_SECONDS", bad)
        with pytest.raises(ConfigError, match="SESSION_PIPELINE_COMMIT_SECONDS must be"):
            commit_seconds()


def test_a_run_with_nothing_to_read_ends_on_its_planning_connection(
    data_dir: Path, db: Path
) -> None:
    from flows.pipeline import begin

    _two_sessions(data_dir)
    run_id, the_plan, committer = begin(Recorder(), data_dir, db, max_attempts=5)
    assert len(the_plan.candidates) == 2 and committer.held is None  # reading: let go
    committer.abort(run_id)
    run_direct(Recorder(), data_dir, db, max_attempts=5)
    run_id, the_plan, committer = begin(Recorder(), data_dir, db, max_attempts=5)
    assert not the_plan.candidates and committer.held is not None
    figures = committer.close(run_id, 0)
    assert committer.held is None and figures.skipped == 2
    with connect(db) as con:  # closed for real: another connection gets the file
        assert con.execute(
            "SELECT status FROM processor_runs WHERE run_id = ?", [run_id]
        ).fetchall() == [("completed",)]
    run_id, _, committer = begin(Recorder(), data_dir, db, max_attempts=5)
    committer.abort(run_id)  # a failed run lets go of it too
    assert committer.held is None
    with connect(db) as con:
        assert con.execute(
            "SELECT status FROM processor_runs WHERE run_id = ?", [run_id]
        ).fetchall() == [("failed",)]


def test_usage_tables_of_an_older_version_become_views_and_are_refilled(
    data_dir: Path, db: Path
) -> None:
    """usage 2 stored costs in tables `usage_requests` and `usage_sessions`; those names are
    views now. An old state upgrades in place: the old tables go, every session is read again."""
    from processors.usage import UsageProcessor

    write_session(data_dir, "alice/s1.jsonl", [user_line("hi")])
    with connect(db) as con:
        migrate(con)
        for name in ("usage_requests", "usage_sessions"):
            ddl = f"CREATE TABLE {name} (session_file VARCHAR, cost_usd DOUBLE PRECISION)"
            con.execute(ddl)
            con.execute(f"INSERT INTO {name} VALUES ('alice/s1.jsonl', 1.0)")
            con.execute(
                "INSERT INTO processor_tables (processor_name, table_name, ddl) VALUES ('usage', ?, ?)",
                [name, ddl],
            )
        con.execute(
            "INSERT INTO session_processor_state (processor_name, session_file, status, "
            "processor_version, file_hash) VALUES ('usage', 'alice/s1.jsonl', 'ok', '3', 'x')"
        )
    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    assert figures.processed == 1
    with connect(db) as con:
        kinds = dict(
            con.execute(
                "SELECT table_name, table_type FROM information_schema.tables "
                "WHERE table_name IN ('usage_requests', 'usage_sessions', 'usage_sessions_raw')"
            ).fetchall()
        )
        assert kinds == {
            "usage_requests": "VIEW",
            "usage_sessions": "VIEW",
            "usage_sessions_raw": "BASE TABLE",
        }
        assert con.execute(
            "SELECT session_file, cost_usd, unpriced_requests FROM usage_sessions"
        ).fetchall() == [("alice/s1.jsonl", None, 0)]
        assert con.execute(
            "SELECT count(*) FROM processor_tables WHERE table_name = 'usage_requests'"
        ).fetchall() == [(0,)]


def test_workflow_subagents_are_counted_with_their_workflow(data_dir: Path, db: Path) -> None:
    """The exact layout newer Claude Code writes: a workflow subagent one folder deeper."""
    from processors.usage import UsageProcessor
    from tests.transcripts import Transcript, text, usage

    sid = "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
    main = Transcript(sid)
    main.user("Run the release workflow")
    main.response([text("Starting.")], final_usage=usage(input_tokens=5, output_tokens=50))
    main.write(data_dir / f"alice/{sid}.jsonl")
    folder = data_dir / f"alice/{sid}/subagents/workflows/wf-42"
    agent = Transcript(sid, agent_id="a7", is_sidechain=True)
    agent.user("Check the changelog")
    agent.response([text("Checked.")], final_usage=usage(input_tokens=7, output_tokens=70))
    agent.write(folder / "agent-a7.jsonl")
    (folder / "agent-a7.meta.json").write_text('{"agentType": "release-checker"}')

    figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
    assert (figures.scanned, figures.processed) == (2, 2)
    with connect(db) as con:
        rows = con.execute(
            "SELECT session_file, session_id, agent_id, workflow_id, is_subagent, agent_type, "
            "output_tokens FROM usage_sessions ORDER BY 1"
        ).fetchall()
    assert rows == [
        (f"alice/{sid}.jsonl", sid, None, None, False, None, 50),
        (
            f"alice/{sid}/subagents/workflows/wf-42/agent-a7.jsonl",
            sid,
            "a7",
            "wf-42",
            True,
            "release-checker",
            70,
        ),
    ]


def test_a_deleted_session_goes_missing_whatever_its_state_said(data_dir: Path, db: Path) -> None:
    """A run learns a file is gone by counting the sessions its state knows: a failed session
    and one read by an older version count too, though neither is settled."""
    _two_sessions(data_dir)
    write_session(data_dir, "carol/s3.jsonl", [user_line("four")])
    failing = Recorder()
    failing.fail = {"alice/s1.jsonl"}
    assert _run(failing, data_dir, db)["errors"] == 1
    (data_dir / "alice/s1.jsonl").unlink()  # gone while its state says error
    assert _run(Recorder(), data_dir, db)["processed"] == 0

    def states() -> list[tuple[str, str, str]]:
        return _rows(
            db,
            "SELECT session_file, status, processor_version FROM session_processor_state "
            "ORDER BY 1",
        )

    assert [row[:2] for row in states()] == [
        ("alice/s1.jsonl", "missing"),
        ("bob/s2.jsonl", "ok"),
        ("carol/s3.jsonl", "ok"),
    ]
    (data_dir / "bob/s2.jsonl").unlink()  # gone while read by version 1 only
    figures = _run(Recorder(version="2"), data_dir, db)
    assert (figures["scanned"], figures["processed"]) == (1, 1)
    assert states() == [
        ("alice/s1.jsonl", "missing", None),  # never read well
        ("bob/s2.jsonl", "missing", "1"),
        ("carol/s3.jsonl", "ok", "2"),
    ]


def test_a_deleted_session_keeps_its_rows_as_missing_until_forgotten(
    data_dir: Path, db: Path
) -> None:
    """Transcripts get rotated away; last month's usage must not go with them. A file that
    comes back unchanged is not read again; `forget_missing` drops the rest on purpose."""
    from flows.health import health
    from processors.registry import Entry
    from state.store import forget_missing, status

    _two_sessions(data_dir)
    _run(Recorder(), data_dir, db)
    moved = data_dir.parent / "s1.jsonl.bak"
    (data_dir / "alice/s1.jsonl").rename(moved)
    proc = Recorder()
    figures = _run(proc, data_dir, db)
    assert (figures["scanned"], figures["processed"]) == (1, 0)

    def states() -> list[tuple[str, str]]:
        return _rows(db, "SELECT session_file, status FROM session_processor_state ORDER BY 1")

    assert states() == [("alice/s1.jsonl", "missing"), ("bob/s2.jsonl", "ok")]
    assert _rows(
        db, "SELECT count(*) FROM recorder_rows WHERE session_file = 'alice/s1.jsonl'"
    ) == [(2,)]
    with connect(db) as con:
        (recorder,) = [s for s in status(con, ["recorder"]) if s.processor == "recorder"]
    assert (recorder.known, recorder.missing) == (2, 1)
    report = health([Entry("recorder", Recorder(), None)], data_dir, db)
    assert report["processors"][0]["missing"] == 1
    # back as it was: settled again without being read
    moved.rename(data_dir / "alice/s1.jsonl")
    figures = _run(proc, data_dir, db)
    assert (figures["processed"], figures["skipped"], proc.seen) == (0, 2, [])
    assert states() == [("alice/s1.jsonl", "ok"), ("bob/s2.jsonl", "ok")]
    # gone for good, and forgotten on purpose
    (data_dir / "alice/s1.jsonl").unlink()
    _run(proc, data_dir, db)
    with connect(db) as con:
        assert forget_missing(con, Recorder()) == ["alice/s1.jsonl"]
    assert states() == [("bob/s2.jsonl", "ok")]
    assert _rows(db, "SELECT DISTINCT session_file FROM recorder_rows") == [("bob/s2.jsonl",)]
