"""Real flows on a real Prefect server, writing real DuckDB files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flows import processor_flow
from flows.cli import main
from flows.pipeline import MAX_TASK_RUNS
from flows.processor_flow import RunRefused, limit_name, run
from state.db import connect
from tests.conftest import EXAMPLES, subprocess_env, user_line, write_session

pytestmark = pytest.mark.e2e


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with connect(db) as con:
        return con.execute(sql).fetchall()


def _flow_run(flow_run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_usage_flow_on_the_samples(prefect_api: str, tmp_path: Path, db: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    figures = run("usage", data_dir, db)
    assert figures["scanned"] == 7 and figures["processed"] == 7 and figures["errors"] == 0
    assert figures["items_extracted"] > 0
    (flow_run_id,) = _rows(db, "SELECT flow_run_id FROM processor_runs")[0]
    flow_run = _flow_run(flow_run_id)
    assert flow_run.state.is_completed()
    assert flow_run.name.startswith("usage-")
    assert {"session-pipeline", "processor:usage"} <= set(flow_run.tags)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["usage-run-figures"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
        )
        assert len(artifacts) == 1 and '"processed"' in str(artifacts[0].data)
        (summary,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["usage-summary"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
        )
        assert summary.type == "markdown"
        assert "| carol | 15 | 231,601 | 1,664 | $0.13 |" in str(summary.data)  # see test_summary
        limit = client.read_global_concurrency_limit_by_name(limit_name("usage"))
        assert limit.limit == 1 and limit.active_slots == 0
        flow = client.read_flow(flow_run.flow_id)
        assert flow.name == "usage-processor"
        # The server records task runs from events, asynchronously: a task run can still show
        # the name of its first state (`process-sessions-<n>`) for a moment after the flow
        # returns, until its last state's event (which carries the rendered name) is recorded.
        wanted = {f"usage-batch-{i}" for i in range(7)}
        deadline = time.monotonic() + 30
        while True:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            )
            if {t.name for t in task_runs} == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {t.name for t in task_runs} == wanted
        # Untagged: a tagged task run waits on the API for tag concurrency slots.
        assert all(not t.tags for t in task_runs)
    # a second run finds nothing to do, and says so
    again = run("usage", data_dir, db)
    assert (again["processed"], again["skipped"]) == (0, 7)


def test_the_flow_commits_big_files_in_segments_from_its_task_runs(
    prefect_api: str,
    tmp_path: Path,
    db: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With 4 KB segments every sample is read in several segments, each committed from the
    task run reading it: the tables equal a run without Prefect that reads each file whole."""
    from flows import work
    from flows.pipeline import run_direct
    from processors.usage import UsageProcessor

    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    clean = tmp_path / "clean.duckdb"
    run_direct(UsageProcessor(), data_dir, clean, max_attempts=3)
    monkeypatch.setattr(work, "SEGMENT_BYTES", 4096)
    figures = run("usage", data_dir, db)
    assert (figures["processed"], figures["errors"], figures["deferred"]) == (7, 0, 0)
    segments = [r.getMessage() for r in caplog.records if "read in segments" in r.getMessage()]
    largest = max(p.stat().st_size for p in data_dir.rglob("*.jsonl"))
    assert len(segments) > largest // 4096 > 5  # in the run's log, so in the Prefect UI too
    for table in ("usage_events", "usage_requests", "usage_sessions"):
        sql = f"SELECT * FROM {table} ORDER BY ALL"
        assert _rows(db, sql) == _rows(clean, sql), table
    state = "SELECT session_file, size_bytes, complete_offset, items_extracted, file_hash FROM session_processor_state ORDER BY ALL"
    assert _rows(db, state) == _rows(clean, state)


def test_flows_read_with_as_many_threads_as_their_processor_asks() -> None:
    assert processor_flow.read_threads("usage") == 1  # CPU-bound: one reader, no GIL fight
    assert processor_flow.read_threads("verification") == 4  # waits on the LLM
    assert processor_flow.read_threads("no-such-processor") == 1
    runner = processor_flow.build_flow("verification").task_runner
    assert runner._max_workers == 4  # (Prefect keeps it private)


def test_a_failing_session_does_not_fail_the_run(
    prefect_api: str, linecount: Any, data_dir: Path, db: Path
) -> None:
    write_session(data_dir, "alice/good.jsonl", [user_line("fine")])
    write_session(data_dir, "alice/bad.jsonl", [user_line("x"), {"poison": True}])
    figures = run("linecount", data_dir, db)
    assert (figures["processed"], figures["errors"]) == (1, 1)
    assert figures["errors_detail"][0]["session"] == "alice/bad.jsonl"
    assert "ValueError: poison line 2" in figures["errors_detail"][0]["error"]


