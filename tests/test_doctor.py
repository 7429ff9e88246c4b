"""doctor against a real Prefect server: real runs, really killed, a real DuckDB ledger."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows import doctor as doctor_module
from flows.doctor import SlotFinding, doctor, process_alive
from flows.names import flow_name, limit_name
from flows.prefect_api import PrefectAPI
from state.db import StateError, connect
from tests.conftest import subprocess_env, user_line, write_session

pytestmark = pytest.mark.e2e
EXE = str(Path(sys.executable).with_name("session-pipeline"))
SLOT = limit_name("linecount")


def _rows(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connect(db, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def _start_run(
    api_url: str, data_dir: Path, db: Path, log: Path, sleep: float
) -> subprocess.Popen[bytes]:
    """`session-pipeline run linecount` in its own process, sleeping `sleep` s per session."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [EXE, "run", "linecount", "--data-dir", str(data_dir), "--db", str(db)],
            env=subprocess_env(api_url, SP_TEST_SLEEP=str(sleep)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for_ledger(db: Path, proc: subprocess.Popen[bytes], log: Path) -> tuple[str, str, int]:
    """(run_id, flow_run_id, pid) of the run once it is in the ledger as 'running'."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            rows = _rows(
                db, "SELECT run_id, flow_run_id, pid FROM processor_runs WHERE status = 'running'"
            )
        except StateError:  # not created yet, or briefly locked by the run
            rows = []
        if rows:
            return rows[0]
        time.sleep(0.2)
    raise AssertionError(f"no ledger row after 90 s:\n{log.read_text()[-2000:]}")


def _state(api: PrefectAPI, flow_run_id: str) -> str:
    return str(api.flow_run(flow_run_id)["state_type"])


def _slots(api: PrefectAPI) -> int:
    limit = api.limit(SLOT)
    return int(limit["active_slots"]) if limit else 0


def _wait_for_slot(api: PrefectAPI, taken: int) -> None:
    deadline = time.monotonic() + 30
    while _slots(api) != taken:
        assert time.monotonic() < deadline, f"{SLOT} never had {taken} active slot(s)"
        time.sleep(0.1)


@dataclass
class Zombie:
    run_id: str
    flow_run_id: str
    pid: int
    killed_at: float  # time.monotonic() when it was killed


@pytest.fixture
def api(prefect_api: str) -> Iterator[PrefectAPI]:
    with PrefectAPI(prefect_api) as client:
        yield client


@pytest.fixture
def sessions(data_dir: Path) -> Path:
    write_session(data_dir, "alice/s1.jsonl", [user_line("one"), user_line("two")])
    return data_dir


@pytest.fixture
def zombie(
    prefect_api: str, api: PrefectAPI, linecount: Any, sessions: Path, db: Path, tmp_path: Path
) -> Iterator[Zombie]:
    """A run killed with SIGKILL while processing: Prefect still says Running and its
    global slot stays taken. Whatever a test leaves of it is fixed afterwards."""
    log = tmp_path / "zombie.log"
    proc = _start_run(prefect_api, sessions, db, log, sleep=600)
    try:
        run_id, flow_run_id, pid = _wait_for_ledger(db, proc, log)
        _wait_for_slot(api, 1)
        assert pid == proc.pid  # the CLI runs the flow in-process
    finally:
        proc.kill()
        killed_at = time.monotonic()
        proc.wait(timeout=30)
    assert _state(api, flow_run_id) == "RUNNING" and _slots(api) == 1
    yield Zombie(run_id, flow_run_id, pid, killed_at)
    doctor(db, api)  # leave the shared server clean for the next test


def test_a_killed_run_is_crashed_and_its_slot_freed(
    prefect_api: str, api: PrefectAPI, zombie: Zombie, sessions: Path, db: Path, tmp_path: Path
) -> None:
    time.sleep(1)  # still Running a while after its process died: Prefect does not notice
    assert _state(api, zombie.flow_run_id) == "RUNNING" and _slots(api) == 1

    report = doctor(db, api)

    assert [z.flow_run_id for z in report.zombies] == [zombie.flow_run_id]
    assert f"process {zombie.pid}" in report.zombies[0].reason
    assert report.crashed == [zombie.flow_run_id]
    assert report.ledger_closed == [zombie.run_id]
    name = report.zombies[0].name
    assert report.leaked_slots == [SlotFinding("linecount", SLOT, 1, (name,))]
    assert report.slots_freed == [SLOT]
    assert not report.unchecked and not report.errors and not report.clean
    lines = report.lines()
    assert len(lines) == 2
    assert lines[0].startswith("zombie run linecount-") and lines[0].endswith("marked Crashed")
    assert lines[1] == (
        f"leaked slot: {SLOT} has 1 active slot(s) held by dead run {name}; released its lease"
    )
    run = api.flow_run(zombie.flow_run_id)
    assert run["state_type"] == "CRASHED" and "doctor" in run["state"]["message"]
    assert _slots(api) == 0
    ((status, finished),) = _rows(
        db, "SELECT status, finished_at FROM processor_runs WHERE run_id = ?", [zombie.run_id]
    )
    assert status == "crashed" and finished is not None

    # The processor is usable again at once (a leaked slot would refuse it after 30 s).
    started = time.monotonic()
    again = subprocess.run(
        [EXE, "run", "linecount", "--json", "--data-dir", str(sessions), "--db", str(db)],
        env=subprocess_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert '"processed": 1' in again.stdout
    assert time.monotonic() - started < 25
    assert doctor(db, api).clean


def _run_output(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return code, log.read_text(errors="replace")


def test_slow_the_dead_runs_lease_expiring_never_frees_a_live_runs_slot(
    prefect_api: str, api: PrefectAPI, zombie: Zombie, sessions: Path, db: Path, tmp_path: Path
) -> None:
    """SLOW (~100 s: it waits out the 60 s lease, Prefect's shortest, and the server's 15 s
    expiry loop). Kill a run, doctor, then a long run spanning the moment the dead run's
    lease would have expired: its slot stays taken, and a second run is refused. (Setting the
    limit's count to 0 instead, the dead lease later took the long run's slot and let the
    second one overlap it.)"""
    report = doctor(db, api)
    assert report.slots_freed == [SLOT] and _slots(api) == 0
    long_log = tmp_path / "long.log"
    long_run = _start_run(prefect_api, sessions, db, long_log, sleep=95)
    try:
        _wait_for_ledger(db, long_run, long_log)
        _wait_for_slot(api, 1)
        # The dead lease, last renewed before the kill, expires within 60 s of it and the
        # server revokes expired leases every 15 s: the second run waits (30 s) across that.
        time.sleep(max(0.0, zombie.killed_at + 42 - time.monotonic()))
        # The second run as from another host: its own state file, so only the Prefect slot
        # (not this host's lock, which would refuse it at once) stands between the two.
        second_log, second_db = tmp_path / "second.log", tmp_path / "elsewhere.duckdb"
        second = _start_run(prefect_api, sessions, second_db, second_log, sleep=0)
        code, out = _run_output(second, second_log, timeout=120)
        assert code != 0 and "Processor 'linecount' is already running" in out, out[-2000:]
        assert "on this host holds its lock" not in out  # refused by the slot, after waiting
        assert _rows(second_db, "SELECT count(*) FROM processor_runs") == [(0,)]
        # Past the moment the dead lease has surely expired and been revoked (60 s after its
        # last renewal, plus the server's 15 s loop): the slot is still the long run's.
        time.sleep(max(0.0, zombie.killed_at + 80 - time.monotonic()))
        assert long_run.poll() is None and _slots(api) == 1
        code, out = _run_output(long_run, long_log, timeout=120)
        assert code == 0, out[-2000:]
    finally:
        if long_run.poll() is None:
            long_run.kill()
            long_run.wait(timeout=30)
    runs = _rows(db, "SELECT status FROM processor_runs ORDER BY started_at")
    assert runs == [("crashed",), ("completed",)]  # the second run never started its work
    assert _slots(api) == 0


def test_report_only_names_a_dead_holder_while_a_new_run_waits(
    prefect_api: str, api: PrefectAPI, zombie: Zombie, sessions: Path, db: Path, tmp_path: Path
) -> None:
    """A run waiting for the slot (Running in Prefect, alive) does not hide that a dead run
    holds it; fixing releases the dead run's lease and the waiting run goes on at once."""
    log = tmp_path / "waiting.log"
    waiting = _start_run(prefect_api, sessions, db, log, sleep=0)
    try:
        deadline = time.monotonic() + 60
        while not [
            r
            for r in api.flow_runs(flow_names=[flow_name("linecount")], states=("RUNNING",))
            if r["id"] != zombie.flow_run_id
        ]:
            assert time.monotonic() < deadline and waiting.poll() is None, log.read_text()
            time.sleep(0.2)
        report = doctor(db, api, fix=False)
        zombie_name = report.zombies[0].name
        assert report.leaked_slots == [SlotFinding("linecount", SLOT, 1, (zombie_name,))]
        assert report.lines()[-1] == (
            f"leaked slot: {SLOT} has 1 active slot(s) held by dead run {zombie_name}; "
            "not released (report only)"
        )
        assert _slots(api) == 1
        fixed = doctor(db, api)
        assert fixed.slots_freed == [SLOT]
        code, out = _run_output(waiting, log, timeout=90)
        assert code == 0, out[-2000:]
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(timeout=30)


def test_nothing_wrong_reports_nothing_and_changes_nothing(
    prefect_api: str, api: PrefectAPI, linecount: Any, sessions: Path, db: Path, tmp_path: Path
) -> None:
    assert doctor(db, api).clean  # no ledger yet, nothing running
    log = tmp_path / "live.log"
    proc = _start_run(prefect_api, sessions, db, log, sleep=8)
    try:
        run_id, flow_run_id, _ = _wait_for_ledger(db, proc, log)
        _wait_for_slot(api, 1)
        report = doctor(db, api)  # a live run holding its slot is not a zombie
        assert report.clean and report.lines() == []
        assert _state(api, flow_run_id) == "RUNNING" and _slots(api) == 1
        assert _rows(db, "SELECT status FROM processor_runs WHERE run_id = ?", [run_id]) == [
            ("running",)
        ]
        assert proc.wait(timeout=90) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert _state(api, flow_run_id) == "COMPLETED"
    report = doctor(db, api)
    assert report.clean and _slots(api) == 0
    assert _rows(db, "SELECT status FROM processor_runs WHERE run_id = ?", [run_id]) == [
        ("completed",)
    ]


def test_report_only_changes_nothing(api: PrefectAPI, zombie: Zombie, db: Path) -> None:
    report = doctor(db, api, fix=False)

    assert [z.flow_run_id for z in report.zombies] == [zombie.flow_run_id]
    name = report.zombies[0].name
    assert report.leaked_slots == [SlotFinding("linecount", SLOT, 1, (name,))]
    assert report.crashed == report.slots_freed == report.ledger_closed == []
    assert all(line.endswith("(report only)") for line in report.lines())
    assert len(report.lines()) == 2
    assert _state(api, zombie.flow_run_id) == "RUNNING" and _slots(api) == 1
    assert _rows(db, "SELECT status FROM processor_runs WHERE run_id = ?", [zombie.run_id]) == [
        ("running",)
    ]


def test_a_run_on_another_host_is_left_alone(api: PrefectAPI, zombie: Zombie, db: Path) -> None:
    with connect(db) as con:
        con.execute("UPDATE processor_runs SET host = 'build-7' WHERE run_id = ?", [zombie.run_id])

    report = doctor(db, api)

    assert [u.flow_run_id for u in report.unchecked] == [zombie.flow_run_id]
    assert report.lines() == [
        f"run {report.unchecked[0].name} (linecount, running): cannot check (runs on host build-7)"
    ]
    assert not report.zombies and not report.leaked_slots  # it may be alive: its slot stays
    assert _state(api, zombie.flow_run_id) == "RUNNING" and _slots(api) == 1
    with connect(db) as con:  # back home, so the fixture's clean-up can crash it
        con.execute(
            "UPDATE processor_runs SET host = ? WHERE run_id = ?",
            [socket.gethostname(), zombie.run_id],
        )


def test_a_running_run_without_ledger_row_is_a_zombie_only_after_the_grace(
    api: PrefectAPI, linecount: Any, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that died before writing its ledger row (in the test: a flow run created Running
    through the API, with no process at all)."""
    with httpx.Client(base_url=api.url, timeout=30) as http:
        flow = http.post("/flows/", json={"name": flow_name("linecount")}).json()
        run = http.post(
            "/flow_runs/",
            json={
                "flow_id": flow["id"],
                "name": "linecount-no-ledger",
                "state": {"type": "RUNNING"},
            },
        ).json()
    try:
        report = doctor(db, api)
        assert report.clean  # young: it may still be starting
        assert _state(api, run["id"]) == "RUNNING"
        monkeypatch.setattr(doctor_module, "NO_LEDGER_GRACE", timedelta(0))
        report = doctor(db, api)
        assert [z.flow_run_id for z in report.zombies] == [run["id"]]
        assert "no ledger row after 0 min" in report.zombies[0].reason
        assert _state(api, run["id"]) == "CRASHED"
    finally:
        if _state(api, run["id"]) == "RUNNING":
            api.force_state(run["id"], "CANCELLED", "test cleanup")


def test_process_alive() -> None:
    assert process_alive(os.getpid())
    assert process_alive(os.getpid(), datetime.now(UTC))
    # a pid now used by a process that started long after the ledger row: not that run
    assert not process_alive(os.getpid(), datetime.now(UTC) - timedelta(days=1))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not process_alive(child.pid)  # exited, not yet reaped
    child.wait()
    assert not process_alive(child.pid)
    assert not process_alive(0) and not process_alive(-1)


LEAVE_A_RUNNING_ROW = """
import sys
from datetime import UTC, datetime
from pathlib import Path

from processors import registry
from state import store
from state.db import connect
from state.migrations import migrate

with connect(Path(sys.argv[1])) as con:
    migrate(con)
    store.start_run(
        con, "direct-1", registry.get("linecount"), started_at=datetime.now(UTC), flow_run_id=None
    )
"""


def test_a_ledger_row_left_running_by_a_dead_process_is_closed(
    api: PrefectAPI, linecount: Any, db: Path
) -> None:
    """A run without Prefect (or whose flow run already ended) that died mid-way."""
    subprocess.run([sys.executable, "-c", LEAVE_A_RUNNING_ROW, str(db)], check=True, timeout=60)
    ((pid,),) = _rows(db, "SELECT pid FROM processor_runs WHERE run_id = 'direct-1'")

    report = doctor(db, api, fix=False)
    assert report.lines() == [
        f"ledger run direct-1 (linecount) says running but process {pid} on "
        f"{socket.gethostname()} is gone; not fixed (report only)"
    ]
    assert _rows(db, "SELECT status FROM processor_runs") == [("running",)]

    report = doctor(db, api)
    assert report.ledger_closed == ["direct-1"] and not report.zombies
    assert report.lines()[0].endswith("; marked crashed in the ledger")
    assert _rows(db, "SELECT status, finished_at IS NOT NULL FROM processor_runs") == [
        ("crashed", True)
    ]
    assert doctor(db, api).clean
