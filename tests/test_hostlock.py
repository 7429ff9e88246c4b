"""Two runs of one processor never overlap on a host, whichever way each was started; the
lock goes with the process that held it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flows.pipeline import run_direct
from processors.base import ProcessResult
from state.hostlock import HostLock, ProcessorBusyError, lock_path
from tests.conftest import user_line, write_session
from tests.test_pipeline import Recorder


def test_a_second_run_of_the_same_processor_is_refused_while_one_runs(
    data_dir: Path, db: Path
) -> None:
    write_session(data_dir, "alice/s1.jsonl", [user_line("hi")])
    entered, leave = threading.Event(), threading.Event()
    slow = Recorder()
    slow.during = lambda session: (entered.set(), leave.wait(30))
    first = threading.Thread(
        target=run_direct, args=(slow, data_dir, db), kwargs={"max_attempts": 3}
    )
    first.start()
    try:
        assert entered.wait(30)
        with pytest.raises(
            ProcessorBusyError, match=r"Processor 'recorder' is already running \(pid \d+"
        ):
            run_direct(Recorder(), data_dir, db, max_attempts=3)
        # another processor is not held up (its own lock)
        other = Recorder()
        other.name = "other"
        other.tables = ()
        other.process = lambda session: ProcessResult()  # type: ignore[method-assign]
        assert run_direct(other, data_dir, db, max_attempts=3).processed == 1
    finally:
        leave.set()
        first.join(30)
    assert run_direct(Recorder(), data_dir, db, max_attempts=3).errors == 0


def test_a_killed_holder_leaves_no_lock_behind(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from state.hostlock import HostLock; "
            f"HostLock(Path({str(db)!r}), 'usage').acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ProcessorBusyError, match=f"pid {holder.pid} "):
            HostLock(db, "usage").acquire()
    finally:
        holder.kill()
        holder.wait(30)
    with HostLock(db, "usage"):  # the kernel let go with the process
        assert lock_path(db, "usage").exists()
