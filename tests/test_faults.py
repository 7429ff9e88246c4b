"""Faults: runs killed with SIGKILL, the Prefect server restarted under a run, the state
database held by another process past the retry budget, and session files that change between
the scan and the read. Real processes, real files, real servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from flows import pipeline
from flows.doctor import doctor
from flows.names import limit_name
from flows.pipeline import run_direct
from flows.prefect_api import PrefectAPI
from processors.base import ProcessResult
from processors.session import Session
from processors.usage import UsageProcessor
from state.db import StateError, connect
from tests.conftest import EXAMPLES, subprocess_env, user_line, write_session

EXE = str(Path(sys.executable).with_name("session-pipeline"))
PREFECT = str(Path(sys.executable).with_name("prefect"))
USAGE_TABLES = ("usage_events", "usage_requests", "usage_sessions")
STATE_SQL = (
    "SELECT session_file, items_extracted, file_hash, status, size_bytes, malformed_lines "
    "FROM session_processor_state WHERE processor_name = ?"
)


# helpers ------------------------------------------------------------------------------------


def _rows(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connect(db, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def _peek(db: Path, sql: str) -> tuple[Any, ...] | None:
    """One row, or None while the database does not exist yet or is busy (never waits long:
    a watcher must not hold up the run it watches)."""
    try:
        with connect(db, read_only=True, lock_timeout=0.5) as con:
            return con.execute(sql).fetchone()
    except StateError:
        return None


def _wait_for(
    what: str, check: Callable[[], bool], timeout: float, alive: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert alive.poll() is None, f"the run ended (rc {alive.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def make_corpus(data_dir: Path, count: int) -> None:
    """`count` sessions varied from the bundled samples: new session ids (in the names and the
    lines), five users per sample user, and a subagent transcript with its meta file for every
    copy of the session that has one."""
    sources = sorted(EXAMPLES.glob("*/*.jsonl"))
    subagents = {p.parent.parent.name: p.parent for p in EXAMPLES.glob("*/*/subagents/*.jsonl")}
    for i in range(count):
        src = sources[i % len(sources)]
        new = str(uuid.UUID(int=0xFA17 << 64 | i))
        user_dir = data_dir / f"{src.parent.name}{i % 5}"
        user_dir.mkdir(parents=True, exist_ok=True)
        (user_dir / f"{new}.jsonl").write_text(src.read_text().replace(src.stem, new))
        if src.stem in subagents:
            shutil.copytree(subagents[src.stem], user_dir / new / "subagents")


def _comparable(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows in one order whichever database gave them, floats to 12 significant digits (sums
    of costs may add up in another order)."""
    fixed = [tuple(float(f"{v:.12g}") if isinstance(v, float) else v for v in r) for r in rows]
    return sorted(fixed, key=lambda r: tuple((v is None, v if v is not None else 0) for v in r))


def _tables(db: Any, names: tuple[str, ...], processor: str) -> dict[str, list[tuple[Any, ...]]]:
    with connect(db, read_only=True) as con:
        out = {t: _comparable(con.execute(f"SELECT * FROM {t}").fetchall()) for t in names}
        out["state"] = _comparable(con.execute(STATE_SQL, [processor]).fetchall())
    return out


# kill -9 ------------------------------------------------------------------------------------