def test_a_big_backlog_is_batched(
    prefect_api: str, linecount: Any, data_dir: Path, db: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    for i in range(450):
        write_session(data_dir, f"u{i % 7}/s{i}.jsonl", [user_line(str(i))])
    figures = run("linecount", data_dir, db)
    assert figures["processed"] == 450
    (flow_run_id,) = _rows(db, "SELECT flow_run_id FROM processor_runs")[0]
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert 1 < len(task_runs) <= MAX_TASK_RUNS
    assert _rows(db, "SELECT count(*), count(DISTINCT session_file) FROM linecount_lines") == [
        (450, 450)
    ]


def test_a_long_run_shows_its_progress_in_the_ui(
    prefect_api: str, linecount: Any, monkeypatch: pytest.MonkeyPatch, data_dir: Path, db: Path
) -> None:
    """A run of more than 5 s publishes a progress artifact, at 100% when it ends."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    monkeypatch.setenv("SP_TEST_SLEEP", "0.3")
    for i in range(30):  # ~9 s of reading: a progress report after 5 s, and the last at the end
        write_session(data_dir, f"u{i % 3}/s{i}.jsonl", [user_line(str(i))])
    assert run("linecount", data_dir, db)["processed"] == 30
    (flow_run_id,) = _rows(db, "SELECT flow_run_id FROM processor_runs")[0]
    with get_client(sync_client=True) as client:
        (progress,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["linecount-run-progress"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert "30/30 sessions" in (progress.description or "")


def test_a_second_run_of_the_same_processor_is_refused(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch, data_dir: Path, db: Path
) -> None:
    from prefect.concurrency.sync import concurrency

    write_session(data_dir, "alice/s.jsonl", [user_line("x")])
    run("usage", data_dir, db)  # creates the limit (and waits out a slot an earlier test left)
    monkeypatch.setattr(processor_flow, "LOCK_WAIT_SECONDS", 1.0)
    with (
        concurrency(limit_name("usage"), occupy=1, strict=True),
        pytest.raises(RunRefused, match="Processor 'usage' is already running"),
    ):
        run("usage", data_dir, db)
    assert _rows(db, "SELECT count(*) FROM processor_runs") == [(1,)]


def test_cli_run_all_prints_the_figures(
    prefect_api: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, db: Path
) -> None:
    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    assert main(["run", "--all", "--data-dir", str(data_dir), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "processor",
        "scanned",
        "processed",
        "skipped",
        "errors",
        "quarantined",
        "held",
        "items",
    ]
    assert out.splitlines()[2].split()[:3] == ["usage", "7", "7"]


def test_two_processors_in_two_processes_at_once(
    prefect_api: str, linecount: Any, data_dir: Path, db: Path
) -> None:
    """Both finish although they share one DuckDB file, and `status` answers meanwhile."""
    for i in range(30):
        write_session(data_dir, f"u{i % 3}/s{i}.jsonl", [user_line(str(i)), user_line("more")])
    exe = str(Path(sys.executable).with_name("session-pipeline"))
    env = subprocess_env(prefect_api, SP_TEST_SLEEP="0.1")
    args = ["--data-dir", str(data_dir), "--db", str(db), "--json"]
    procs = [
        subprocess.Popen(
            [exe, "run", name, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("usage", "linecount")
    ]
    statuses = 0
    deadline = time.monotonic() + 240
    while not db.exists() and time.monotonic() < deadline:  # `status` needs a state file
        time.sleep(0.05)
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        status = subprocess.run(
            [exe, "status", "--db", str(db)], env=env, capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 0, status.stderr
        statuses += 1
        time.sleep(0.2)
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert statuses >= 1
    assert _rows(
        db,
        "SELECT processor_name, count(*) FROM session_processor_state WHERE status = 'ok' GROUP BY 1 ORDER BY 1",
    ) == [
        ("linecount", 30),
        ("usage", 30),
    ]
    assert _rows(db, "SELECT count(*) FROM linecount_lines") == [(60,)]
    assert _rows(db, "SELECT processor_name FROM processor_runs ORDER BY 1") == [
        ("linecount",),
        ("usage",),
    ]


def test_a_slot_release_that_fails_does_not_fail_a_finished_run(
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    data_dir: Path,
    db: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server gone at the very end: the work is committed, so the run completes and says
    the slot frees itself when its lease expires (the slot is really released here, then the
    release reports an error, as a dropped connection would)."""
    import httpx

    real = processor_flow.ProcessorSlot.release

    def release_fails(self: processor_flow.ProcessorSlot) -> None:
        real(self)
        raise httpx.ConnectError("All connection attempts failed")

    monkeypatch.setattr(processor_flow.ProcessorSlot, "release", release_fails)
    write_session(data_dir, "alice/s.jsonl", [user_line("x")])
    figures = run("usage", data_dir, db)
    assert figures["processed"] == 1 and figures["errors"] == 0
    assert "could not release the concurrency slot session-pipeline-usage" in caplog.text
    assert _rows(db, "SELECT status FROM processor_runs") == [("completed",)]
