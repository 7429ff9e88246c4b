"""The shared backend as users meet it: the command line on a PostgreSQL URL, its one-line
errors, and the run lock that holds across processes and hosts (a real server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from state.db import connect, processor_lock
from state.hostlock import ProcessorBusyError
from tests.conftest import ROOT, user_line, write_session


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _env(db: Any, data_dir: Path, plugins: Path) -> dict[str, str]:
    return {
        "SESSION_PIPELINE_DB": str(db),
        "SESSION_DATA_DIR": str(data_dir),
        "PYTHONPATH": os.pathsep.join([str(plugins), str(ROOT)]),
    }


def test_run_status_and_query_on_postgresql(pg_db: Any, data_dir: Path, test_plugins: Path) -> None:
    write_session(data_dir, "alice/s1.jsonl", [user_line("one"), user_line("two")])
    write_session(data_dir, "bob/s2.jsonl", [user_line("three")])
    env = _env(pg_db, data_dir, test_plugins)
    assert not pg_db.exists()
    missing = _cli("status", env=env)
    assert missing.returncode != 0 and "no state yet" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    ran = _cli("run", "linecount", env=env)
    assert ran.returncode == 0, ran.stderr
    assert pg_db.exists()
    status = _cli("status", env=env)
    assert status.returncode == 0, status.stderr
    line = next(row for row in status.stdout.splitlines() if row.startswith("linecount"))
    assert line.split()[1:3] == ["2", "2"]  # known, processed
    query = _cli(
        "query",
        "SELECT username, count(*) AS lines FROM linecount_lines GROUP BY 1 ORDER BY 1",
        "--json",
        env=env,
    )
    assert query.returncode == 0, query.stderr
    assert '"username": "alice"' in query.stdout
    again = _cli("run", "linecount", env=env)
    assert again.returncode == 0 and " 0 " in again.stdout.splitlines()[2]

    refused = _cli("query", "DELETE FROM linecount_lines", env=env)
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    with connect(pg_db) as con:
        assert con.execute("SELECT count(*) FROM linecount_lines").fetchone() == (3,)


def test_an_unreachable_server_is_one_line(data_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    result = _cli(
        "run",
        "usage",
        env={
            "SESSION_PIPELINE_DB": f"postgresql://postgres@127.0.0.1:{port}/postgres",
            "SESSION_DATA_DIR": str(data_dir),
        },
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:{port}" in result.stderr


def test_the_run_lock_is_one_per_processor_and_goes_with_a_killed_holder(pg_db: Any) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from state.db import location, processor_lock\n"
            "with processor_lock(location(sys.argv[1]), 'usage'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
            str(pg_db),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(
            ProcessorBusyError, match=r"'usage' is already running \(session-pipeline"
        ), processor_lock(pg_db, "usage"):
            pass
        with processor_lock(pg_db, "verification"):  # another processor runs at the same time
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 30
        while True:  # the server notices the closed socket at once; allow it a moment
            try:
                with processor_lock(pg_db, "usage"):
                    break
            except ProcessorBusyError:
                assert time.monotonic() < deadline, "the killed holder's lock stayed"
                time.sleep(0.1)
    finally:
        holder.kill()
        holder.wait()


def test_locks_of_two_schemas_are_apart(pg_db: Any, postgres_url: str) -> None:
    from state.db import location
    from tests.conftest import postgres_schema_url

    other = location(postgres_schema_url(postgres_url, "test_other_team"))
    with processor_lock(pg_db, "usage"), processor_lock(other, "usage"):
        pass


HOLDER_ON_ANOTHER_HOST = """
import sys, time
from state import postgres_backend
from state.db import location, processor_lock
postgres_backend.socket.gethostname = lambda: "worker-b"  # the run's host, as its ledger says
with processor_lock(location(sys.argv[1]), "usage"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_doctor_judges_a_run_on_another_host_by_its_lock(pg_db: Any) -> None:
    """Prefect OSS leaves a dead worker's run Running; with a shared state, `doctor` on any
    host tells whether that run is alive: only a live run holds its processor's lock."""
    from datetime import UTC, datetime

    from flows.doctor import LedgerRow, _judge, stale_ledger

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_ON_ANOTHER_HOST, str(pg_db)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        now = datetime.now(UTC)
        row = LedgerRow("r1", "usage", "f1", "running", "worker-b", holder.pid, now)
        run = {"id": "f1", "parameters": {}}
        verdict = _judge(run, {"f1": row}, pg_db, "worker-a", now)
        assert verdict.alive is True, verdict.reason
        stale = LedgerRow("r0", "usage", "f0", "running", "worker-b", 1, now)
        verdict = _judge({"id": "f0", "parameters": {}}, {"f0": stale}, pg_db, "worker-a", now)
        assert verdict.alive is False and "lost its lock" in verdict.reason
        # rows still 'running' whose flow run is over (Crashed by an automation) or that had
        # none: the live one is left alone, the dead one is found, from another host
        found = stale_ledger([row, stale], set(), pg_db, "worker-a")
        who = f"session-pipeline worker-b pid {holder.pid}"
        assert [(f.name, f.reason) for f in found] == [
            ("r0", f"process 1 on worker-b lost its lock ({who} holds it)")
        ]
        assert stale_ledger([row, stale], {"f0"}, pg_db, "worker-a") == []  # still watched
        holder.kill()
        holder.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (verdict := _judge(run, {"f1": row}, pg_db, "worker-a", now)).alive:
            assert time.monotonic() < deadline, verdict.reason
            time.sleep(0.1)
        assert verdict.alive is False and "nobody holds it" in verdict.reason
        assert [f.name for f in stale_ledger([row, stale], set(), pg_db, "worker-a")] == [
            "r1",
            "r0",
        ]
    finally:
        holder.kill()
        holder.wait()


def test_a_run_leaves_unchanged_views_alone_while_analysts_read_them(
    pg_db: Any, data_dir: Path
) -> None:
    """Replacing a view waits for every query reading it: a run's start must not wait for
    (and hold up) an analyst's report when its views did not change."""
    import psycopg

    from flows.pipeline import run_direct
    from processors.usage import UsageProcessor
    from state import store
    from state.db import transaction
    from tests.conftest import EXAMPLES

    run_direct(UsageProcessor(), EXAMPLES, pg_db, max_attempts=5)
    with psycopg.connect(str(pg_db)) as analyst:  # a report in progress
        analyst.execute("SELECT count(*) FROM usage_sessions").fetchone()
        with connect(pg_db) as con:
            con.execute("SET lock_timeout = '2s'")
            with transaction(con):
                assert store.ensure_outputs(con, UsageProcessor()) == []
        analyst.rollback()

    class Renamed(UsageProcessor):
        views = (
            *UsageProcessor.views,
            "CREATE OR REPLACE VIEW usage_extra AS SELECT 1 AS one",
        )

    with connect(pg_db) as con, transaction(con):
        store.ensure_outputs(con, Renamed())
        assert con.execute("SELECT one FROM usage_extra").fetchall() == [(1,)]


def test_the_server_notices_a_vanished_host_within_seconds(pg_db: Any) -> None:
    """A host that disappears without closing its sockets (power loss) must not keep its run
    lock for the server's default keepalive of two hours: every connection, the lock's
    included, asks the server to probe it after 10 s and give up within about 25 s."""
    with connect(pg_db) as con:
        settings = {
            name: con.execute(f"SHOW {name}").fetchone()
            for name in ("tcp_keepalives_idle", "tcp_keepalives_count", "tcp_user_timeout")
        }
    assert settings == {
        "tcp_keepalives_idle": ("10",),
        "tcp_keepalives_count": ("3",),
        "tcp_user_timeout": ("25000",),
    }
