"""The backlog reading of `flows.parallel` now vs at a git revision, alternated in one run (not
a figure: the check that a change to it pays, reported as ratios).

    python -m bench.ab_parallel [REV] [--columns] [--rounds 5] [--processes 2]
                                [--sessions 4000] [--max-mb 20]

Both sides are `run_direct` into a new state file with `SESSION_PIPELINE_READ_PROCESSES` set,
over figures 6 to 8's corpus. "now" is `flows.parallel.read_in_processes` of the working
tree; "REV" is that function as it was at REV (default HEAD), its worker function the working
tree's. With `--columns` the other side is instead the working tree with its workers running
`flows.work.process_batch` itself: outcomes travel as columns of Python values, unpickled in
the committing process, as before `state.store.serialize_rows`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import types
from collections.abc import Callable
from pathlib import Path

from bench.corpus import MB, corpus
from bench.run import ROOT, Work, alternate, direct, drop_db, fmt_rounds, loadavg, log, per_round


def parallel_at(rev: str) -> types.ModuleType:
    """`flows/parallel.py` as it was at `rev`, as a module of its own whose worker function
    is the working tree's (the workers must find it by name)."""
    import flows.parallel

    source = subprocess.run(
        ["git", "show", f"{rev}:flows/parallel.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"flows_parallel_at_{rev}")
    exec(compile(source, f"{rev}:flows/parallel.py", "exec"), module.__dict__)
    if hasattr(module, "read_batch"):
        module.read_batch = flows.parallel.read_batch
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", nargs="?", default="HEAD")
    parser.add_argument("--columns", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=4000)
    parser.add_argument("--max-mb", type=float, default=20)
    args = parser.parse_args()
    import flows.parallel as parallel

    now_reader, now_read = parallel.read_batch, parallel.read_in_processes
    if args.columns:
        other = "columns"
        other_reader, other_read = parallel.process_batch, now_read
    else:
        other = args.rev
        other_reader, other_read = now_reader, parallel_at(args.rev).read_in_processes
    c = corpus(args.sessions, max_bytes=int(args.max_mb * MB), log=log)
    os.environ["SESSION_PIPELINE_READ_PROCESSES"] = str(args.processes)
    work = Work()

    def side(reader: Callable[..., object], read: Callable[..., None]) -> Callable[[], float]:
        def measure() -> float:
            parallel.read_batch, parallel.read_in_processes = reader, read  # type: ignore[assignment]
            db: Path = work.db("ab-parallel")
            try:
                seconds, figures = direct(c.path, db)
                if figures["errors"] or figures["processed"] != c.files:
                    raise RuntimeError(f"unexpected figures: {figures}")
                return seconds
            finally:
                parallel.read_batch, parallel.read_in_processes = now_reader, now_read
                drop_db(db)

        return measure

    load = loadavg()
    try:
        t = alternate(
            {"now": side(now_reader, now_read), other: side(other_reader, other_read)},
            args.rounds,
        )
    finally:
        work.close()
    ratios = per_round(t[other], t["now"])
    log(
        f"{c.files:,} files, {c.bytes / MB:.0f} MB, {args.processes} reader processes: now "
        f"{statistics.median(t['now']):.2f} s, {other} {statistics.median(t[other]):.2f} s "
        f"(medians); {other} / now per round {fmt_rounds(ratios, '×')}, median "
        f"{statistics.median(ratios):.2f}×; load {load} → {loadavg()}"
    )


if __name__ == "__main__":  # (reader processes import this module again)
    main()