# 172 sessions, plus a subagent transcript for one in six of them: 201 files, so two per
# batch and 101 commits.
CORPUS = 172
# Where to kill, in session files committed (cumulative across runs): at the run's first commit,
# then about a third and two thirds of the way.
KILL_AT = (0, CORPUS // 3, 2 * CORPUS // 3)

# The CLI, waiting to be killed once it has committed at least argv[1] more session files
# (marker file argv[2] says so): racing a free-running run let it finish between two looks at
# the database once commits got cheap.
PAUSING_CLI = """
import sys, time
from pathlib import Path
from flows import pipeline
from flows.cli import main
flush, left, marker = pipeline.Committer.flush, int(sys.argv[1]), Path(sys.argv[2])
def flush_then_wait(self):
    global left
    left -= sum(1 for o in self.pending if not o.partial)
    flush(self)
    if left <= 0:
        marker.touch()
        time.sleep(600)
pipeline.Committer.flush = flush_then_wait
sys.exit(main(sys.argv[3:]))
"""


def _single_batch_run(data_dir: Path, db: Path) -> Any:
    """A clean run without Prefect, cut into one batch and so one commit (a run cut into 200
    commits costs as many DuckDB opens): its rows must not depend on the batching either."""
    original = pipeline.batches
    pipeline.batches = lambda candidates, max_tasks=1: original(candidates, 1)  # type: ignore[assignment]
    try:
        return run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    finally:
        pipeline.batches = original  # type: ignore[assignment]


@pytest.mark.e2e
def test_runs_killed_at_several_points_end_row_for_row_equal_to_a_clean_run(
    prefect_api: str, tmp_path: Path, state_db: Any
) -> None:
    """On either backend; the clean run is always on the embedded file, so on PostgreSQL this
    also shows both backends store the same rows."""
    data_dir, clean_db, db = tmp_path / "sessions", tmp_path / "clean.duckdb", state_db
    make_corpus(data_dir, CORPUS)
    total = sum(1 for _ in data_dir.rglob("*.jsonl"))
    clean = _single_batch_run(data_dir, clean_db)
    assert clean.processed == total > CORPUS and clean.errors == 0
    args = ["run", "usage", "--json", "--data-dir", str(data_dir), "--db", str(db)]
    env = subprocess_env(prefect_api, SESSION_PIPELINE_COMMIT_SECONDS="0")  # commit every task
    marker = tmp_path / "paused"
    committed_at_kill = []
    with PrefectAPI(prefect_api) as api:
        for target in KILL_AT:
            before = (_peek(db, "SELECT count(*) FROM session_processor_state") or (0,))[0]
            marker.unlink(missing_ok=True)
            with (tmp_path / "killed.log").open("ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", PAUSING_CLI, str(target - before), str(marker), *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                _wait_for("the run to pause after a commit", marker.exists, 120, proc)
                os.kill(proc.pid, signal.SIGKILL)
            finally:
                _kill(proc)
            # The documented recovery: the zombie is crashed and its leaked slot freed.
            report = doctor(db, api)
            assert proc.returncode == -signal.SIGKILL
            (committed,) = _rows(db, "SELECT count(*) FROM session_processor_state")[0]
            assert target <= committed < total, "the kill did not land mid-run"
            committed_at_kill.append(committed)
            assert len(report.crashed) == 1 and report.slots_freed == [limit_name("usage")]
            assert not report.errors, report.lines()
        final = subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=180)
        assert final.returncode == 0, final.stderr[-3000:]
        assert doctor(db, api).clean
    figures = orjson.loads(final.stdout)
    assert figures["errors"] == 0 and figures["scanned"] == total
    assert figures["processed"] == total - committed_at_kill[-1]
    assert _rows(db, "SELECT status, count(*) FROM processor_runs GROUP BY 1 ORDER BY 1") == [
        ("completed", 1),
        ("crashed", len(KILL_AT)),
    ]
    expected, got = _tables(clean_db, USAGE_TABLES, "usage"), _tables(db, USAGE_TABLES, "usage")
    for table, rows in expected.items():
        assert len(got[table]) == len(rows), table
        assert got[table] == rows, table
    assert all(len(expected[t]) > 0 for t in expected)


# A big file is read in segments, each committed with a state row saying how far the read got.
# After its first segment is committed the run waits to be killed: racing a free-running read
# let CI's faster machine finish all segments between two looks at the database.
SEGMENTED_RUN = """
import sys, time
from pathlib import Path
from flows import pipeline, work
from flows.pipeline import run_direct
from processors.usage import UsageProcessor
work.SEGMENT_BYTES = 64 * 1024
commit_now = pipeline.Committer.commit_now
def commit_then_wait(self, outcome):
    commit_now(self, outcome)
    Path(sys.argv[3]).touch()
    time.sleep(600)
pipeline.Committer.commit_now = commit_then_wait
run_direct(UsageProcessor(), Path(sys.argv[1]), Path(sys.argv[2]), max_attempts=5)
"""


def test_a_big_file_killed_between_segments_continues_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.corpus import big_session
    from flows import work
    from flows.pipeline import prepare

    data_dir, clean_db, db = tmp_path / "sessions", tmp_path / "clean.duckdb", tmp_path / "k.duckdb"
    big = data_dir / "alice" / "5e55b16a-0000-4000-a000-000000000001.jsonl"
    big.parent.mkdir(parents=True)
    big_session(big, 3 << 20)
    size = big.stat().st_size
    clean = run_direct(UsageProcessor(), data_dir, clean_db, max_attempts=5)  # one read
    assert (clean.processed, clean.errors) == (1, 0)
    partial = (
        "SELECT count(*) FROM session_processor_state "
        f"WHERE status = 'ok' AND complete_offset BETWEEN 1 AND {size // 2}"
    )
    committed = tmp_path / "first-segment-committed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SEGMENTED_RUN, str(data_dir), str(db), str(committed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for("a segment committed", committed.exists, 120, proc)
        assert _rows(db, partial) == [(1,)]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _kill(proc)
    ((offset, stored_size),) = _rows(
        db, "SELECT complete_offset, size_bytes FROM session_processor_state"
    )
    assert 0 < offset == stored_size < size  # how far the killed read got, committed
    (candidate,) = prepare(UsageProcessor(), data_dir, db).candidates
    assert (candidate.reason, candidate.resume_offset) == ("append", offset)
    monkeypatch.setattr(work, "SEGMENT_BYTES", 64 * 1024)
    again = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert (again.processed, again.errors) == (1, 0)
    assert _tables(db, USAGE_TABLES, "usage") == _tables(clean_db, USAGE_TABLES, "usage")


# the Prefect server restarted during a run ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrefectServer:
    """`prefect server start` in its own process group, with its own home, restartable on the
    same port; leases kept on disk as `serve` configures it."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=(
                "prefect.server.concurrency.lease_storage.filesystem"
            ),
        )

    def start(self, timeout: float = 120) -> float:
        """Start and wait until healthy; returns the start-up time."""
        started = time.monotonic()
        argv = [PREFECT, "server", "start", "--no-ui", "--host", "127.0.0.1"]
        with (self.home / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while True:
            assert self.proc.poll() is None, (self.home / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            assert time.monotonic() - started < timeout, "Prefect server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture
def own_prefect_server(tmp_path: Path) -> Iterator[PrefectServer]:
    home = tmp_path / "prefect-home"
    home.mkdir()
    server = PrefectServer(home)
    server.start()
    try:
        yield server
    finally:
        server.stop()


SESSIONS_ACROSS_RESTART = 40


@pytest.mark.e2e
def test_a_run_survives_a_prefect_server_restart(
    own_prefect_server: PrefectServer, linecount: Any, data_dir: Path, db: Path, tmp_path: Path
) -> None:
    server = own_prefect_server
    for i in range(SESSIONS_ACROSS_RESTART):
        write_session(data_dir, f"u{i % 4}/s{i}.jsonl", [user_line(f"x{i}"), user_line("y")])
    # One task run at a time, 0.3 s per session: ~12 s of work the restart lands inside.
    env = subprocess_env(
        server.url,
        SP_TEST_SLEEP="0.3",
        PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS="1",
        SESSION_PIPELINE_COMMIT_SECONDS="0",
    )
    args = ["run", "linecount", "--json", "--data-dir", str(data_dir), "--db", str(db)]
    err = tmp_path / "run.err"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([EXE, *args], env=env, stdout=subprocess.PIPE, stderr=stderr)
    count = "SELECT count(*) FROM session_processor_state"
    try:
        _wait_for("5 commits", lambda: (_peek(db, count) or (0,))[0] >= 5, 120, proc)
        server.stop()
        # Down for a while: the run does not fail. (A batch already started goes on and
        # commits; a new one waits, because each task run takes its tags' concurrency slots
        # through the API, retrying for ~60 s: 5 retries, 2**n s apart.)
        time.sleep(3)
        assert proc.poll() is None
        restart_seconds = server.start()
        out, _ = proc.communicate(timeout=180)
    finally:
        _kill(proc)
    stderr_text = err.read_text()
    ((status, processed, finished_at),) = _rows(
        db, "SELECT status, processed, finished_at FROM processor_runs"
    )
    # Measured: the run waits out the restart and ends Completed (task-run events sent while
    # the server was down may be lost, with a warning, in some runs). (Had the
    # server still been down when the run released its slot, the run would have ended Failed
    # with a ConnectError after committing everything: seen while building this test.)
    assert proc.returncode == 0, stderr_text[-3000:]
    figures = orjson.loads(out)
    assert figures["processed"] == SESSIONS_ACROSS_RESTART and figures["errors"] == 0
    assert (status, processed) == ("completed", SESSIONS_ACROSS_RESTART) and finished_at
    with PrefectAPI(server.url) as api:
        (flow_run_id,) = _rows(db, "SELECT flow_run_id FROM processor_runs")[0]
        assert api.flow_run(flow_run_id)["state_type"] == "COMPLETED"
        limit = api.limit(limit_name("linecount"))
        assert limit is not None and limit["active_slots"] == 0  # the lease survived, released
    # A following run starts at once (no leaked slot) and finds every session done once.
    started = time.monotonic()
    again = subprocess.run(
        [EXE, *args], env=subprocess_env(server.url), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - started < 25
    figures = orjson.loads(again.stdout)
    assert (figures["processed"], figures["skipped"]) == (0, SESSIONS_ACROSS_RESTART)
    assert _rows(
        db, "SELECT count(*), count(DISTINCT (session_file, line_no)) FROM linecount_lines"
    ) == [(2 * SESSIONS_ACROSS_RESTART, 2 * SESSIONS_ACROSS_RESTART)]
    assert _rows(db, "SELECT DISTINCT status FROM session_processor_state") == [("ok",)]
    assert restart_seconds < 120


# the state database held past the retry budget -------------------------------------------------

HOLD = """
import sys, time, duckdb
while True:
    try:
        con = duckdb.connect(sys.argv[1])
        break
    except duckdb.IOException:
        time.sleep(0.01)
print("held", flush=True)
time.sleep(120)
"""


def _hold(db: Path) -> subprocess.Popen[str]:
    """Another process that opens the database read-write as soon as it can and keeps it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.e2e
def test_a_database_held_past_the_retry_budget_fails_the_run_cleanly_and_loses_nothing(
    prefect_api: str, linecount: Any, data_dir: Path, db: Path, tmp_path: Path
) -> None:
    for i in range(10):
        write_session(data_dir, f"alice/old{i}.jsonl", [user_line(f"old {i}")])
    run_direct(linecount, data_dir, db, max_attempts=5)
    before = _rows(db, "SELECT * FROM linecount_lines ORDER BY ALL")
    for i in range(20):
        write_session(data_dir, f"bob/new{i}.jsonl", [user_line(f"new {i}"), user_line("more")])
    args = ["run", "linecount", "--data-dir", str(data_dir), "--db", str(db)]
    env = subprocess_env(
        prefect_api,
        SESSION_PIPELINE_DB_LOCK_TIMEOUT="1",
        SP_TEST_SLEEP="0.2",
        PREFECT_TASK_RUNNER_THREAD_POOL_MAX_WORKERS="1",
        SESSION_PIPELINE_COMMIT_SECONDS="0",
    )

    # 1. Held before the run starts: refused before Prefect is involved, one line.
    holder = _hold(db)
    try:
        started = time.monotonic()
        refused = subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        _kill(holder)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"session-pipeline: error: state database {db} stayed locked by another process for "
        "1s; nothing was written"
    ]
    assert elapsed < 15

    # 2. Taken in the middle of the run, past the retry budget of the next commit.
    err = tmp_path / "run.err"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([EXE, *args], env=env, stdout=subprocess.PIPE, stderr=stderr)
    holder = None
    try:
        count = "SELECT count(*) FROM session_processor_state WHERE session_file LIKE 'bob/%'"
        _wait_for("3 commits", lambda: (_peek(db, count) or (0,))[0] >= 3, 120, proc)
        holder = _hold(db)
        proc.wait(timeout=120)
    finally:
        _kill(proc)
        if holder is not None:
            _kill(holder)
    stderr_text = err.read_text()
    assert proc.returncode == 1, stderr_text[-3000:]
    last = stderr_text.splitlines()[-1]
    assert last == (
        f"session-pipeline: error: state database {db} stayed locked by another process for "
        "1s; nothing was written"
    )
    assert "Traceback" not in stderr_text
    # Nothing lost: the earlier rows are intact, each batch committed before the lock is whole.
    assert _rows(db, "SELECT * FROM linecount_lines WHERE username = 'alice' ORDER BY ALL") == (
        before
    )
    committed = _rows(
        db,
        "SELECT count(*) FROM session_processor_state WHERE session_file LIKE 'bob/%'",
    )[0][0]
    assert 3 <= committed < 20
    assert _rows(db, "SELECT count(*) FROM linecount_lines WHERE username = 'bob'") == [
        (2 * committed,)
    ]
    # The run could not close its ledger row (the database was held): doctor does.
    assert _rows(db, "SELECT status FROM processor_runs WHERE processed IS NULL") == [("running",)]
    with PrefectAPI(prefect_api) as api:
        report = doctor(db, api)
        assert len(report.stale_ledger) == 1 and not report.leaked_slots, report.lines()
    # 3. Released: the next run recovers, every session once.
    again = subprocess.run(
        [EXE, *args, "--json"],
        env=subprocess_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    figures = orjson.loads(again.stdout)
    assert figures["processed"] == 20 - committed and figures["errors"] == 0
    assert _rows(db, "SELECT count(*), count(DISTINCT session_file) FROM linecount_lines") == [
        (10 + 40, 30)
    ]
    assert _rows(db, "SELECT status, count(*) FROM session_processor_state GROUP BY 1") == [
        ("ok", 30)
    ]


# between scan and read ------------------------------------------------------------------------


def _three_sessions(data_dir: Path) -> dict[str, Path]:
    sources = sorted(EXAMPLES.glob("*/*.jsonl"))[:3]
    out = {}
    for name, src in zip(("a", "b", "c"), sources, strict=True):
        path = data_dir / "alice" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        out[name] = path
    return out


def _append(path: Path) -> None:
    with path.open("ab") as f:
        f.write(orjson.dumps(user_line("one more", ts="2026-12-01T00:00:00Z")) + b"\n")


def _after_planning(action: Callable[[], None]) -> Callable[[], None]:
    """Make `action` happen between the scan (in `prepare`) and the first read; returns the
    undo. The way tests/test_pipeline.py does it."""
    original = pipeline._prepare

    def prepare_then_act(*args: Any, **kwargs: Any) -> Any:
        the_plan = original(*args, **kwargs)
        action()
        return the_plan

    pipeline._prepare = prepare_then_act  # type: ignore[assignment]

    def undo() -> None:
        pipeline._prepare = original  # type: ignore[assignment]

    return undo


def _usage_rows(db: Path, key: str) -> list[tuple[Any, ...]]:
    return _rows(db, "SELECT * FROM usage_sessions WHERE session_file = ? ORDER BY ALL", [key])


def _stored(data_dir: Path, db: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Three sessions processed once, then all three appended to (all to read again)."""
    paths = _three_sessions(data_dir)
    first = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert first.processed == 3
    old = {name: _usage_rows(db, f"alice/{name}.jsonl") for name in paths}
    for path in paths.values():
        _append(path)
    return paths, old


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


FAILING_CHANGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "deleted": (lambda p: p.unlink(), "FileNotFoundError"),
    "replaced by a directory": (lambda p: _replace(p, lambda q: q.mkdir()), "UnsafeFileError"),
    # As root, chmod 000 does not stop a read: a dangling link stands in for an unreadable file.
    "replaced by a dangling link": (
        lambda p: _replace(p, lambda q: q.symlink_to(q.with_name("gone.jsonl"))),
        "FileNotFoundError",
    ),
}


@pytest.mark.parametrize("change", sorted(FAILING_CHANGES))
def test_a_file_gone_or_unreadable_between_scan_and_read_fails_with_a_reason(
    change: str, data_dir: Path, db: Path
) -> None:
    paths, old = _stored(data_dir, db)
    make_change, error = FAILING_CHANGES[change]
    undo = _after_planning(lambda: make_change(paths["b"]))
    try:
        figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    finally:
        undo()
    assert (figures.scanned, figures.processed, figures.errors) == (3, 2, 1)
    assert figures.errors_detail[0]["session"] == "alice/b.jsonl"
    assert figures.errors_detail[0]["error"].startswith(error)
    ((status, attempts, last_error),) = _rows(
        db,
        "SELECT status, attempts, last_error FROM session_processor_state "
        "WHERE session_file = 'alice/b.jsonl'",
    )
    assert (status, attempts) == ("failed", 1) and last_error.startswith(error)
    assert _usage_rows(db, "alice/b.jsonl") == old["b"]  # nothing stored is lost
    for name in ("a", "c"):  # the others are read again, with the appended line
        assert _usage_rows(db, f"alice/{name}.jsonl") != old[name]
    assert _rows(db, "SELECT status, errors FROM processor_runs ORDER BY started_at DESC")[0] == (
        "completed",
        1,
    )


def test_a_file_made_unreadable_between_scan_and_read_fails_with_a_reason(
    data_dir: Path, db: Path, tmp_path: Path
) -> None:
    if _reads_any_file(tmp_path):  # root reads it anyway: this test again, without that power
        _without_root_file_access(
            "tests/test_faults.py::"
            "test_a_file_made_unreadable_between_scan_and_read_fails_with_a_reason"
        )
        return
    paths, old = _stored(data_dir, db)
    undo = _after_planning(lambda: paths["b"].chmod(0))
    try:
        figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    finally:
        undo()
        paths["b"].chmod(0o644)
    assert (figures.processed, figures.errors) == (2, 1)
    assert figures.errors_detail[0]["error"].startswith("PermissionError")
    assert _usage_rows(db, "alice/b.jsonl") == old["b"]


def _reads_any_file(folder: Path) -> bool:
    """Whether this process can read a chmod-000 file (root, unless it lost that power)."""
    probe = folder / "chmod-000-probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
        return True
    except PermissionError:
        return False
    finally:
        probe.unlink()


def _without_root_file_access(test_id: str) -> None:
    """Run one test in a pytest of its own, still as root but without the capabilities that
    let root read any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: dropped from the bounding
    set before exec), and require that it passed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2

    def drop_file_access() -> None:
        for capability in (cap_dac_override, cap_dac_read_search):
            if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    try:
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id],
            cwd=Path(__file__).resolve().parent.parent,
            preexec_fn=drop_file_access,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.SubprocessError as error:  # no CAP_SETPCAP (a locked-down container)
        pytest.skip(f"cannot drop root's power to read any file here: {error}")
    assert child.returncode == 0 and "1 passed" in child.stdout, (
        child.stdout[-3000:] + child.stderr[-2000:]
    )


