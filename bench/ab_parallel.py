"""The backlog reading of `flows.parallel` now vs at a git revision, alternated in one run (not
a figure: the check that a change to it pays, reported as ratios).

    python -m bench.ab_parallel [REV] [--columns] [--swap MODULE:FUNCTION] [--rounds 5]
                                [--processes 2] [--sessions 4000] [--max-mb 20]

Both sides are `run_direct` into a new state file with `SESSION_PIPELINE_READ_PROCESSES` set,
over figures 6 to 8's corpus. "now" is `flows.parallel.read_in_processes` of the working
tree; "REV" is that function as it was at REV (default HEAD), its worker function the working
tree's. With `--columns` the other side is instead the working tree with its workers running
`flows.work.process_batch` itself: outcomes travel as columns of Python values, unpickled in
the committing process, as before `state.store.serialize_rows`. With `--swap
state.store:_upsert_read` the function swapped for its REV version is that one instead (any
function the committing process calls by its module's global name).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

from bench.corpus import MB, corpus
from bench.run import ROOT, Work, alternate, direct, drop_db, fmt_rounds, loadavg, log, per_round


def module_at(rev: str, name: str) -> types.ModuleType:
    """Module `name` as it was at `rev`, as a module of its own; for `flows.parallel` its
    worker function is the working tree's (the workers must find it by name)."""
    import flows.parallel

    path = name.replace(".", "/") + ".py"
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"{name.replace('.', '_')}_at_{rev}")
    sys.modules[module.__name__] = module  # (its dataclasses look themselves up there)
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    if name == "flows.parallel" and hasattr(module, "read_batch"):
        module.read_batch = flows.parallel.read_batch
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", nargs="?", default="HEAD")
    parser.add_argument("--columns", action="store_true")
    parser.add_argument("--swap", default="flows.parallel:read_in_processes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=4000)
    parser.add_argument("--max-mb", type=float, default=20)
    args = parser.parse_args()
    import importlib

    import flows.parallel as parallel

    module_name, function = args.swap.split(":")
    module = importlib.import_module(module_name)
    now_reader, now_function = parallel.read_batch, getattr(module, function)
    if args.columns:
        other = "columns"
        other_reader, other_function = parallel.process_batch, now_function
    else:
        other = args.rev
        other_reader = now_reader
        other_function = getattr(module_at(args.rev, module_name), function)
    c = corpus(args.sessions, max_bytes=int(args.max_mb * MB), log=log)
    os.environ["SESSION_PIPELINE_READ_PROCESSES"] = str(args.processes)
    work = Work()

    def side(reader: Callable[..., object], swapped: Callable[..., object]) -> Callable[[], float]:
        def measure() -> float:
            parallel.read_batch = reader  # type: ignore[assignment]
            setattr(module, function, swapped)
            db: Path = work.db("ab-parallel")
            try:
                seconds, figures = direct(c.path, db)
                if figures["errors"] or figures["processed"] != c.files:
                    raise RuntimeError(f"unexpected figures: {figures}")
                return seconds
            finally:
                parallel.read_batch = now_reader
                setattr(module, function, now_function)
                drop_db(db)

        return measure

    load = loadavg()
    try:
        t = alternate(
            {"now": side(now_reader, now_function), other: side(other_reader, other_function)},
            args.rounds,
        )
    finally:
        work.close()
    ratios = per_round(t[other], t["now"])
    log(
        f"{args.swap}: {c.files:,} files, {c.bytes / MB:.0f} MB, {args.processes} reader "
        "processes: now "
        f"{statistics.median(t['now']):.2f} s, {other} {statistics.median(t[other]):.2f} s "
        f"(medians); {other} / now per round {fmt_rounds(ratios, '×')}, median "
        f"{statistics.median(ratios):.2f}×; load {load} → {loadavg()}"
    )


if __name__ == "__main__":  # (reader processes import this module again)
    main()
