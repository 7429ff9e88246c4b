"""Short connections retried on another process's lock; a clear failure past the budget."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from state.db import StateError, connect


def _hold(db: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that opens the file for writing and keeps it for `seconds`."""
    code = (
        "import duckdb, sys, time\n"
        f"con = duckdb.connect({str(db)!r})\n"
        "con.execute('CREATE TABLE IF NOT EXISTS held (x INTEGER)')\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
        "con.close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_waits_for_a_lock_held_by_another_process(db: Path) -> None:
    db.parent.mkdir(parents=True)
    holder = _hold(db, 1.0)
    try:
        with connect(db, lock_timeout=30) as con:
            assert con.execute("SELECT count(*) FROM held").fetchone() == (0,)
    finally:
        holder.wait(timeout=30)


def test_gives_up_with_one_clear_line_past_the_budget(db: Path) -> None:
    db.parent.mkdir(parents=True)
    holder = _hold(db, 5.0)
    try:
        started = time.monotonic()
        with pytest.raises(StateError) as error, connect(db, lock_timeout=0.5):
            pass
        assert time.monotonic() - started < 5.0
        assert str(error.value) == (
            f"state database {db} stayed locked by another process for 0.5s; nothing was written"
        )
    finally:
        holder.kill()
        holder.wait()
    with connect(db) as con:  # and once released, it opens with its content intact
        assert con.execute("SELECT count(*) FROM held").fetchone() == (0,)


def test_read_only_needs_an_existing_database(db: Path) -> None:
    with pytest.raises(StateError, match="does not exist yet"), connect(db, read_only=True):
        pass
    assert not db.exists()