def _lines_of(db: Path, key: str) -> int:
    return _rows(db, "SELECT lines FROM usage_sessions WHERE session_file = ?", [key])[0][0]


def test_a_file_truncated_or_replaced_by_a_shorter_one_is_read_as_it_is_at_open(
    data_dir: Path, db: Path
) -> None:
    """Size and mtime are taken when the file is opened, so a file cut or swapped before that
    is simply read as it then is, and its state row describes exactly those bytes."""
    paths, _ = _stored(data_dir, db)
    body = paths["a"].read_bytes()
    cut = body[: body.index(b"\n", len(body) // 2) + 1 + 10]  # half, plus a partial line

    def change() -> None:
        with paths["a"].open("r+b") as f:
            f.truncate(len(cut))
        shorter = paths["c"].with_name("c.tmp")
        write_session(data_dir, "alice/c.tmp", [user_line("short")])
        os.replace(shorter, paths["c"])

    undo = _after_planning(change)
    try:
        figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    finally:
        undo()
    assert (figures.processed, figures.errors) == (3, 0)
    state = dict(
        (key, (size, digest))
        for key, size, digest in _rows(
            db, "SELECT session_file, size_bytes, file_hash FROM session_processor_state"
        )
    )
    import hashlib

    assert state["alice/a.jsonl"][0] == len(cut)
    # the hash covers the bytes read; the partial last line waits for the next run
    assert state["alice/a.jsonl"][1] == hashlib.sha256(cut).hexdigest()
    assert _lines_of(db, "alice/a.jsonl") == cut.count(b"\n")
    assert state["alice/c.jsonl"][0] == paths["c"].stat().st_size
    assert _lines_of(db, "alice/c.jsonl") == 1
    again = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert (again.processed, again.skipped) == (0, 3)


class TruncatingUsage(UsageProcessor):
    """The usage processor, but the file is cut to a few bytes after it was opened (its size
    already taken) and before a byte of it is read."""

    def __init__(self, victim: Path) -> None:
        super().__init__()
        self.victim = victim

    def process(self, session: Session) -> ProcessResult:
        if session.path == self.victim:
            with self.victim.open("r+b") as f:
                f.truncate(10)
        return super().process(session)

    def process_increment(self, session: Session, checkpoint: Any | None) -> Any:
        if session.path == self.victim:
            with self.victim.open("r+b") as f:
                f.truncate(10)
        return super().process_increment(session, checkpoint)


def test_a_file_truncated_while_being_read_fails_with_a_reason(data_dir: Path, db: Path) -> None:
    paths, old = _stored(data_dir, db)
    figures = run_direct(TruncatingUsage(paths["b"]), data_dir, db, max_attempts=5)
    assert (figures.processed, figures.errors) == (2, 1)
    assert figures.errors_detail[0]["error"].startswith(
        "FileChangedError: file shrank while being read"
    )
    assert _usage_rows(db, "alice/b.jsonl") == old["b"]
    # the next run reads it as it now is
    again = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    assert (again.processed, again.errors) == (1, 0)


def test_a_file_replaced_by_a_fifo_between_scan_and_read_does_not_hang_the_run(
    data_dir: Path, db: Path
) -> None:
    paths, old = _stored(data_dir, db)
    undo = _after_planning(lambda: _replace(paths["b"], lambda q: os.mkfifo(q)))
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(f=run_direct(UsageProcessor(), data_dir, db, max_attempts=5)),
        daemon=True,
    )
    try:
        worker.start()
        worker.join(timeout=2)
        hung = worker.is_alive()
        if hung:  # let it go: a writer that opens and closes gives the reader an EOF
            os.close(os.open(paths["b"], os.O_WRONLY))
            worker.join(timeout=30)
    finally:
        undo()
    assert not worker.is_alive()
    assert not hung, "the run blocked opening a FIFO"
    figures = result["f"]
    assert (figures.processed, figures.errors) == (2, 1)
    assert figures.errors_detail[0]["error"].startswith(
        "UnsafeFileError: alice/b.jsonl is no longer a regular file"
    )
    assert _usage_rows(db, "alice/b.jsonl") == old["b"]


def test_a_file_swapped_for_a_link_outside_between_scan_and_read_is_not_read(
    data_dir: Path, db: Path, tmp_path: Path
) -> None:
    paths, old = _stored(data_dir, db)
    outside = tmp_path / "elsewhere" / "private.jsonl"
    write_session(tmp_path, "elsewhere/private.jsonl", [user_line("not yours")] * 3)
    undo = _after_planning(lambda: _replace(paths["b"], lambda q: q.symlink_to(outside)))
    try:
        figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=5)
    finally:
        undo()
    assert figures.processed == 2 and figures.errors == 1
    assert figures.errors_detail[0]["error"].startswith(
        "UnsafeFileError: alice/b.jsonl now points outside the data dir"
    )
    assert _usage_rows(db, "alice/b.jsonl") == old["b"]
