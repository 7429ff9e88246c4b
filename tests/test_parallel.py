"""A backlog read by several processes gives exactly the tables one process gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows import parallel, work
from flows.pipeline import run_direct
from processors.usage import UsageProcessor
from state.db import connect
from tests.conftest import EXAMPLES

TABLES = ("usage_events", "usage_requests", "usage_sessions")


def _tables(db: Path) -> dict[str, list[tuple[object, ...]]]:
    with connect(db, read_only=True) as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}


def test_processes_read_what_one_process_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "sessions"
    for copy in range(4):  # 28 sessions; the biggest is read by this process, in segments
        for path in EXAMPLES.rglob("*"):
            if path.is_file():
                target = (
                    data_dir
                    / f"{path.relative_to(EXAMPLES).parts[0]}{copy}"
                    / Path(*path.relative_to(EXAMPLES).parts[1:])
                )
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    biggest = max(data_dir.rglob("*.jsonl"), key=lambda p: p.stat().st_size)
    segment = biggest.stat().st_size // 3
    monkeypatch.setattr(work, "SEGMENT_BYTES", segment)
    monkeypatch.setattr(parallel, "SEGMENT_BYTES", segment)
    results = {}
    for processes in ("1", "2"):
        monkeypatch.setenv("SESSION_PIPELINE_READ_PROCESSES", processes)
        db = tmp_path / f"p{processes}.duckdb"
        figures = run_direct(UsageProcessor(), data_dir, db, max_attempts=3)
        assert (figures.processed, figures.errors) == (28, 0)
        results[processes] = _tables(db)
    assert results["1"] == results["2"]
    assert len(results["2"]["usage_sessions"]) == 28


def test_a_small_backlog_or_a_capped_processor_reads_in_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from state.plan import Candidate

    monkeypatch.delenv("SESSION_PIPELINE_READ_PROCESSES", raising=False)
    few = [Candidate(f"a/{i}.jsonl", "/x", 1 << 20, 0, "new") for i in range(10)]
    many = [Candidate(f"a/{i}.jsonl", "/x", 1 << 20, 0, "new") for i in range(100)]
    assert parallel.read_processes(UsageProcessor(), few, capped=False) == 1
    assert parallel.read_processes(UsageProcessor(), many, capped=False) == parallel.cores()
    assert parallel.read_processes(UsageProcessor(), many, capped=True) == 1


def test_a_script_without_a_main_guard_still_reads_everything(tmp_path: Path) -> None:
    """Worker processes import the calling script again; one without
    `if __name__ == "__main__":` breaks them. The run reads in its own process instead,
    rather than failing (and in the end quarantining) every session."""
    import subprocess
    import sys

    data_dir = tmp_path / "sessions"
    shutil.copytree(EXAMPLES, data_dir)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pathlib import Path\n"
        "from flows.pipeline import run_direct\n"
        "from processors.usage import UsageProcessor\n"
        f"f = run_direct(UsageProcessor(), Path({str(data_dir)!r}), "
        f"Path({str(tmp_path / 's.duckdb')!r}), max_attempts=3)\n"
        "print(f.processed, f.errors)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={
            **__import__("os").environ,
            "SESSION_PIPELINE_READ_PROCESSES": "2",
            "PYTHONPATH": str(root),
        },
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # (the parent's line; a straggling reader child, which runs the script again, may print
    # its own "0 0" after the parent is done, on a loaded machine)
    assert "7 0" in done.stdout.strip().splitlines(), done.stderr[-2000:]
    assert "reader processes could not start" in done.stderr
