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


def _other_process_writes(db: Path) -> subprocess.CompletedProcess[str]:
    """Another process opens the file for writing at once (no retrying) and adds a row."""
    code = (
        "import duckdb\n"
        f"con = duckdb.connect({str(db)!r})\n"
        "con.execute('CREATE TABLE IF NOT EXISTS other (x INTEGER)')\n"
        "con.execute('INSERT INTO other VALUES (1)')\n"
        "con.close()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_file_is_released_as_soon_as_the_unit_of_work_ends(db: Path) -> None:
    with connect(db) as con:
        con.execute("CREATE TABLE mine (x INTEGER)")
        held = _other_process_writes(db)
        assert held.returncode != 0 and "lock" in held.stderr
    released = _other_process_writes(db)
    assert released.returncode == 0, released.stderr
    with connect(db) as con:  # and what either side wrote is there
        assert con.execute("SELECT count(*) FROM mine").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM other").fetchone() == (1,)


def test_overlapping_units_of_one_process_share_the_file(db: Path) -> None:
    with connect(db) as outer:
        outer.execute("CREATE TABLE t (x INTEGER)")
        outer.execute("INSERT INTO t VALUES (1)")
        with connect(db) as inner, connect(db, read_only=True) as reader:
            inner.execute("INSERT INTO t VALUES (2)")
            assert reader.execute("SELECT sum(x) FROM t").fetchone() == (3,)
        assert outer.execute("SELECT sum(x) FROM t").fetchone() == (3,)
    assert _other_process_writes(db).returncode == 0  # released once the last one ended


def test_a_write_waits_while_this_process_reads_the_file_read_only(db: Path) -> None:
    with connect(db) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    with connect(db, read_only=True) as reader:
        with pytest.raises(StateError, match="stayed locked"), connect(db, lock_timeout=0.2):
            pass
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)
    with connect(db) as con:
        con.execute("INSERT INTO t VALUES (1)")


def test_files_with_the_same_name_stay_apart(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "state.duckdb", tmp_path / "b" / "state.duckdb"
    with connect(first) as a, connect(second) as b:
        a.execute("CREATE TABLE only_in_a (x INTEGER)")
        b.execute("CREATE TABLE only_in_b (x INTEGER)")
        for con, table in ((a, "only_in_a"), (b, "only_in_b")):
            names = con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_catalog = current_database()"
            ).fetchall()
            assert names == [(table,)]
    with connect(first) as a:
        assert a.execute("SELECT current_database()").fetchone() == ("state",)


def test_a_child_forked_after_a_unit_of_work_starts_clean(db: Path) -> None:
    """`subprocess` with a `preexec_fn` runs Python in the forked child before exec; the
    parent's DuckDB instance, idle between units of work, must not be torn down there (its
    threads do not exist in the child: that crashed it)."""
    with connect(db) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    for _ in range(3):
        child = subprocess.run(
            [sys.executable, "-c", "print('ok')"],
            preexec_fn=lambda: None,
            capture_output=True,
            text=True,
        )
        assert (child.returncode, child.stdout) == (0, "ok\n")
    with connect(db) as con:
        con.execute("INSERT INTO t VALUES (1)")
        assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)
